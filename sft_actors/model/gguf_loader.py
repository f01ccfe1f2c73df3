"""Llama-family GGUF files → our config, fp32 state dict and tokenizer, with a local cache.

Architectures: ``llama`` (Llama 1-3.x and Mistral), ``qwen2`` (q/k/v bias tensors), ``qwen3``
(``attn_q_norm``/``attn_k_norm``, ``attention.key_length`` as head_dim). llama.cpp's converter
permutes the rows of the Q and K projections of ``llama`` only (weights and biases), so that
RoPE can rotate interleaved pairs; our Llama (like HF) rotates halves, so :func:`unpermute_qk`
undoes it. qwen2/qwen3 are written unpermuted (llama.cpp rotates them NeoX-style).

RoPE scaling: ``{arch}.rope.scaling.type`` ``linear`` (+ ``factor``) and ``yarn`` (+ ``factor``,
``original_context_length``, ``yarn_beta_fast``/``yarn_beta_slow``), and a ``rope_freqs`` tensor
(Llama 3's per-frequency divisors, as ``ggml_rope_ext`` divides). Every other ``{arch}.*`` key is
refused unless it is known not to change the math, except ``{arch}.attention.sliding_window``,
which llama.cpp does not read for these architectures: not applied, with a warning
(:func:`_ignore_sliding_window`).

Parsing the metadata (≈50k vocabulary strings) and dequantising take seconds, so the result is
cached under ``$XDG_CACHE_HOME/sft_actors/gguf/<sha256[:16]>-<size>/`` (default
``~/.cache/sft_actors/...``): ``weights.safetensors`` (fp32, our tensor names, Q/K already
un-permuted), ``meta.json`` (config and special token ids) and ``tokenizer.json``. The key is
the file's content hash and size, so a changed file never hits a stale entry. Delete the folder
to reclaim space; nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sft_actors.errors import ModelSpecError
from sft_actors.log import get_logger
from sft_actors.model.config import LlamaConfig, RopeScaling, config_from_dict, config_to_dict
from sft_actors.model.tokenizer import BpeTokenizer, bpe_from_vocab

log = get_logger(component="model.gguf")

# 2: meta.json special carries the chat template; 3: Llama-family config fields
# (arch, biases, q/k norm, RoPE scaling, window).
CACHE_FORMAT = 4  # bumped: {arch}.attention.sliding_window is no longer applied
_BLOCK_TENSORS = {
    "attn_norm": "attn_norm",
    "attn_q_norm": "q_norm",
    "attn_k_norm": "k_norm",
    "attn_q": "q",
    "attn_k": "k",
    "attn_v": "v",
    "attn_output": "o",
    "ffn_norm": "mlp_norm",
    "ffn_gate": "gate",
    "ffn_up": "up",
    "ffn_down": "down",
}


@dataclass(kw_only=True, slots=True)
class GgufCheckpoint:
    config: LlamaConfig
    state_dict: dict[str, torch.Tensor]  # fp32, our names
    tokenizer: BpeTokenizer
    from_cache: bool


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sft_actors"


def file_key(path: Path) -> str:
    """Content hash and size of ``path``: the cache key (≈0.2 s for a 100 MB file)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return f"{digest.hexdigest()[:16]}-{path.stat().st_size}"


