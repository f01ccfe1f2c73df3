"""Rotary position embeddings and their rescalings, as transformers and llama.cpp compute them.

The inverse frequencies follow transformers' ``modeling_rope_utils`` (``_compute_*_parameters``)
term by term, so a checkpoint's logits match ``AutoModelForCausalLM`` on the same ids:

- default: ``inv_freq_i = theta^(-2i/d)`` (Su et al. 2021, RoFormer);
- ``linear``: every frequency divided by ``factor`` (position interpolation, Chen et al. 2023);
- ``dynamic``: NTK-aware base growth once the sequence is longer than
  ``original_max_position_embeddings``: ``theta · (factor·T/L − (factor − 1))^(d/(d−2))``
  (transformers' ``dynamic_rope_update``; recomputed per forward from the sequence length);
- ``llama3``: low frequencies divided by ``factor``, high ones kept, a smooth blend between
  (Llama 3 herd paper, Dubey et al. 2024, §3; transformers ``_compute_llama3_parameters``);
- ``yarn``: per-dimension blend of interpolated and extrapolated frequencies over a linear ramp
  between the correction dims of ``beta_fast``/``beta_slow``, and cos/sin scaled by the attention
  factor ``0.1·ln(factor) + 1`` (or ``mscale``/``mscale_all_dim``'s ratio, or an explicit
  ``attention_factor``) (Peng et al. 2023, "YaRN", eqs. 17-22);
- ``freq_factors``: llama.cpp's ``rope_freqs`` tensor, each frequency divided by its factor
  (``ggml_rope_ext``'s ``freq_factors``), before the linear/yarn interpolation.

Tables are laid out for the rotate-half convention (``[freqs, freqs]`` over ``head_dim``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sft_actors.errors import ModelSpecError
from sft_actors.model.config import ROPE_KINDS, LlamaConfig, RopeScaling

Rope = tuple[torch.Tensor, torch.Tensor]

# Keys transformers' validators accept per rope_type (``_validate_*_rope_parameters``).
_ROPE_KEYS: dict[str, set[str]] = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    },
}
_COMMON_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


def _base_inv_freq(theta: float, dim: int, device: torch.device | None = None) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float32) / dim
    return 1.0 / (theta**exponents)  # (dim/2,)


def _yarn(theta: float, dim: int, s: RopeScaling, device: torch.device | None) -> tuple[torch.Tensor, float]:
    factor = s.factor
    assert s.original_max_position_embeddings is not None

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    if s.attention_factor is not None:
        attention = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
        attention = get_mscale(factor, s.mscale) / get_mscale(factor, s.mscale_all_dim)
    else:
        attention = get_mscale(factor)

    def correction_dim(rotations: float) -> float:
        orig = s.original_max_position_embeddings
        assert orig is not None
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers: prevent a singular ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp.to(device=device)  # 1: keep the original frequency
    pos_freqs = theta ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float32) / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention


def inv_freq(
    config: LlamaConfig, seq_len: int, device: torch.device | None = None
) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (head_dim/2,) fp32, cos/sin scale) for a forward over ``seq_len`` tokens."""
    dim, theta, s = config.head_dim, config.rope_theta, config.rope_scaling
    if s is None:
        return _base_inv_freq(theta, dim, device), 1.0
    attention = 1.0
    if s.kind == "yarn":
        freqs, attention = _yarn(theta, dim, s, device)
    elif s.kind == "dynamic":
        assert s.original_max_position_embeddings is not None
        limit = s.original_max_position_embeddings
        length = max(seq_len, limit)
        base = theta * ((s.factor * length / limit) - (s.factor - 1)) ** (dim / (dim - 2))
        freqs = _base_inv_freq(base, dim, device)
    elif s.kind == "llama3":
        assert s.original_max_position_embeddings is not None
        freqs = _base_inv_freq(theta, dim, device)
        old = s.original_max_position_embeddings
        low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
        wavelen = 2 * math.pi / freqs
        scaled = torch.where(wavelen > low_wavelen, freqs / s.factor, freqs)
        smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        freqs = torch.where(medium, smoothed, scaled)
    else:
        freqs = _base_inv_freq(theta, dim, device)
        if s.kind == "linear":
            freqs = freqs / s.factor
    if s.freq_factors:
        freqs = freqs / torch.tensor(s.freq_factors, dtype=torch.float32, device=device)
    return freqs, attention


