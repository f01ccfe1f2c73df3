"""A Hugging Face ``config.json`` of a Llama-family decoder → :class:`LlamaConfig`, or a refusal.

Supported ``model_type``: ``llama`` (Llama 1-3.x), ``mistral``, ``qwen2`` (Qwen2/2.5), ``qwen3``.
Each field is read the way transformers 5 reads it — including its per-class defaults for
absent fields (Mistral's ``sliding_window`` 4096, Qwen3's ``head_dim`` 128, Qwen2's hard-wired
q/k/v biases) — and every field is either honoured, known not to change the math, or refused
with a :class:`ModelSpecError` naming the file, the field and what is supported. Values are typed
as strictly as transformers' strict configs: integers are JSON integers (not floats, not bools,
not strings), floats JSON numbers, flags JSON booleans. A field this
module does not know is refused unless its value is empty (``null``/``false``/``0``): it may
belong to a variant (softcapping, quantisation, multipliers …) whose math we would silently get
wrong.

RoPE: transformers ≥ 5 writes ``rope_parameters``; older configs write ``rope_theta`` +
``rope_scaling``. With both, transformers 5 uses ``rope_scaling`` when it is non-empty (and then
takes ``rope_theta`` from the top level, not from ``rope_parameters``) — mirrored here.

Context: ``max_position_embeddings``, or with dynamic NTK RoPE ``max_position_embeddings ×
factor`` (:func:`context_length`).

Sliding window: honoured with a mask (``LlamaBlock``), per block as transformers decides it —
Mistral on every block when ``sliding_window`` is set; Qwen2/3 only with ``use_sliding_window``,
on the blocks ``layer_types`` marks ``sliding_attention`` (by default those ≥ ``max_window_layers``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sft_actors.errors import ModelSpecError
from sft_actors.model.config import ARCHS, Arch, LlamaConfig, RopeScaling
from sft_actors.model.rope import rope_scaling_from_hf

SUPPORTED_MODEL_TYPES: tuple[Arch, ...] = ARCHS

# Fields that never change the forward math (metadata, generation and serving settings).
_HARMLESS = {
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "use_cache",
    "initializer_range",
    "pretraining_tp",  # transformers 5 ignores it; in 4.x it only re-sliced the same matmuls
    "name_or_path",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    "id2label",
    "label2id",
    "num_labels",
    "problem_type",
    "tokenizer_class",
    "task_specific_params",
    "chunk_size_feed_forward",
    "is_decoder",
    "is_encoder_decoder",
    "prefix",
    "finetuning_task",
    "max_length",
    "min_length",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "num_beams",
}
# Fields read below, per model type (anything else is judged by the unknown-field rule).
_READ_COMMON = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "partial_rotary_factor",
    "attention_dropout",
    "head_dim",
}
_READ = {
    "llama": _READ_COMMON | {"attention_bias", "mlp_bias"},
    "mistral": _READ_COMMON | {"sliding_window"},
    "qwen2": _READ_COMMON | {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"},
    "qwen3": _READ_COMMON
    | {"attention_bias", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types"},
}
# transformers 5's class defaults where they differ by model type.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "num_key_value_heads": None},
    "mistral": {"max_position_embeddings": 4096 * 32, "num_key_value_heads": 8, "sliding_window": 4096},
    "qwen2": {"max_position_embeddings": 32768, "num_key_value_heads": 32},
    "qwen3": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "head_dim": 128},
}


def _fail(where: str, field: str, message: str) -> ModelSpecError:
    return ModelSpecError(f"{where}: field {field!r} {message}")


def _int(cfg: dict[str, Any], key: str, where: str, default: Any = None) -> Any:
    """``cfg[key]`` as transformers' strict config accepts it: a JSON integer (not a bool)."""
    if cfg.get(key) is None:
        return default
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, key, f"must be a JSON integer, got {value!r} ({type(value).__name__})")
    return value