def unpermute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute`` of Q/K rows (weights or biases): interleaved pairs → rotate-half."""
    out, rest = weight.shape[0], weight.shape[1:]
    return weight.reshape(n_heads, out // n_heads // 2, 2, *rest).transpose(1, 2).reshape(weight.shape)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ModelSpecError(f"GGUF metadata lacks {key!r}; is this a llama-architecture GGUF?")
        return default
    return field.contents()


ARCHS = ("llama", "qwen2", "qwen3")  # a Mistral GGUF is a llama one
# ``{arch}.*`` keys this loader honours (read below) or knows not to change the math.
_ARCH_KEYS = {
    "vocab_size",
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "attention.layer_norm_rms_epsilon",
    "attention.sliding_window",
    "rope.freq_base",
    "rope.dimension_count",
    "rope.scaling.type",
    "rope.scaling.factor",
    "rope.scale_linear",
    "rope.scaling.original_context_length",
    "rope.scaling.yarn_beta_fast",
    "rope.scaling.yarn_beta_slow",
    "rope.scaling.yarn_ext_factor",
    "rope.scaling.attn_factor",
    "rope.scaling.finetuned",
}


def _check_keys(reader: Any, arch: str) -> None:
    """Refuse an ``{arch}.*`` key this loader neither reads nor knows to be harmless."""
    for key in reader.fields:
        if key.startswith(f"{arch}.") and key.removeprefix(f"{arch}.") not in _ARCH_KEYS:
            raise ModelSpecError(
                f"GGUF key {key!r} is not supported (it may change the model's math); "
                f"supported {arch}.* keys: {sorted(_ARCH_KEYS)}"
            )


def _rope_scaling(reader: Any, arch: str, head_dim: int, context: int) -> RopeScaling | None:
    """llama.cpp's RoPE scaling keys (and a ``rope_freqs`` tensor) → :class:`RopeScaling`."""
    kind = str(_field(reader, f"{arch}.rope.scaling.type", "none"))
    factor = float(_field(reader, f"{arch}.rope.scaling.factor", 0.0))
    if f"{arch}.rope.scale_linear" in reader.fields:  # the pre-2024 spelling of linear scaling
        kind, factor = "linear", float(_field(reader, f"{arch}.rope.scale_linear"))
    if kind not in ("none", "linear", "yarn"):
        raise ModelSpecError(
            f"GGUF key {arch}.rope.scaling.type = {kind!r} is not supported; supported: none, linear, yarn"
        )
    if float(_field(reader, f"{arch}.rope.scaling.attn_factor", 1.0)) != 1.0:
        raise ModelSpecError(f"GGUF key {arch}.rope.scaling.attn_factor ≠ 1 is not supported")
    ext = float(_field(reader, f"{arch}.rope.scaling.yarn_ext_factor", -1.0))
    if ext not in (-1.0, 1.0 if kind == "yarn" else 0.0):
        raise ModelSpecError(
            f"GGUF key {arch}.rope.scaling.yarn_ext_factor = {ext} is not supported (the full YaRN ramp only)"
        )
    factors: tuple[float, ...] = ()
    rope_freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if rope_freqs is not None:
        factors = tuple(float(x) for x in np.asarray(rope_freqs.data, dtype=np.float32).reshape(-1))
    if kind == "none" or (kind == "linear" and factor in (0.0, 1.0)):
        return RopeScaling(kind="default", freq_factors=factors) if factors else None
    if factor <= 0:
        raise ModelSpecError(f"GGUF key {arch}.rope.scaling.factor is missing or not positive for {kind!r}")
    if kind == "linear":
        return RopeScaling(kind="linear", factor=factor, freq_factors=factors)
    return RopeScaling(
        kind="yarn",
        factor=factor,
        original_max_position_embeddings=int(
            _field(reader, f"{arch}.rope.scaling.original_context_length", context)
        ),
        beta_fast=float(_field(reader, f"{arch}.rope.scaling.yarn_beta_fast", 32.0)),
        beta_slow=float(_field(reader, f"{arch}.rope.scaling.yarn_beta_slow", 1.0)),
        freq_factors=factors,
    )


def _ignore_sliding_window(reader: Any, arch: str) -> None:
    """``{arch}.attention.sliding_window`` is not read by llama.cpp for llama, qwen2 or qwen3.

    A GGUF means what llama.cpp computes. Its ``load_arch_hparams`` for these architectures
    (ggml-org/llama.cpp ``src/models/llama.cpp``, ``qwen2.cpp``, ``qwen3.cpp``; formerly the
    ``case LLM_ARCH_LLAMA:`` branch of ``llama_model::load_hparams`` in ``src/llama-model.cpp``)
    reads only ``LLM_KV_ATTENTION_LAYERNORM_RMS_EPS`` and never ``LLM_KV_ATTENTION_SLIDING_WINDOW``,
    so ``hparams.swa_type`` stays ``LLAMA_SWA_TYPE_NONE`` and every block attends causally over the
    whole context (architectures that do use a window — gemma2, cohere2, … — read the key there).
    So the key is not applied; a warning names it, since the model it came from may have used one.
    """
    key = f"{arch}.attention.sliding_window"
    value = _field(reader, key, 0)
    if value:
        log.warning(
            "gguf_key_ignored_like_llama_cpp",
            key=key,
            value=int(value),
            detail=f"llama.cpp does not apply a sliding window for architecture {arch!r}; neither do we "
            "(full causal attention, as llama.cpp computes this file)",
        )


