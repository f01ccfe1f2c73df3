"""Loaders for weights users have locally: a Hugging Face Llama-family directory (Llama, Mistral,
Qwen2, Qwen3; config parsing in :mod:`hf_config`), timm/HF ViT safetensors.

Tensor names are mapped onto ours; anything unexpected is an error rather than silently
ignored, because a half-loaded checkpoint produces plausible-looking garbage.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from sft_actors.errors import ModelSpecError
from sft_actors.model import hf_checkpoint, hf_config
from sft_actors.model.config import LlamaConfig, ViTConfig
from sft_actors.model.tokenizer import BpeTokenizer

# HF module names <-> ours (defined beside the header checks, which need them too).
_LLAMA_BLOCK = hf_checkpoint.HF_LLAMA_BLOCK
HF_LLAMA_NAMES = hf_checkpoint.HF_LLAMA_NAMES


def hf_tensor_name(ours: str) -> str:
    """Our state-dict name → the Hugging Face tensor name (for error messages)."""
    parts = ours.split(".")
    if len(parts) == 4 and parts[0] == "blocks" and parts[2] in HF_LLAMA_NAMES:
        return f"model.layers.{parts[1]}.{HF_LLAMA_NAMES[parts[2]]}.{parts[3]}"
    return ours if ours == "lm_head.weight" else f"model.{ours}"


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelSpecError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelSpecError(f"{path} is not a JSON object")
    return data


def load_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, in its stored dtype (the caller casts).

    A sharded checkpoint (``model.safetensors.index.json``) loads exactly the files its index
    names, and each tensor must sit in the shard the index says; otherwise ``model.safetensors``,
    else every ``*.safetensors`` file.
    """
    files, weight_map = hf_checkpoint.checkpoint_files(directory)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(str(f))
        if weight_map is not None:
            stray = sorted(k for k in part if weight_map.get(k) != f.name)
            if stray:
                raise ModelSpecError(f"{f} holds tensors its index does not place there: {stray[:5]}")
        state.update(part)
    if weight_map is not None and (absent := sorted(set(weight_map) - set(state))):
        index = directory / hf_checkpoint.SHARD_INDEX
        raise ModelSpecError(f"{index} lists tensors no shard holds: {absent[:5]}")
    return state


# --- Llama family ----------------------------------------------------------------------------
def hf_llama_config(directory: Path, *, check_weights: bool = True) -> LlamaConfig:
    """The directory's config.json as a :class:`LlamaConfig` (see :mod:`hf_config`), with the
    checkpoint's tensors checked against it from the safetensors headers (:mod:`hf_checkpoint`)
    and the head untied where transformers would untie it."""
    config = hf_config.hf_llama_config(directory, read_json(directory / "config.json"))
    if check_weights:
        hf_checkpoint.check_hf_checkpoint(directory, config)
        config = hf_checkpoint.resolve_tying(directory, config)
    return config


