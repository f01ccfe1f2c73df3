"""Adapters on disk: our safetensors layout, the PEFT layout, and merging into base weights.

Our layout: one safetensors file, keys ``blocks.{i}.{proj}.lora_A|lora_B`` (global block index),
the LoRA config in the file's metadata. PEFT layout: a folder with ``adapter_config.json`` and
``adapter_model.safetensors`` using Hugging Face module names (Llama:
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``; ViT: timm names,
``base_model.model.blocks.{i}.attn.qkv.lora_A.weight``).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sft_actors.errors import ConfigError, ModelSpecError
from sft_actors.model.base import SplitLM
from sft_actors.model.config import LlamaConfig, LoraConfig
from sft_actors.model.hf_loader import HF_LLAMA_NAMES
from sft_actors.model.rope import hf_rope_parameters
from sft_actors.model.tokenizer import BpeTokenizer

_KEY = re.compile(r"blocks\.(\d+)\.(\w+)\.(lora_A|lora_B)")
_HF_LLAMA_MODULE = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
_TIMM_VIT_MODULE = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


def _parse(key: str) -> tuple[int, str, str]:
    m = _KEY.fullmatch(key)
    if m is None:
        raise ConfigError(f"{key!r} is not a LoRA key of the form blocks.{{i}}.{{proj}}.lora_A|lora_B")
    return int(m.group(1)), m.group(2), m.group(3)


def save_lora(path: str | Path, state: Mapping[str, torch.Tensor], lora: LoraConfig) -> None:
    """Adapters as safetensors, LoRA config in the metadata."""
    for key in state:
        _parse(key)
    meta = {
        "lora_config": json.dumps(
            {
                "rank": lora.rank,
                "alpha": lora.alpha,
                "dropout": lora.dropout,
                "targets": list(lora.targets),
                "mlp": lora.mlp,
            }
        )
    }
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata=meta)


def load_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], LoraConfig | None]:
    """Adapters and (when recorded) their LoRA config from :func:`save_lora`'s file."""
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            state[key] = f.get_tensor(key)
    cfg = json.loads(meta["lora_config"]) if "lora_config" in meta else None
    lora = (
        None
        if cfg is None
        else LoraConfig(
            rank=cfg["rank"],
            alpha=cfg["alpha"],
            dropout=cfg["dropout"],
            targets=tuple(cfg["targets"]),
            mlp=cfg["mlp"],
        )
    )
    return state, lora


def peft_key(family: str, block: int, proj: str, which: str) -> str:
    if family == "llama":
        return f"base_model.model.model.layers.{block}.{_HF_LLAMA_MODULE[proj]}.{which}.weight"
    return f"base_model.model.blocks.{block}.{_TIMM_VIT_MODULE[proj]}.{which}.weight"