def _float(cfg: dict[str, Any], key: str, where: str, default: Any = None) -> Any:
    """``cfg[key]`` as a float: a JSON number (not a bool, not a string)."""
    if cfg.get(key) is None:
        return None if default is None else float(default)
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(where, key, f"must be a JSON number, got {value!r} ({type(value).__name__})")
    return float(value)


def _bool(cfg: dict[str, Any], key: str, where: str, default: bool = False) -> bool:
    """``cfg[key]`` as transformers' strict config accepts it: a JSON ``true``/``false``."""
    value = cfg.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _fail(where, key, f"must be true or false, got {value!r} ({type(value).__name__})")
    return value


def _require(cfg: dict[str, Any], key: str, where: str) -> int:
    if key not in cfg or cfg[key] is None:
        raise _fail(where, key, "is missing; add that field (a Llama-family config.json must set it)")
    return int(_int(cfg, key, where))


def _check_fields(cfg: dict[str, Any], model_type: str, where: str) -> None:
    """Refuse a field we neither read nor know to be harmless, unless it is empty."""
    for key, value in cfg.items():
        if key in _READ[model_type] or key in _HARMLESS or key.startswith("_"):
            continue
        if value in (None, False, 0, "", [], {}):
            continue
        raise _fail(
            where,
            key,
            f"= {value!r} is not supported for model_type {model_type!r}: it is not a field this "
            f"loader honours (it may change the model's math); supported fields: {sorted(_READ[model_type])}",
        )


def _rope(cfg: dict[str, Any], max_pos: int, where: str) -> tuple[float, Any]:
    """(rope_theta, RopeScaling | None), choosing between the two spellings as transformers 5 does."""
    scaling, parameters = cfg.get("rope_scaling"), cfg.get("rope_parameters")
    chosen = scaling if scaling else parameters
    field = "rope_scaling" if scaling else "rope_parameters"
    if chosen is None:
        chosen = {}
    if not isinstance(chosen, dict):
        raise _fail(where, field, f"must be an object, got {chosen!r}")
    theta = _float(chosen, "rope_theta", where) if "rope_theta" in chosen else None
    theta = _float(cfg, "rope_theta", where, 10000.0) if theta is None else theta
    params = dict(chosen)
    if cfg.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", cfg["partial_rotary_factor"])
    return theta, rope_scaling_from_hf(params, max_position_embeddings=max_pos, where=f"{where} ({field})")


def _biases(cfg: dict[str, Any], model_type: str, where: str) -> tuple[bool, bool, bool]:
    """(q/k/v bias, o bias, MLP bias) as each transformers class wires them."""
    bias = _bool(cfg, "attention_bias", where)
    if model_type == "llama":
        return bias, bias, _bool(cfg, "mlp_bias", where)
    if model_type == "qwen3":
        return bias, bias, False
    if model_type == "qwen2":
        if cfg.get("attention_bias") is False:
            raise _fail(
                where,
                "attention_bias",
                "= false: Qwen2 always has q/k/v biases (transformers hard-wires them)",
            )
        return True, False, False
    return False, False, False  # mistral: attention_bias is not read (and refused above if set)


