"""Splitting a loaded model into a device part and a server part, each with its own LoRA.

``split_model(model, cut, server_start=...)`` is pure over block indices: the device part runs
the embedding and blocks ``[0, cut)``; the server part holds blocks ``[server_start, L)``, the
final norm and the head, and enters at any ``cut ≥ server_start`` — one server part serves
devices with different cuts.

Parts never copy frozen weights unless asked (``share_base=False``): they reference the loaded
model and own only their adapters (and, for a ViT learning a new task, a trainable head), so
hundreds of in-process device parts cost a few hundred kilobytes each.

Precision: base weights may be float32, bfloat16 or float16; adapters and a trainable head are
always float32 (as PEFT keeps them), built on CPU from their seed and moved to the base model's
device, so a part computes in the base dtype and accumulates its updates in float32.

At the cut the receiver makes the incoming tensor a leaf, ``x.detach().requires_grad_()``, and
after ``loss.backward()`` sends ``x.grad`` back; :meth:`DevicePart.backward_from` applies it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from sft_actors.errors import ConfigError
from sft_actors.model.base import SplitLM
from sft_actors.model.config import LoraConfig
from sft_actors.model.lora import ADAPTER_DTYPE, LoraAdapter, adapter_items, build_block_adapters


class Float32LMHead(nn.Module):
    """A language model's output projection computed in float32: (B, T, C) of any float dtype →
    (B, T, V) float32 logits, against the model's frozen (tied or own) head weight.

    Used only on the CPU under a 16-bit base: x86 CPUs without native bfloat16 GEMM run the
    head's backward (``(B·T, V) @ (V, C)``, a reduction over the whole vocabulary) in the slow
    path (measured on SmolLM2, 64 tokens: 12.5 s in bfloat16, against 0.58 s for its forward),
    which made a bfloat16 round ~20× slower than float32. The weight is cast per call (no
    second copy is kept); GPUs keep the 16-bit head."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        object.__setattr__(self, "weight_ref", weight)  # frozen and shared: not a parameter
        self.weight_ref: torch.Tensor

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h.float(), self.weight_ref.float())  # (B, T, V) float32


def _cpu_lm_head(model: SplitLM) -> Float32LMHead | None:
    """A :class:`Float32LMHead` for a 16-bit Llama-family model on the CPU, else None."""
    if model.family != "llama" or base_device(model).type != "cpu" or base_dtype(model) == torch.float32:
        return None
    lm_head: nn.Module | None = getattr(model, "lm_head", None)
    source: nn.Module = model.get_submodule("embed_tokens") if lm_head is None else lm_head  # tied: embedding
    weight = source.get_parameter("weight")
    return Float32LMHead(weight)


class AbsentBlock(nn.Module):
    """Stands in for a block a part does not hold (``share_base=False`` copies only what is needed)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, *args: object) -> torch.Tensor:
        raise ConfigError(f"block {self.index} is not held by this model part")


class Part(nn.Module):
    """A block range of a frozen model plus the LoRA adapters (and head) this part trains.

    The frozen model is referenced, not registered: ``parameters()``/``state_dict()`` of a part
    are only what it trains, and moving or saving a part never touches the shared base.
    """

    def __init__(
        self, model: SplitLM, blocks: range, lora: LoraConfig, *, seed: int, head: nn.Module | None = None
    ) -> None:
        super().__init__()
        object.__setattr__(self, "model", model)  # deliberately not a submodule (see class doc)
        self.model: SplitLM
        self.block_range = blocks
        self.lora = lora
        self.seed = seed
        shapes = model.lora_shapes(lora)
        self.adapters = nn.ModuleDict(
            {str(i): build_block_adapters(shapes, lora, block=i, seed=seed) for i in blocks}
        ).to(base_device(model))  # float32 whatever the base dtype (PEFT); seeded on CPU, then moved
        self.trainable_head = head

    @property
    def family(self) -> str:
        return self.model.family

    @property
    def device(self) -> torch.device:
        """Where this part computes: its base model's device (the adapters are there too)."""
        return base_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        """The base weights' dtype: what this part's activations (and cut gradients) are."""
        return base_dtype(self.model)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Exactly the adapters' A and B (and the trainable head, when there is one)."""
        params = [p for _, a in adapter_items(self.adapters) for p in (a.lora_A, a.lora_B)]
        if self.trainable_head is not None:
            params.extend(self.trainable_head.parameters())
        return params

    def adapter_modules(self) -> dict[str, LoraAdapter]:
        return dict(adapter_items(self.adapters))

    def _head(self) -> nn.Module | None:
        """The head this part's outputs go through: the trainable one, else a float32 LM head
        on a 16-bit CPU model (:class:`Float32LMHead`), else the model's own (None)."""
        if self.trainable_head is not None:
            return self.trainable_head
        head: Float32LMHead | None = getattr(self, "_lm_head", None)
        return head