def rope_tables(config: LlamaConfig, seq_len: int, dtype: torch.dtype, device: torch.device) -> Rope:
    """cos/sin tables (T, head_dim) in the rotate-half layout, scaled by yarn's attention factor."""
    freqs, scale = inv_freq(config, seq_len, device)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), freqs)  # (T, hd/2)
    emb = torch.cat((angles, angles), dim=-1)  # (T, hd)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    cos, sin = rope  # (T, hd), broadcast over (B, H, T, hd)
    return x * cos + _rotate_half(x) * sin


def rope_scaling_from_hf(
    params: dict[str, Any], *, max_position_embeddings: int, where: str
) -> RopeScaling | None:
    """A transformers ``rope_parameters``/``rope_scaling`` dict → :class:`RopeScaling` (None: default).

    Every key is either used or refused: an unknown ``rope_type`` or a key its type does not read
    is a :class:`ModelSpecError` naming ``where`` (the file) and the field.
    """
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_KEYS:
        raise ModelSpecError(f"{where}: rope_type {kind!r} is not supported; supported: {list(ROPE_KINDS)}")
    extra = sorted(set(params) - _COMMON_KEYS - _ROPE_KEYS[kind])
    if extra:
        raise ModelSpecError(
            f"{where}: RoPE field(s) {extra} are not read by rope_type {kind!r} "
            f"(it reads {sorted(_ROPE_KEYS[kind])}); remove them or fix the type"
        )
    _check_types(params, where)
    partial = params.get("partial_rotary_factor")
    if partial is not None and float(partial) != 1.0:
        raise ModelSpecError(
            f"{where}: partial_rotary_factor {partial} is not supported (RoPE over the whole head only)"
        )
    if kind == "default":
        return None
    original = params.get("original_max_position_embeddings") or max_position_embeddings
    factor = params.get("factor")
    if factor is None:
        # transformers 5 requires it for every scaled type (its yarn reads rope_parameters["factor"]
        # and raises KeyError without it): refuse rather than invent one.
        raise ModelSpecError(f"{where}: rope_type {kind!r} needs a 'factor' (a number)")
    if kind == "dynamic":  # transformers' dynamic RoPE measures against max_position_embeddings
        original = max_position_embeddings
    try:
        return RopeScaling(
            kind=kind,
            factor=float(factor),
            original_max_position_embeddings=int(original),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            attention_factor=_opt_float(params.get("attention_factor")),
            mscale=_opt_float(params.get("mscale")),
            mscale_all_dim=_opt_float(params.get("mscale_all_dim")),
            truncate=bool(params.get("truncate", True)),
        )
    except ModelSpecError as exc:
        raise ModelSpecError(f"{where}: {exc}") from exc


_INT_KEYS = {"original_max_position_embeddings"}
_BOOL_KEYS = {"truncate"}


def _check_types(params: dict[str, Any], where: str) -> None:
    """Integers are JSON integers, flags JSON booleans, everything else a JSON number (never a
    string or a bool): transformers' strict configs refuse the rest, and so do we."""
    for key, value in params.items():
        if value is None or key in ("rope_type", "type"):
            continue
        if key in _BOOL_KEYS:
            ok = isinstance(value, bool)
        elif key in _INT_KEYS:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok:
            want = "true/false" if key in _BOOL_KEYS else "an integer" if key in _INT_KEYS else "a number"
            got = f"{value!r} ({type(value).__name__})"
            raise ModelSpecError(f"{where}: field {key!r} must be {want}, got {got}")


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def hf_rope_parameters(scaling: RopeScaling | None, theta: float) -> dict[str, Any]:
    """The transformers-5 ``rope_parameters`` dict for ``scaling`` (the inverse of the parser)."""
    out: dict[str, Any] = {"rope_type": "default" if scaling is None else scaling.kind, "rope_theta": theta}
    if scaling is not None and scaling.freq_factors:
        raise ModelSpecError(
            "RoPE frequency factors (a GGUF rope_freqs tensor) have no transformers equivalent"
        )
    if scaling is None or scaling.kind == "default":
        return out
    out["factor"] = scaling.factor
    if scaling.kind == "llama3":
        out["low_freq_factor"] = scaling.low_freq_factor
        out["high_freq_factor"] = scaling.high_freq_factor
    if scaling.kind in ("llama3", "yarn"):
        out["original_max_position_embeddings"] = scaling.original_max_position_embeddings
    if scaling.kind == "yarn":
        out.update(beta_fast=scaling.beta_fast, beta_slow=scaling.beta_slow, truncate=scaling.truncate)
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if getattr(scaling, key) is not None:
                out[key] = getattr(scaling, key)
    return out
