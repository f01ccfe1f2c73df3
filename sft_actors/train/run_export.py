"""One device's fine-tuned model out of a run: PEFT adapters, a merged HF folder, generation.

- :func:`runtime_logits` runs the model as the runtime did: the device part ``[0, cut)`` with
  the averaged adapters, then the server stages from the one its activations entered, each with
  its own adapters (``model.split`` / ``train.stages`` parts).
- :func:`write_peft` writes PEFT's LoRA layout (``adapter_config.json`` +
  ``adapter_model.safetensors``; keys ``base_model.model.model.layers.{i}.self_attn.q_proj.
  lora_A.weight`` as PEFT's ``get_peft_model_state_dict`` saves them), via
  ``model.export.export_peft``; ``base_model_name_or_path`` names an HF folder of the base.
- :func:`write_merged` writes ``W + (alpha / r) B A`` into each adapted weight and saves a
  Hugging Face Llama folder (``config.json``, ``model.safetensors``, ``tokenizer.json`` when
  the model has a BPE tokenizer) via ``model.export.export_hf_llama``.
- :func:`generate` continues token ids with a merged model: greedy, or sampled at a
  temperature from a seeded generator.

ViT runs use timm names: ``--format merged`` writes ``model.safetensors`` in timm's layout
(``blocks.{i}.attn.qkv.weight``, ``head.weight``; the trained head included) with a
``config.json`` naming the architecture (``architecture``, ``num_classes``, ``model_args``);
``--format peft`` writes the LoRA on ``blocks.{i}.attn.qkv`` … and the trained head as PEFT's
``modules_to_save = ["head"]`` (saved as ``base_model.model.head.weight``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sft_actors.model import (
    DevicePart,
    FullPart,
    LoraConfig,
    ServerPart,
    SplitLM,
    export_hf_llama,
    export_peft,
    load_lora_state_dict,
    merge_lora,
)
from sft_actors.model.config import ViTConfig
from sft_actors.model.export import peft_key
from sft_actors.model.vit import ViT
from sft_actors.train.run_adapters import DeviceModel, ExportError, RunAdapters
from sft_actors.train.stages import StagePart

#: PEFT's prefix of the saved tensors' names (``PeftModel`` → ``LoraModel`` → the base model).
PEFT_PREFIX = "base_model.model."


def _trained_head(model: SplitLM, head: dict[str, torch.Tensor]) -> nn.Module | None:
    if not head or not isinstance(model.config, ViTConfig):
        return None
    weight = head["weight"]  # (K, C)
    layer = nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
    layer.load_state_dict(head)
    return layer


@torch.no_grad()
def runtime_logits(model: SplitLM, run: RunAdapters, dm: DeviceModel, inputs: torch.Tensor) -> torch.Tensor:
    """Outputs (B, T, V) or (B, K) of ``inputs`` through the runtime's parts for ``dm.device``:
    its device part, then each server stage from the one it entered (or, under ``fedlora``, the
    whole model with the devices' average). Missing adapters are the identity, as in a fresh part."""
    info, lora = run.info, run.info.lora
    head = _trained_head(model, dm.head)
    if info.whole_model_on_device:
        full = FullPart(model, lora, seed=info.seed, head=head)
        load_lora_state_dict(full, run.devices, strict=False)
        whole: torch.Tensor = full(inputs)
        return whole
    device = DevicePart(model, dm.cut, lora, seed=info.seed)
    load_lora_state_dict(device, run.devices, strict=False)
    hidden = device(inputs)  # (B, T, C) at the cut
    stages = sorted(info.servers.items(), key=lambda item: item[1].start_block)
    names = [name for name, _ in stages]
    entry = info.entry_server.get(dm.device) or names[0]
    at = dm.cut
    for name, r in stages[names.index(entry) :]:
        tensors = run.servers.get(name, {})
        if r.head:
            server = ServerPart(model, r.start_block, lora, seed=info.seed, head=head)
            load_lora_state_dict(server, tensors, strict=False)
            out: torch.Tensor = server(hidden, at)
            return out
        end = model.num_blocks if r.end_block is None else r.end_block
        stage = StagePart(model, r.start_block, end, lora, seed=info.seed)
        load_lora_state_dict(stage, tensors, strict=False)
        hidden, at = stage(hidden, at), end
    raise ExportError(f"run {info.run!r} has no server stage that runs the head")


def merged_model(model: SplitLM, dm: DeviceModel, lora: LoraConfig) -> SplitLM:
    """A copy of ``model`` with ``dm``'s adapters merged into the weights and, for a ViT, its
    trained head in place of the base head (``model`` itself is untouched)."""
    merged = merge_lora(model, dm.lora, lora)
    if dm.head and isinstance(merged, ViT):
        with torch.no_grad():
            merged.head_fc.weight.copy_(dm.head["weight"])  # (K, C)
            merged.head_fc.bias.copy_(dm.head["bias"])  # (K,)
    return merged


def write_merged(
    model: SplitLM, dm: DeviceModel, lora: LoraConfig, out: Path, *, base: Path | None = None
) -> list[str]:
    """The merged model in ``out``: a Hugging Face Llama folder (``base``: the Hugging Face
    folder the run's model came from, whose tokenizer and generation settings are kept), or a
    ViT in timm's layout (``model.safetensors`` + ``config.json``). Returns the files written."""
    merged = merged_model(model, dm, lora)
    if not isinstance(merged, ViT):
        export_hf_llama(merged, out, base=base)
        return sorted(p.name for p in out.iterdir())
    out.mkdir(parents=True, exist_ok=True)
    state = {vit_timm_name(k): v.detach().contiguous() for k, v in merged.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    c = merged.config
    model_args = {
        "img_size": c.image_size,
        "patch_size": c.patch_size,
        "in_chans": c.in_chans,
        "num_classes": c.num_classes,
        "embed_dim": c.dim,
        "depth": c.num_blocks,
        "num_heads": c.num_heads,
        "mlp_ratio": c.mlp_dim / c.dim,
    }
    config = {
        "architecture": f"vit_custom_patch{c.patch_size}_{c.image_size}",
        "num_classes": c.num_classes,
        "num_attention_heads": c.num_heads,
        "layer_norm_eps": c.norm_eps,
        "hidden_act": "gelu",
        "model_args": model_args,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return sorted(p.name for p in out.iterdir())


def vit_timm_name(key: str) -> str:
    """Our ViT state-dict key in timm's layout (our head module is ``head_fc``)."""
    return "head." + key[len("head_fc.") :] if key.startswith("head_fc.") else key


def write_peft(dm: DeviceModel, lora: LoraConfig, out: Path, *, family: str, base: str) -> list[str]:
    """PEFT's LoRA layout in ``out`` with ``base_model_name_or_path = base``; a ViT's trained
    head goes in as ``modules_to_save = ["head"]``. Returns the files written. Raises
    :class:`ExportError` when ``dm`` has no adapter at all."""
    if not dm.lora:
        raise ExportError(f"device {dm.device!r} has no adapter in this source; nothing to export")
    export_peft(out, dm.lora, lora, family=family, base_model_name_or_path=base)
    if dm.head:
        tensors = dict(load_file(str(out / "adapter_model.safetensors")))
        tensors |= {f"{PEFT_PREFIX}head.{k}": v.contiguous() for k, v in dm.head.items()}
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = json.loads((out / "adapter_config.json").read_text())
        config["modules_to_save"] = ["head"]
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return sorted(p.name for p in out.iterdir())


def peft_state_back(
    directory: Path, keys: Sequence[str], family: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``adapter_model.safetensors`` of a PEFT export back under our keys
    (``blocks.{i}.{proj}.lora_A|B``, for the ``keys`` exported) and the head it carries
    (``weight``, ``bias``; empty without one). Raises :class:`ExportError` for a missing key."""
    saved = load_file(str(directory / "adapter_model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        _, block, proj, which = key.split(".")
        name = peft_key(family, int(block), proj, which)
        if name not in saved:
            raise ExportError(f"{directory}: {name} (our {key}) is missing from adapter_model.safetensors")
        out[key] = saved[name]
    head = {
        k[len(PEFT_PREFIX + "head.") :]: v for k, v in saved.items() if k.startswith(PEFT_PREFIX + "head.")
    }
    return out, head


def check_inputs(model: SplitLM, *, batch: int = 2, tokens: int = 8, seed: int = 0) -> torch.Tensor:
    """Seeded self-check inputs: token ids (B, T) for a Llama, images (B, C, H, W) for a ViT."""
    gen = torch.Generator().manual_seed(seed)
    c = model.config
    if isinstance(c, ViTConfig):
        dtype = next(model.parameters()).dtype
        return torch.randn(batch, c.in_chans, c.image_size, c.image_size, generator=gen).to(dtype)
    return torch.randint(0, c.vocab_size, (batch, tokens), generator=gen)


@torch.no_grad()
def generate(
    model: SplitLM,
    ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    seed: int = 0,
    eos_id: int | None = None,
) -> list[int]:
    """``max_new_tokens`` continuation ids of ``ids`` (stops after ``eos_id``): greedy for
    ``temperature`` 0, else sampled from ``softmax(logits / temperature)`` with a generator
    seeded by ``seed`` (same seed, same tokens). Raises :class:`ExportError` for empty ``ids``,
    a negative temperature, or a prompt plus ``max_new_tokens`` beyond the model's context
    (``max_seq_len``: positions past it were never trained, and RoPE scaling ends there)."""
    if not ids:
        raise ExportError("the prompt encodes to no tokens; give a non-empty --prompt")
    if temperature < 0:
        raise ExportError(f"--temperature must be ≥ 0, got {temperature}")
    limit = int(getattr(model.config, "max_seq_len", 2048))
    if len(ids) + max_new_tokens > limit:
        room = limit - len(ids)
        fix = f"use --max-new-tokens {room} or less" if room > 0 else "shorten --prompt"
        raise ExportError(
            f"the prompt is {len(ids)} tokens and --max-new-tokens {max_new_tokens} would run past the "
            f"model's context of {limit} tokens; {fix}"
        )
    gen = torch.Generator().manual_seed(seed)
    out = list(ids)
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([out[-limit:]], dtype=torch.long))[0, -1].float()  # (V,)
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        out.append(nxt)
        if eos_id is not None and nxt == eos_id:
            break
    return out[len(ids) :]


def describe(dm: DeviceModel, run: RunAdapters) -> dict[str, object]:
    """Where each block's adapter came from, for the JSON line (``{"devices": [0, 1], "server": [2, 3]}``)."""
    by_source: dict[str, list[int]] = {}
    for block, source in sorted(dm.provenance.items()):
        by_source.setdefault(source, []).append(block)
    return {
        "source": run.source if run.round is None else f"checkpoint round {run.round}",
        "cut": dm.cut,
        "blocks": by_source,
        "blocks_without_adapter": dm.blocks_without_adapter,
        "lora": {
            "rank": run.info.lora.rank,
            "alpha": run.info.lora.alpha,
            "targets": list(run.info.lora.targets),
        },
    }
