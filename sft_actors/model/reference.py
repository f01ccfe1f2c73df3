"""Our model against transformers (+ PEFT) on the same checkpoint: ``sft model verify --reference``.

Loads ``AutoModelForCausalLM.from_pretrained(directory)`` in fp32, runs the same ids through it
and through our whole model, and compares the logits. Then it wraps the reference with PEFT
(``LoraConfig`` + ``get_peft_model``, same rank, alpha and target modules), copies our adapter
values in (:func:`~sft_actors.model.export.peft_key` gives the names), backpropagates the same
next-token loss through both and compares every LoRA gradient.

transformers and PEFT are test/dev dependencies: they are imported here, inside the functions,
and only this command path reaches them. A missing one is a :class:`ConfigError` saying what to
install.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sft_actors.errors import ConfigError, ModelSpecError
from sft_actors.model.base import SplitLM
from sft_actors.model.config import LlamaConfig, LoraConfig
from sft_actors.model.export import peft_key
from sft_actors.model.lora import randomize_lora_B
from sft_actors.model.split import make_full_part
from sft_actors.model.verify import sample_batch

_HF_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
_HF_MLP = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@dataclass(kw_only=True, slots=True, frozen=True)
class ReferenceResult:
    reference: str
    max_abs_logit_diff_vs_reference: float
    max_rel_lora_grad_diff_vs_reference: float  # max over adapters of max|Δg| / max|g_reference|
    lora_grads_compared_vs_reference: int
    loss_reference: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"--reference transformers needs the {module!r} package (a dev dependency): "
            f"pip install transformers peft"
        ) from exc


def verify_against_transformers(
    model: SplitLM,
    directory: Path,
    *,
    batch: int = 2,
    seq: int = 16,
    lora: LoraConfig | None = None,
    seed: int = 0,
) -> ReferenceResult:
    """Logits and LoRA gradients of ``model`` vs transformers + PEFT loading ``directory``."""
    if not isinstance(model.config, LlamaConfig):
        raise ConfigError("--reference transformers compares Llama-family checkpoints only")
    transformers, peft = _require("transformers"), _require("peft")
    lora = lora or LoraConfig()
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
    auto = transformers.AutoModelForCausalLM
    ids, labels = sample_batch(model, batch, seq, seed=seed)
    try:  # a config transformers refuses (or cannot run) is one error line, not a traceback
        ref = auto.from_pretrained(str(directory), **{dtype_kw: torch.float32}).eval()
        with torch.no_grad():
            plain = ref(input_ids=ids).logits
    except Exception as exc:  # any failure inside transformers is the reference's
        detail = " ".join(str(exc).split()) or repr(exc)
        raise ModelSpecError(
            f"transformers could not load {directory} as a reference: {type(exc).__name__}: {detail}"
        ) from exc
    ours = model.float()

    whole = make_full_part(ours, lora, seed=seed)
    randomize_lora_B(whole.adapters, seed=seed + 1)
    out = whole(ids)
    loss = whole.loss(out, labels)
    torch.autograd.backward(loss)

    with torch.no_grad():
        logit_diff = float((ours(ids) - plain).abs().max())

    names = {**_HF_MODULES, **_HF_MLP}
    targets = sorted({names[p] for p in lora.projections("llama")})
    peft_cfg = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=targets)
    wrapped = peft.get_peft_model(ref, peft_cfg)
    params = dict(wrapped.named_parameters())
    adapters = whole.adapter_modules()
    with torch.no_grad():
        for key, adapter in adapters.items():
            _, block, proj = key.split(".")
            for which in ("lora_A", "lora_B"):
                name = _peft_param(peft_key("llama", int(block), proj, which))
                params[name].copy_(getattr(adapter, which).float())
    ref_loss = model.loss(wrapped(input_ids=ids).logits, labels)
    torch.autograd.backward(ref_loss)

    rel = 0.0
    for key, adapter in adapters.items():
        _, block, proj = key.split(".")
        for which in ("lora_A", "lora_B"):
            g_ref = params[_peft_param(peft_key("llama", int(block), proj, which))].grad
            g_ours = getattr(adapter, which).grad
            if g_ref is None or g_ours is None:
                raise ConfigError(f"no gradient for {key}.{which} in one of the models")  # a bug
            rel = max(rel, float((g_ours - g_ref).abs().max() / g_ref.abs().max().clamp_min(1e-30)))
    return ReferenceResult(
        reference=f"transformers {transformers.__version__} + peft {peft.__version__}",
        max_abs_logit_diff_vs_reference=logit_diff,
        max_rel_lora_grad_diff_vs_reference=rel,
        lora_grads_compared_vs_reference=2 * len(adapters),
        loss_reference=float(ref_loss.detach()),
    )


def _peft_param(key: str) -> str:
    """A saved PEFT key (``….lora_A.weight``) → the live parameter name (``….lora_A.default.weight``)."""
    return key.removesuffix(".weight") + ".default.weight"