class DevicePart(Part):
    """Embedding and blocks ``[0, cut)``; ``forward(inputs) -> hidden`` (B, T, C) at the cut."""

    def __init__(self, model: SplitLM, cut: int, lora: LoraConfig, *, seed: int) -> None:
        if not 0 <= cut <= model.num_blocks:
            raise ConfigError(f"cut {cut} is outside [0, {model.num_blocks}] for this model")
        super().__init__(model, range(0, cut), lora, seed=seed)
        self.cut = cut

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model.run_blocks(self.model.embed(inputs), 0, self.cut, self.adapters)

    @staticmethod
    def backward_from(hidden: torch.Tensor, grad: torch.Tensor) -> None:
        """Backpropagate the gradient the server returned for ``hidden`` (B, T, C) into this
        part's adapters; ``grad`` is cast to ``hidden``'s dtype and device."""
        torch.autograd.backward(hidden, grad.to(device=hidden.device, dtype=hidden.dtype))


class ServerPart(Part):
    """Blocks ``[server_start, L)``, final norm and head; enters at any cut ≥ ``server_start``."""

    def __init__(
        self, model: SplitLM, server_start: int, lora: LoraConfig, *, seed: int, head: nn.Module | None = None
    ) -> None:
        if not 0 <= server_start <= model.num_blocks:
            raise ConfigError(f"server_start {server_start} is outside [0, {model.num_blocks}]")
        super().__init__(model, range(server_start, model.num_blocks), lora, seed=seed, head=head)
        self.server_start = server_start
        object.__setattr__(self, "_lm_head", _cpu_lm_head(model))  # not a submodule: nothing to train

    def forward(self, hidden: torch.Tensor, cut: int) -> torch.Tensor:
        if not self.server_start <= cut <= self.model.num_blocks:
            raise ConfigError(
                f"activations at cut {cut} cannot enter this server part, which holds blocks "
                f"[{self.server_start}, {self.model.num_blocks}); use a server_start ≤ {cut}"
            )
        hidden = self.model.run_blocks(hidden, cut, self.model.num_blocks, self.adapters)
        return self.model.head(hidden, self._head())

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model.loss(outputs, labels)


class FullPart(Part):
    """The whole model with adapters on every block (reference for verification; federated LoRA)."""

    def __init__(self, model: SplitLM, lora: LoraConfig, *, seed: int, head: nn.Module | None = None) -> None:
        super().__init__(model, range(0, model.num_blocks), lora, seed=seed, head=head)
        object.__setattr__(self, "_lm_head", _cpu_lm_head(model))  # not a submodule: nothing to train

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.model.run_blocks(self.model.embed(inputs), 0, self.model.num_blocks, self.adapters)
        return self.model.head(hidden, self._head())

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model.loss(outputs, labels)


def base_dtype(model: SplitLM) -> torch.dtype:
    """The dtype of ``model``'s (frozen) base weights: what activations at its cuts are."""
    return next(model.parameters()).dtype


def base_device(model: SplitLM) -> torch.device:
    """Where ``model``'s base weights live (adapters and inputs go there too)."""
    return next(model.parameters()).device


class CastLinear(nn.Linear):
    """A float32 trainable head: its input (B, C) of any float dtype is cast to the weight's
    dtype first (PEFT's rule for ``modules_to_save`` kept in float32); outputs float32 logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype))


def _float32_head(head: nn.Linear, device: torch.device) -> CastLinear:
    """A trainable float32 copy of ``head`` (same ``weight``/``bias`` keys) on ``device``.

    Copied, not re-initialised: building a fresh ``nn.Linear`` would draw from torch's global
    generator and shift every later random draw of the run."""
    out = copy.deepcopy(head)
    out.__class__ = CastLinear  # adds behaviour only (the input cast), no state
    assert isinstance(out, CastLinear)
    return out.to(device=device, dtype=ADAPTER_DTYPE).requires_grad_(True)


def _private_copy(model: SplitLM, keep: range, *, keep_embedding: bool, keep_head: bool) -> SplitLM:
    """A deep copy with only blocks ``keep`` (others become :class:`AbsentBlock`) and the ends asked for."""
    memo: dict[int, object] = {}
    if model.tokenizer is not None:
        memo[id(model.tokenizer)] = model.tokenizer  # immutable; share rather than copy
    for i, block in enumerate(model.blocks):
        if i not in keep:
            memo[id(block)] = AbsentBlock(i)
    tied = getattr(model.config, "tie_embeddings", False)
    if not keep_embedding and not (keep_head and tied):
        for name in ("embed_tokens", "patch_embed"):
            module = getattr(model, name, None)
            if module is not None:
                memo[id(module)] = None
    clone = copy.deepcopy(model, memo)
    return clone.freeze()


def _make_head(
    model: SplitLM, train_head: bool | None, num_classes: int | None, seed: int
) -> nn.Module | None:
    if model.family != "vit":
        if train_head or num_classes is not None:
            raise ConfigError("a trainable head / num_classes applies to ViT models only")
        return None
    from sft_actors.model.vit import ViT  # local: vit imports nothing from here, but keep split generic

    assert isinstance(model, ViT)
    device = base_device(model)
    if num_classes is not None and num_classes != model.config.num_classes:
        return _float32_head(model.new_head(num_classes, torch.Generator().manual_seed(seed)), device)
    if train_head is False:
        return None
    return _float32_head(model.head_fc, device)


def split_model(
    model: SplitLM,
    cut: int,
    *,
    server_start: int | None = None,
    lora: LoraConfig | None = None,
    seed: int = 0,
    share_base: bool = True,
    train_head: bool | None = None,
    num_classes: int | None = None,
) -> tuple[DevicePart, ServerPart]:
    """The device part ``[0, cut)`` and the server part ``[server_start, L)`` (default: ``cut``).

    ``share_base=True`` references the loaded model's frozen tensors; ``False`` gives each part a
    private copy of just the weights it runs. For a ViT the head is trainable by default
    (``train_head``), and ``num_classes`` swaps in a fresh head for a new task.
    """
    lora = lora or LoraConfig()
    start = cut if server_start is None else server_start
    if start > cut:
        raise ConfigError(
            f"server_start {start} must be ≤ cut {cut}: the server must hold the block at the cut"
        )
    device_model, server_model = model, model
    if not share_base:
        device_model = _private_copy(model, range(0, cut), keep_embedding=True, keep_head=False)
        server_model = _private_copy(
            model, range(start, model.num_blocks), keep_embedding=False, keep_head=True
        )
    device = DevicePart(device_model, cut, lora, seed=seed)
    head = _make_head(model, train_head, num_classes, seed)
    server = ServerPart(server_model, start, lora, seed=seed, head=head)
    return device, server


def make_device_part(
    model: SplitLM, cut: int, lora: LoraConfig | None = None, *, seed: int = 0
) -> DevicePart:
    """A device part sharing ``model``'s frozen weights; only its adapters are new memory."""
    return DevicePart(model, cut, lora or LoraConfig(), seed=seed)