def gguf_tensor_name(ours: str) -> str:
    """Our state-dict name → the GGUF tensor name it is read from (for error messages)."""
    top = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    if ours in top or ours == "lm_head.weight":
        return top.get(ours, "output.weight")
    inverse = {v: k for k, v in _BLOCK_TENSORS.items()}
    parts = ours.split(".")
    if len(parts) == 4 and parts[0] == "blocks" and parts[2] in inverse:
        return f"blk.{parts[1]}.{inverse[parts[2]]}.{parts[3]}"
    return ours


def _read_config(reader: Any) -> tuple[LlamaConfig, dict[str, Any]]:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHS:
        raise ModelSpecError(
            f"GGUF architecture {arch!r} is not supported; supported: {list(ARCHS)} "
            "(Mistral GGUFs are 'llama')"
        )
    _check_keys(reader, arch)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    n_heads = int(_field(reader, f"{arch}.attention.head_count"))
    dim = int(_field(reader, f"{arch}.embedding_length"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", dim // n_heads))
    if int(_field(reader, f"{arch}.attention.value_length", head_dim)) != head_dim:
        raise ModelSpecError(f"GGUF key {arch}.attention.value_length ≠ key_length is not supported")
    rope_dims = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ModelSpecError(
            f"GGUF key {arch}.rope.dimension_count: partial RoPE ({rope_dims} of {head_dim} dims) "
            "is not supported"
        )
    qk_norm = "blk.0.attn_q_norm.weight" in names
    if qk_norm and arch != "qwen3":
        raise ModelSpecError(
            f"GGUF tensor blk.0.attn_q_norm.weight: q/k norms are supported for qwen3 only, not {arch!r}"
        )
    context = int(_field(reader, f"{arch}.context_length", 2048))
    _ignore_sliding_window(reader, arch)
    config = LlamaConfig(
        vocab_size=int(_field(reader, f"{arch}.vocab_size", len(tokens))),
        dim=dim,
        num_blocks=int(_field(reader, f"{arch}.block_count")),
        num_heads=n_heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        ffn_dim=int(_field(reader, f"{arch}.feed_forward_length")),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in names,
        max_seq_len=context,
        arch=arch,
        explicit_head_dim=None if head_dim * n_heads == dim else head_dim,
        qkv_bias="blk.0.attn_q.bias" in names,
        o_bias="blk.0.attn_output.bias" in names,
        mlp_bias="blk.0.ffn_up.bias" in names,
        qk_norm=qk_norm,
        rope_scaling=_rope_scaling(reader, arch, head_dim, context),
    )
    special = {
        "bos_id": int(_field(reader, "tokenizer.ggml.bos_token_id", -1)),
        "eos_id": int(_field(reader, "tokenizer.ggml.eos_token_id", -1)),
        "pad_id": int(_field(reader, "tokenizer.ggml.padding_token_id", -1)),
    }
    return config, special


def _read_tokenizer(reader: Any, special: dict[str, int]) -> BpeTokenizer:
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelSpecError(f"GGUF tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2')")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    template = reader.fields.get("tokenizer.chat_template")
    tok = bpe_from_vocab(
        _field(reader, "tokenizer.ggml.tokens"),
        _field(reader, "tokenizer.ggml.merges"),
        _field(reader, "tokenizer.ggml.token_type"),
        bos_id=special["bos_id"] if special["bos_id"] >= 0 else None,
        eos_id=special["eos_id"] if special["eos_id"] >= 0 else None,
        pad_id=max(special["pad_id"], 0),
        split_digits=pre in ("smollm", "deepseek-llm", "llama3"),
    )
    tok.chat_template = template.contents() if template is not None else None
    return tok


def _read_tensors(reader: Any, config: LlamaConfig) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        array = dequantize(t.data, t.tensor_type)
        array = np.asarray(array, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
        if not array.flags.writeable:  # unquantised tensors come back as views of the read-only memmap
            array = array.copy()
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        name: str = t.name
        if name == "token_embd.weight":
            out["embed_tokens.weight"] = tensor
        elif name == "output_norm.weight":
            out["norm.weight"] = tensor
        elif name == "output.weight":
            out["lm_head.weight"] = tensor
        elif name.startswith("blk."):
            _, idx, kind, suffix = name.split(".")
            if kind not in _BLOCK_TENSORS or suffix not in ("weight", "bias"):
                raise ModelSpecError(f"unexpected GGUF tensor {name!r} (unsupported {config.arch} variant)")
            # Only llama.cpp's llama converter permutes Q/K (weights and biases); qwen2/qwen3 do not.
            if config.arch == "llama" and kind == "attn_q":
                tensor = unpermute_qk(tensor, config.num_heads)
            elif config.arch == "llama" and kind == "attn_k":
                tensor = unpermute_qk(tensor, config.num_kv_heads)
            out[f"blocks.{idx}.{_BLOCK_TENSORS[kind]}.{suffix}"] = tensor.contiguous()
        elif name != "rope_freqs.weight":
            raise ModelSpecError(f"unexpected GGUF tensor {name!r} (unsupported {config.arch} variant)")
    return out


def read_gguf_config(path: Path, *, use_cache: bool = True) -> LlamaConfig:
    """Only the architecture config (from the cache when present, else from the file's metadata)."""
    if use_cache:
        meta = cache_root() / "gguf" / file_key(path) / "meta.json"
        if meta.is_file() and (data := json.loads(meta.read_text())).get("format") == CACHE_FORMAT:
            cfg = config_from_dict(data["config"])
            assert isinstance(cfg, LlamaConfig)
            return cfg
    from gguf import GGUFReader

    return _read_config(GGUFReader(path))[0]


def load_gguf(path: Path, *, use_cache: bool = True) -> GgufCheckpoint:
    """Config, fp32 weights and tokenizer of a llama GGUF file (cached after the first read)."""
    t0 = time.perf_counter()
    entry = cache_root() / "gguf" / file_key(path) if use_cache else None
    if entry is not None and (entry / "meta.json").is_file():
        meta = json.loads((entry / "meta.json").read_text())
        if meta.get("format") == CACHE_FORMAT:
            cfg = config_from_dict(meta["config"])
            assert isinstance(cfg, LlamaConfig)
            tok = BpeTokenizer.from_json((entry / "tokenizer.json").read_text(), **meta["special"])
            state = load_file(str(entry / "weights.safetensors"))
            log.info("gguf_loaded", path=str(path), cached=True, ms=round((time.perf_counter() - t0) * 1e3))
            return GgufCheckpoint(config=cfg, state_dict=state, tokenizer=tok, from_cache=True)

    from gguf import GGUFReader

    reader = GGUFReader(path)
    config, special = _read_config(reader)
    tokenizer = _read_tokenizer(reader, special)
    state = _read_tensors(reader, config)
    log.info("gguf_loaded", path=str(path), cached=False, ms=round((time.perf_counter() - t0) * 1e3))
    if entry is not None:
        _write_cache(entry, config, tokenizer, state)
    return GgufCheckpoint(config=config, state_dict=state, tokenizer=tokenizer, from_cache=False)


def _write_cache(
    entry: Path, config: LlamaConfig, tokenizer: BpeTokenizer, state: dict[str, torch.Tensor]
) -> None:
    """Write the entry into a temporary folder, then rename it into place (readers never see half)."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
        meta = {
            "format": CACHE_FORMAT,
            "config": config_to_dict(config),
            "special": {
                "bos_id": tokenizer.bos_id,
                "eos_id": tokenizer.eos_id,
                "pad_id": tokenizer.pad_id,
                "chat_template": tokenizer.chat_template,
            },
        }
        save_file(state, str(tmp / "weights.safetensors"))
        (tmp / "tokenizer.json").write_text(tokenizer.to_json())
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: marks the entry complete
        if (entry / "meta.json").is_file() and _cached_format(entry) != CACHE_FORMAT:
            shutil.rmtree(entry, ignore_errors=True)  # an older format is replaced, not kept forever
        try:
            tmp.rename(entry)
        except OSError:  # another process won the race; its entry is equivalent
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:  # a read-only or full disk only costs speed
        log.warning("gguf_cache_write_failed", entry=str(entry), error=str(exc))


def _cached_format(entry: Path) -> object:
    """The ``format`` of a cache entry's meta.json (None if unreadable)."""
    try:
        return json.loads((entry / "meta.json").read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None