def load_hf_llama(directory: Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """(config, state dict in our names) of a checked Hugging Face Llama-family directory."""
    config = hf_config.hf_llama_config(directory, read_json(directory / "config.json"))
    hf_checkpoint.check_hf_checkpoint(directory, config)
    state = load_safetensors_dir(directory)
    config = hf_checkpoint.resolve_tying(directory, config, state)
    return config, hf_llama_state_dict(state, config)


def hf_llama_state_dict(state: dict[str, torch.Tensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
    """HF names → ours (weights, biases, norms); an unknown tensor is an error."""
    out: dict[str, torch.Tensor] = {}
    block = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
    for name, tensor in state.items():
        if name == "model.embed_tokens.weight":
            out["embed_tokens.weight"] = tensor
        elif name == "model.norm.weight":
            out["norm.weight"] = tensor
        elif name == "lm_head.weight":  # tied: hf_checkpoint.resolve_tying removed an equal one
            out["lm_head.weight"] = tensor
        elif (m := block.fullmatch(name)) and m.group(2) in _LLAMA_BLOCK:
            out[f"blocks.{m.group(1)}.{_LLAMA_BLOCK[m.group(2)]}.{m.group(3)}"] = tensor
        elif not name.endswith("rotary_emb.inv_freq"):
            raise ModelSpecError(f"unexpected tensor {name!r} in a {config.arch} checkpoint")
    return out


def hf_tokenizer(directory: Path) -> BpeTokenizer | None:
    """The directory's tokenizer.json, if any (special ids from config.json; the chat template
    from ``chat_template.jinja`` or ``tokenizer_config.json`` ``chat_template``, if any)."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    cfg = read_json(directory / "config.json")
    eos = cfg.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    pad = cfg.get("pad_token_id")
    from sft_actors.data.chat_template import template_from_config

    jinja, tok_cfg = directory / "chat_template.jinja", directory / "tokenizer_config.json"
    template = jinja.read_text(encoding="utf-8") if jinja.is_file() else None
    if template is None and tok_cfg.is_file():
        template = template_from_config(read_json(tok_cfg).get("chat_template"), str(tok_cfg))
    return BpeTokenizer.from_json(
        path.read_text(),
        bos_id=cfg.get("bos_token_id"),
        eos_id=eos,
        pad_id=int(pad if pad is not None else 0),
        chat_template=template,
    )


# --- ViT -------------------------------------------------------------------------------------
_HF_VIT_BLOCK = {
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_TIMM_VIT_KEYS = re.compile(
    r"(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)|head\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias))"
)


def is_hf_vit(state: dict[str, torch.Tensor]) -> bool:
    return any("embeddings.patch_embeddings" in k for k in state)


def hf_vit_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``ViTForImageClassification``/``ViTModel`` names → timm names (q, k, v fused into qkv)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    block = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)")
    for name, tensor in state.items():
        key = name.removeprefix("vit.")
        if key == "embeddings.cls_token":
            out["cls_token"] = tensor
        elif key == "embeddings.position_embeddings":
            out["pos_embed"] = tensor
        elif key.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + key.rsplit(".", 1)[1]] = tensor
        elif key.startswith("layernorm."):
            out["norm." + key.rsplit(".", 1)[1]] = tensor
        elif key.startswith("classifier."):
            out["head." + key.rsplit(".", 1)[1]] = tensor
        elif key.startswith("pooler."):
            continue  # ViTModel's pooler is not used for CLS-token classification
        elif m := block.fullmatch(key):
            idx, mod, kind = m.groups()
            if mod.startswith("attention.attention."):
                qkv.setdefault((idx, kind), {})[mod.rsplit(".", 1)[1]] = tensor
            elif mod in _HF_VIT_BLOCK:
                out[f"blocks.{idx}.{_HF_VIT_BLOCK[mod]}.{kind}"] = tensor
            else:
                raise ModelSpecError(f"unexpected tensor {name!r} in an HF ViT checkpoint")
        else:
            raise ModelSpecError(f"unexpected tensor {name!r} in an HF ViT checkpoint")
    for (idx, kind), parts in qkv.items():
        out[f"blocks.{idx}.attn.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], dim=0
        )
    return out


def vit_config_from_state(
    state: dict[str, torch.Tensor], *, num_heads: int | None, norm_eps: float, num_classes: int | None
) -> ViTConfig:
    """Architecture from tensor shapes (timm names); heads default to head_dim 64, as in ViT-Ti/S/B/L."""
    for key in state:
        if not _TIMM_VIT_KEYS.fullmatch(key):
            raise ModelSpecError(
                f"unexpected tensor {key!r}: only plain CLS-token ViTs "
                "(timm vit_*_patch*_* layout) are supported"
            )
    try:
        patch = state["patch_embed.proj.weight"]  # (C, in_chans, p, p)
        pos = state["pos_embed"]  # (1, 1+N, C)
    except KeyError as exc:
        raise ModelSpecError(f"ViT checkpoint lacks {exc.args[0]!r}") from exc
    dim, in_chans, p, _ = patch.shape
    side = math.isqrt(pos.shape[1] - 1)
    if side * side != pos.shape[1] - 1:
        raise ModelSpecError(f"pos_embed has {pos.shape[1]} tokens: not 1 CLS + a square grid of patches")
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    head = state.get("head.weight")
    return ViTConfig(
        image_size=side * p,
        patch_size=p,
        in_chans=in_chans,
        num_classes=num_classes or (head.shape[0] if head is not None else 1000),
        dim=dim,
        num_blocks=depth,
        num_heads=num_heads or max(1, dim // 64),
        mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0],
        norm_eps=norm_eps,
    )


def read_vit_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(timm-named state, HF config.json or {}) from a ``.safetensors`` file or a folder holding one."""
    if path.is_dir():
        state = load_safetensors_dir(path)
        cfg = read_json(path / "config.json") if (path / "config.json").is_file() else {}
    else:
        state, cfg = load_file(str(path)), {}
    if is_hf_vit(state):
        state = hf_vit_to_timm(state)
    return state, cfg


def vit_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm names → our module names (the head is ``head_fc``: ``head`` is a method)."""
    return {("head_fc." + k[5:] if k.startswith("head.") else k): v for k, v in state.items()}