def make_full_part(
    model: SplitLM,
    lora: LoraConfig | None = None,
    *,
    seed: int = 0,
    train_head: bool | None = None,
    num_classes: int | None = None,
) -> FullPart:
    """The whole model with adapters on every block (shares the frozen weights)."""
    return FullPart(
        model, lora or LoraConfig(), seed=seed, head=_make_head(model, train_head, num_classes, seed)
    )


def lora_state_dict(part: Part) -> dict[str, torch.Tensor]:
    """Adapters as ``{"blocks.{i}.{proj}.lora_A" | ".lora_B": tensor}``, ``i`` the global block index.

    Tensors are detached copies: averaging or sending them never aliases the live parameters.
    """
    out: dict[str, torch.Tensor] = {}
    for key, adapter in adapter_items(part.adapters):
        out[f"{key}.lora_A"] = adapter.lora_A.detach().clone()
        out[f"{key}.lora_B"] = adapter.lora_B.detach().clone()
    return out


def head_state_dict(part: Part) -> dict[str, torch.Tensor]:
    """The trainable head's tensors as ``{"head.weight", "head.bias"}`` (empty when the head is frozen)."""
    if part.trainable_head is None:
        return {}
    return {f"head.{k}": v.detach().clone() for k, v in part.trainable_head.state_dict().items()}


def load_lora_state_dict(
    part: Part, state: Mapping[str, torch.Tensor], *, strict: bool = True
) -> tuple[list[str], list[str]]:
    """Copy adapters from ``state`` into ``part``; returns (missing, unexpected) keys.

    ``strict=False`` loads the keys both sides have — e.g. a device taking its blocks out of a
    coordinator's per-block average over all blocks. Shapes must always match.
    """
    own = {}
    for key, adapter in adapter_items(part.adapters):
        own[f"{key}.lora_A"] = adapter.lora_A
        own[f"{key}.lora_B"] = adapter.lora_B
    missing = sorted(set(own) - set(state))
    unexpected = sorted(k for k in state if k not in own and not k.startswith("head."))
    if strict and (missing or unexpected):
        raise ConfigError(
            f"LoRA state does not match this part "
            f"(blocks {part.block_range.start}..{part.block_range.stop - 1}): "
            f"missing {missing[:6]}{'…' if len(missing) > 6 else ''}, "
            f"unexpected {unexpected[:6]}{'…' if len(unexpected) > 6 else ''}; "
            "pass strict=False to load the overlap"
        )
    with torch.no_grad():
        for key, param in own.items():
            if key not in state:
                continue
            value = state[key]
            if value.shape != param.shape:
                raise ConfigError(
                    f"LoRA tensor {key} has shape {tuple(value.shape)}, "
                    f"this part expects {tuple(param.shape)} "
                    "(different rank or model?)"
                )
            param.copy_(value.to(param.dtype))
        head_keys = {k: v for k, v in state.items() if k.startswith("head.")}
        if head_keys and part.trainable_head is not None:
            part.trainable_head.load_state_dict({k[len("head.") :]: v for k, v in head_keys.items()})
    return missing, unexpected
