"""Unbiased stochastic rounding.

Two grids:

* **sign-magnitude, b bits** — value = ±(lo + k·step), k ∈ [0, 2^(b-1) - 1], one ``step`` per
  token or channel. ``lo`` is the sparsification threshold (every kept value has |v| ≥ lo), so
  the codes spend no levels on the band the sparsifier already removed; it is 0 for dense data.
  With lo = 0 the grid is the usual symmetric one (2^b - 1 distinct values).
* **common step** — value = k·step with one step for the whole tensor and unbounded integer k,
  for transform codes that an entropy coder compresses.

Rounding: k = floor(m + u) with u ~ U[0, 1), so E[k] = m and E[decode] = value exactly.
Randomness comes from a PCG64 generator seeded by the caller (the seed travels in the metadata);
nothing global is touched, so encodes are replayable and thread-safe.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from sft_actors.errors import CodecError

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]
U16 = npt.NDArray[np.uint16]
I32 = npt.NDArray[np.int32]

# Largest |code| of the common-step grid: keeps codes in int32 and the ANS alphabet sane.
MAX_COMMON_CODE = 1 << 30


def levels(bits: int) -> int:
    """Largest magnitude index of the b-bit sign-magnitude grid."""
    return (1 << (bits - 1)) - 1


def bf16_round_up(values: F32) -> tuple[U16, F32]:
    """Non-negative floats rounded *up* to bfloat16: (wire bits, the float32 they decode to).

    Rounding the step up keeps every magnitude inside the grid; the quantizer then uses exactly
    the value the receiver will see, so the rounding of the step adds no bias.
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    upper = (bits >> np.uint32(16)).astype(np.uint32)
    upper += (bits & np.uint32(0xFFFF)) != 0
    wire = np.minimum(upper, np.uint32(0x7F7F)).astype(np.uint16)
    return wire, bf16_to_f32(wire)


def bf16_round_down(values: F32) -> tuple[U16, F32]:
    """Non-negative floats truncated to bfloat16 (for ``lo``: kept values stay ≥ lo)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    wire = (bits >> np.uint32(16)).astype(np.uint16)
    return wire, bf16_to_f32(wire)


def bf16_to_f32(wire: U16) -> F32:
    return (wire.astype(np.uint32) << np.uint32(16)).view(np.float32)


def inverse_steps(steps: F32) -> F32:
    """1/step, with 0 for a zero step (a group whose values all equal lo)."""
    inv = np.zeros_like(steps)
    np.divide(np.float32(1.0), steps, out=inv, where=steps > 0)
    return inv


def quantize_sign_magnitude(
    values: F32, lo: F32 | np.float32, inv_step: F32, bits: int, rng: np.random.Generator | None
) -> U8:
    """Codes (sign in bit b-1, magnitude index below) of ``values``; lo/inv_step broadcast.

    ``rng``: stochastic rounding; ``None``: round to nearest."""
    top = levels(bits)
    mag = np.abs(values)
    mag -= lo
    mag *= inv_step
    mag += rng.random(mag.shape, dtype=np.float32) if rng is not None else np.float32(0.5)
    np.floor(mag, out=mag)
    np.clip(mag, 0, top, out=mag)
    codes = mag.astype(np.uint8)
    codes |= np.signbit(values).astype(np.uint8) << np.uint8(bits - 1)
    return codes


def _signed_levels(bits: int) -> tuple[F32, F32]:
    """(±k, ±1) for every b-bit code: decoding is then two table lookups and a multiply-add."""
    codes = np.arange(1 << bits, dtype=np.uint32)
    sign = np.where(codes >> np.uint32(bits - 1), np.float32(-1), np.float32(1)).astype(np.float32)
    return (codes & np.uint32(levels(bits))).astype(np.float32) * sign, sign


_SIGNED_LEVELS = {bits: _signed_levels(bits) for bits in range(2, 9)}


def dequantize_sign_magnitude(codes: U8, lo: F32 | np.float32, step: F32, bits: int) -> F32:
    """±(lo + k·step); ``codes`` must be < 2^bits (``unpack_codes`` and the ANS path ensure it)."""
    signed, sign = _SIGNED_LEVELS[bits]
    out: F32 = np.take(signed, codes)
    out *= step
    if np.ndim(lo) or float(lo) != 0.0:
        out += np.take(sign, codes) * lo
    return out


def quantize_common(values: F32, step: float, rng: np.random.Generator) -> I32:
    """Integer codes k with E[k·step] = value; CodecError if they would not fit the code range."""
    if values.size == 0:
        return np.zeros(values.shape, dtype=np.int32)
    peak = float(np.abs(values).max())
    if peak / step >= MAX_COMMON_CODE:
        raise CodecError(
            f"common quantization step {step:.3g} is too small for values up to {peak:.3g}: "
            "increase codec.quantize.step"
        )
    scaled = values * np.float32(1.0 / step)
    scaled += rng.random(scaled.shape, dtype=np.float32)
    codes: I32 = np.floor(scaled).astype(np.int32)
    return codes


def dequantize_common(codes: I32, step: float) -> F32:
    return codes.astype(np.float32) * np.float32(step)