def export_peft(
    directory: str | Path,
    state: Mapping[str, torch.Tensor],
    lora: LoraConfig,
    *,
    family: str,
    base_model_name_or_path: str = "",
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's LoRA layout)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    blocks: set[int] = set()
    modules: set[str] = set()
    for key, value in state.items():
        block, proj, which = _parse(key)
        blocks.add(block)
        table = _HF_LLAMA_MODULE if family == "llama" else _TIMM_VIT_MODULE
        if proj not in table:
            raise ConfigError(f"projection {proj!r} does not exist in a {family} model")
        modules.add(table[proj].rsplit(".", 1)[1])
        tensors[peft_key(family, block, proj, which)] = value.detach().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if family == "llama" else None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(modules),
        "layers_to_transform": sorted(blocks),
        "layers_pattern": "layers" if family == "llama" else "blocks",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def projection_module(model: SplitLM, block: int, proj: str) -> nn.Linear:
    target = model.blocks[block]
    path = proj if model.family == "llama" else _TIMM_VIT_MODULE[proj]
    for part in path.split("."):
        target = getattr(target, part)
    assert isinstance(target, nn.Linear)
    return target


def merge_lora(model: SplitLM, state: Mapping[str, torch.Tensor], lora: LoraConfig) -> SplitLM:
    """A copy of ``model`` with ``W + (alpha / r) · B @ A`` in place of each adapted ``W``.

    The loaded model is left untouched (its frozen tensors may be shared by live parts).
    """
    memo: dict[int, object] = {}
    if model.tokenizer is not None:
        memo[id(model.tokenizer)] = model.tokenizer
    merged = copy.deepcopy(model, memo)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        block, proj, which = _parse(key)
        pairs.setdefault((block, proj), {})[which] = value
    with torch.no_grad():
        for (block, proj), ab in pairs.items():
            if set(ab) != {"lora_A", "lora_B"}:
                raise ConfigError(f"block {block} {proj}: both lora_A and lora_B are needed to merge")
            layer = projection_module(merged, block, proj)
            delta = (ab["lora_B"].float() @ ab["lora_A"].float()) * lora.scale
            layer.weight.copy_((layer.weight.float() + delta).to(layer.weight.dtype))
    return merged


_HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def _hf_family_fields(config: LlamaConfig) -> dict[str, Any]:
    """The model-type specific config.json fields; ConfigError for what that type cannot express."""
    arch = config.arch
    fields: dict[str, Any] = {}
    no_window = config.sliding_window is None

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ConfigError(
                f"a {arch} config.json cannot express {what}; transformers would compute otherwise"
            )

    if arch == "llama":
        need(config.qkv_bias == config.o_bias, "q/k/v biases without an o bias (or the reverse)")
        need(not config.qk_norm and no_window, "q/k norms or a sliding window")
        fields.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    elif arch == "mistral":
        need(
            not (config.qkv_bias or config.o_bias or config.mlp_bias or config.qk_norm), "biases or q/k norms"
        )
        need(not config.full_attention_blocks, "blocks exempt from the sliding window")
        fields["sliding_window"] = config.sliding_window
    else:
        need(not config.mlp_bias, "an MLP bias")
        if arch == "qwen2":
            need(
                config.qkv_bias and not config.o_bias and not config.qk_norm, "other than q/k/v biases alone"
            )
        else:
            need(
                config.qk_norm and config.qkv_bias == config.o_bias,
                "no q/k norms, or q/k/v and o biases apart",
            )
            fields["attention_bias"] = config.qkv_bias
        types = [
            "full_attention" if config.window(i) is None else "sliding_attention"
            for i in range(config.num_blocks)
        ]
        fields.update(
            use_sliding_window=not no_window,
            sliding_window=config.sliding_window,
            max_window_layers=len(config.full_attention_blocks) if not no_window else config.num_blocks,
            layer_types=types,
        )
    return fields


def export_hf_llama(model: SplitLM, directory: str | Path, *, base: str | Path | None = None) -> Path:
    """A Llama-family model (e.g. merged) as a Hugging Face folder: config.json (the model type of
    ``config.arch``, with its RoPE scaling, biases, head_dim, window), model.safetensors and
    generation_config.json, which ``AutoModelForCausalLM.from_pretrained`` loads back to the same
    logits; with a BPE tokenizer also tokenizer.json and tokenizer_config.json (special tokens,
    chat template, ``model_max_length``), which ``AutoTokenizer.from_pretrained`` loads.

    ``base`` is the Hugging Face folder the model came from, if any: its ``pad_token_id``,
    ``tokenizer_config.json`` and ``generation_config.json`` are kept (what this function would
    write fills only what they lack). Without one, ``pad_token_id`` is the tokenizer's pad id
    only where that id is a special token (a byte tokenizer, or a pad id that defaulted to 0 on an
    ordinary token, has none).

    Raises :class:`ConfigError` for what transformers cannot express (e.g. a GGUF ``rope_freqs``).
    """
    config = model.config
    if not isinstance(config, LlamaConfig):
        raise ConfigError("export_hf_llama exports Llama-family models only")
    try:
        rope = hf_rope_parameters(config.rope_scaling, config.rope_theta)
    except ModelSpecError as exc:
        raise ConfigError(f"cannot export to Hugging Face: {exc}") from exc
    family = _hf_family_fields(config)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key == "embed_tokens.weight":
            name = "model.embed_tokens.weight"
        elif key == "norm.weight":
            name = "model.norm.weight"
        elif key == "lm_head.weight":
            name = key
        else:
            _, idx, ours, kind = key.split(".")
            name = f"model.layers.{idx}.{HF_LLAMA_NAMES[ours]}.{kind}"
        tensors[name] = value.detach().contiguous()
    tok = model.tokenizer
    base_dir = Path(base) if base is not None else None
    pad = _base_pad(tok, base_dir)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    hf_config = {
        "architectures": [_HF_ARCHITECTURES[config.arch]],
        "model_type": config.arch,
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "num_hidden_layers": config.num_blocks,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.ffn_dim,
        # transformers ≥ 5 reads rope_parameters (rope_scaling wins when non-empty, with the
        # top-level rope_theta); < 5 reads rope_theta + rope_scaling. Both say the same here.
        "rope_theta": config.rope_theta,
        "rope_parameters": rope,
        "rope_scaling": None if scaling["rope_type"] == "default" else scaling,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        # dynamic NTK: max_seq_len is max_position_embeddings × factor (hf_config.context_length)
        "max_position_embeddings": (
            config.rope_scaling.original_max_position_embeddings
            if config.rope_scaling is not None and config.rope_scaling.kind == "dynamic"
            else config.max_seq_len
        ),
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        **family,
        # transformers >= 4.56 reads (and 5 writes) dtype; older ones read torch_dtype: both
        "dtype": dtype,
        "torch_dtype": dtype,
        "bos_token_id": tok.bos_id if tok else None,
        "eos_token_id": tok.eos_id if tok else None,
        "pad_token_id": pad,
    }
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    generation = {"bos_token_id": hf_config["bos_token_id"], "eos_token_id": hf_config["eos_token_id"]}
    generation |= {"pad_token_id": pad} if pad is not None else {}
    _write_json(out / "generation_config.json", generation, base_dir, "generation_config.json")
    if isinstance(tok, BpeTokenizer):
        (out / "tokenizer.json").write_text(tok.to_json())
        names = {"bos_token": tok.bos_id, "eos_token": tok.eos_id, "pad_token": pad}
        tok_config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **{k: tok.hf.id_to_token(v) if v is not None else None for k, v in names.items()},
            "model_max_length": config.max_seq_len,
            "clean_up_tokenization_spaces": False,
        }
        tok_config |= {"chat_template": tok.chat_template} if tok.chat_template else {}
        _write_json(out / "tokenizer_config.json", tok_config, base_dir, "tokenizer_config.json")
    return out


def _base_pad(tok: object, base_dir: Path | None) -> int | None:
    """The exported ``pad_token_id``: the base folder's, else the tokenizer's pad id if it is a
    special token (a tokenizer without one pads with 0 without 0 being a pad token)."""
    if base_dir is not None and (base_dir / "config.json").is_file():
        pad = json.loads((base_dir / "config.json").read_text()).get("pad_token_id")
        return pad if isinstance(pad, int) else None
    if not isinstance(tok, BpeTokenizer):
        return None
    special = {i for i, t in tok.hf.get_added_tokens_decoder().items() if t.special}
    return tok.pad_id if tok.pad_id in special else None


def _write_json(path: Path, ours: dict[str, Any], base_dir: Path | None, name: str) -> None:
    """``ours`` as JSON in ``path``, under what the base folder's file of ``name`` says."""
    theirs = base_dir / name if base_dir is not None else None
    data = dict(ours)
    if theirs is not None and theirs.is_file():
        data |= {k: v for k, v in json.loads(theirs.read_text()).items() if v is not None or k not in data}
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False))