def _sliding(
    cfg: dict[str, Any], model_type: str, num_blocks: int, where: str
) -> tuple[int | None, tuple[int, ...]]:
    """(sliding_window, blocks exempt from it) as transformers applies them."""
    if model_type == "llama":
        return None, ()
    window = _int(cfg, "sliding_window", where, _DEFAULTS[model_type].get("sliding_window"))
    if model_type == "mistral":
        if cfg.get("layer_types"):
            raise _fail(
                where, "layer_types", "is not read by transformers' Mistral (one window for every block)"
            )
        return (None if window is None else int(window)), ()
    types = cfg.get("layer_types")
    if not _bool(cfg, "use_sliding_window", where):
        if isinstance(types, list) and "sliding_attention" in types:
            # transformers' Qwen2/3 set sliding_window = None without use_sliding_window, and then
            # cannot build the sliding mask its layer_types ask for (ValueError at the forward).
            raise _fail(
                where,
                "layer_types",
                "marks blocks 'sliding_attention' while use_sliding_window is false: transformers "
                "cannot run that (no window); set use_sliding_window: true or make every block "
                "'full_attention'",
            )
        return None, ()  # transformers' Qwen2/3 drop sliding_window unless use_sliding_window
    if window is None:
        raise _fail(where, "sliding_window", "is null while use_sliding_window is true")
    if types is None:
        first = int(_int(cfg, "max_window_layers", where, 28))
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_blocks)]
    if len(types) != num_blocks or set(types) - {"full_attention", "sliding_attention"}:
        raise _fail(
            where,
            "layer_types",
            f"= {types!r}: need {num_blocks} entries of 'full_attention' / 'sliding_attention'",
        )
    return int(window), tuple(i for i, t in enumerate(types) if t == "full_attention")


def context_length(max_position_embeddings: int, scaling: RopeScaling | None) -> int:
    """The longest sequence the model is meant to run: ``max_position_embeddings``, or with
    dynamic NTK RoPE ``max_position_embeddings × factor`` (dynamic scaling exists to run past
    ``max_position_embeddings``: transformers grows the base there, and only there)."""
    if scaling is not None and scaling.kind == "dynamic":
        return int(max_position_embeddings * scaling.factor)
    return max_position_embeddings


def hf_llama_config(directory: Path, cfg: dict[str, Any]) -> LlamaConfig:
    """``cfg`` (the parsed ``directory/config.json``) as a :class:`LlamaConfig`, or a refusal."""
    where = str(directory / "config.json")
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise _fail(
            where,
            "model_type",
            f"= {model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}",
        )
    _check_fields(cfg, model_type, where)
    defaults = _DEFAULTS[model_type]
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
        raise _fail(where, "hidden_act", f"= {cfg['hidden_act']!r} is not supported (silu only)")
    if (_float(cfg, "attention_dropout", where) or 0.0) != 0.0:
        raise _fail(where, "attention_dropout", f"= {cfg['attention_dropout']} is not supported (0 only)")
    if model_type == "mistral" and cfg.get("attention_bias"):
        raise _fail(where, "attention_bias", "is not read by transformers' Mistral (no biases); remove it")
    heads = _require(cfg, "num_attention_heads", where)
    dim = _require(cfg, "hidden_size", where)
    num_blocks = _require(cfg, "num_hidden_layers", where)
    head_dim = _int(cfg, "head_dim", where, defaults.get("head_dim"))
    kv_heads = _int(cfg, "num_key_value_heads", where, defaults["num_key_value_heads"])
    max_pos = int(_int(cfg, "max_position_embeddings", where) or defaults["max_position_embeddings"])
    theta, scaling = _rope(cfg, max_pos, where)
    qkv_bias, o_bias, mlp_bias = _biases(cfg, model_type, where)
    window, full_blocks = _sliding(cfg, model_type, num_blocks, where)
    try:
        return LlamaConfig(
            vocab_size=_require(cfg, "vocab_size", where),
            dim=dim,
            num_blocks=num_blocks,
            num_heads=heads,
            num_kv_heads=int(kv_heads or heads),
            ffn_dim=_require(cfg, "intermediate_size", where),
            rope_theta=theta,
            norm_eps=float(_float(cfg, "rms_norm_eps", where, 1e-6)),
            tie_embeddings=_bool(cfg, "tie_word_embeddings", where),
            max_seq_len=context_length(max_pos, scaling),
            arch=model_type,
            explicit_head_dim=None if head_dim is None or int(head_dim) * heads == dim else int(head_dim),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            qk_norm=model_type == "qwen3",
            rope_scaling=scaling,
            sliding_window=window,
            full_attention_blocks=full_blocks,
        )
    except ModelSpecError as exc:
        raise ModelSpecError(f"{where}: {exc}") from exc
