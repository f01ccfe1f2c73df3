"""Split == whole: the check a user runs after adding a checkpoint (``sft model verify``).

Runs one batch through device part → (leaf at the cut) → server part, backpropagates, sends the
cut gradient back into the device part, and compares logits and every LoRA gradient with the
unsplit model carrying the same adapters. B is randomised (non-zero) first: with a fresh
adapter (B = 0) the gradient of A is exactly zero and the comparison would prove nothing.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from sft_actors.errors import ConfigError
from sft_actors.model.base import SplitLM
from sft_actors.model.config import LlamaConfig, LoraConfig
from sft_actors.model.llama import IGNORE_INDEX
from sft_actors.model.lora import randomize_lora_B
from sft_actors.model.split import (
    DevicePart,
    FullPart,
    Part,
    ServerPart,
    head_state_dict,
    load_lora_state_dict,
    lora_state_dict,
    make_full_part,
    split_model,
)


@dataclass(kw_only=True, slots=True, frozen=True)
class VerifyResult:
    cut: int
    server_start: int
    batch: int
    seq: int
    max_abs_logit_diff: float
    max_rel_grad_diff: float  # max over adapter tensors of max|g_split − g_whole| / max|g_whole|
    loss_split: float
    loss_whole: float
    grads_compared: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_batch(model: SplitLM, batch: int, seq: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels: token ids right-padded (labels -100 on pads) or images with class labels."""
    gen = torch.Generator().manual_seed(seed)
    config = model.config
    if isinstance(config, LlamaConfig):
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
        labels = ids.clone()
        if batch > 1 and seq > 4:
            labels[-1, -seq // 4 :] = IGNORE_INDEX  # the last row ends in padding
        return ids, labels
    images = torch.randn(batch, config.in_chans, config.image_size, config.image_size, generator=gen)
    return images, torch.randint(0, config.num_classes, (batch,), generator=gen)


def _grads(part: Part, blocks: range) -> dict[str, torch.Tensor]:
    out = {}
    for key, adapter in part.adapter_modules().items():
        if int(key.split(".")[1]) in blocks:
            for name in ("lora_A", "lora_B"):
                grad = getattr(adapter, name).grad
                out[f"{key}.{name}"] = torch.zeros_like(getattr(adapter, name)) if grad is None else grad
    return out


def verify_split(
    model: SplitLM,
    cut: int,
    *,
    server_start: int | None = None,
    batch: int = 2,
    seq: int = 16,
    lora: LoraConfig | None = None,
    seed: int = 0,
) -> VerifyResult:
    """Compare the split forward/backward with the whole model on one batch (see module doc)."""
    t0 = time.perf_counter()
    lora = lora or LoraConfig()
    start = cut if server_start is None else server_start
    device, server, whole = _matched_parts(model, cut, start, lora, seed)

    inputs, labels = sample_batch(model, batch, seq, seed=seed)
    out_split, loss_split = _split_step(device, server, cut, inputs, labels)
    out_whole = whole(inputs)
    loss_whole = whole.loss(out_whole, labels)
    torch.autograd.backward(loss_whole)

    rel, compared = _max_rel_grad_diff(device, server, whole, cut, start)
    return VerifyResult(
        cut=cut,
        server_start=start,
        batch=batch,
        seq=int(inputs.shape[1]) if isinstance(model.config, LlamaConfig) else model.config.num_tokens,
        max_abs_logit_diff=float((out_split - out_whole).detach().abs().max()),
        max_rel_grad_diff=rel,
        loss_split=float(loss_split.detach()),
        loss_whole=float(loss_whole.detach()),
        grads_compared=compared,
        seconds=time.perf_counter() - t0,
    )


def _matched_parts(
    model: SplitLM, cut: int, start: int, lora: LoraConfig, seed: int
) -> tuple[DevicePart, ServerPart, FullPart]:
    """Device and server parts with random non-zero B, and the whole model with the same adapters."""
    device, server = split_model(model, cut, server_start=start, lora=lora, seed=seed)
    randomize_lora_B(device.adapters, seed=seed + 1)
    randomize_lora_B(server.adapters, seed=seed + 1)
    whole = make_full_part(model, lora, seed=seed)
    # The server's adapters for blocks [start, cut) are not used at this cut; the device's are.
    load_lora_state_dict(
        whole, {**lora_state_dict(server), **lora_state_dict(device), **head_state_dict(server)}
    )
    return device, server, whole


def _split_step(
    device: DevicePart, server: ServerPart, cut: int, inputs: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, loss) of device → leaf at the cut → server, after the backward pass through both."""
    hidden = device(inputs)
    received = hidden.detach().requires_grad_()  # what the server does with arriving activations
    out_split = server(received, cut)
    loss_split = server.loss(out_split, labels)
    torch.autograd.backward(loss_split)
    if cut > 0:
        assert received.grad is not None
        device.backward_from(hidden, received.grad)
    return out_split, loss_split


def _max_rel_grad_diff(
    device: DevicePart, server: ServerPart, whole: FullPart, cut: int, start: int
) -> tuple[float, int]:
    """(max over adapters of max|g_split − g_whole| / max|g_whole|, number of adapter tensors)."""
    # Also raises if the server's adapters below the cut (unused here) got gradients.
    num_blocks = whole.model.num_blocks
    split_grads = {**_grads(device, range(0, cut)), **_grads(server, range(cut, num_blocks))}
    whole_grads = _grads(whole, range(0, num_blocks))
    if split_grads.keys() != whole_grads.keys():
        raise ConfigError("split and whole parts hold different adapters")  # a bug, not a user error
    unused = [k for k, g in _grads(server, range(start, cut)).items() if g.abs().max() > 0]
    if unused:
        raise AssertionError(f"server adapters below the cut received gradients: {unused[:4]}")
    rel = 0.0
    for key, g in split_grads.items():
        ref = whole_grads[key]
        rel = max(rel, float((g - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
    return rel, len(split_grads)
