"""Common-step transform codes: one uniform step, entropy-coded, with optional rate control.

With entropy coding, one uniform quantization step over all coefficients is what minimises the
mean squared error at a given rate (at high rate, every coefficient's error is step²/12
whatever its variance: the reverse water-filling solution; Gersho & Gray, *Vector
Quantization and Signal Compression*, §9.9). **Rate control** picks that step per frame so the
whole frame costs ``raw bytes ÷ ratio`` (±3 %): a secant search on log(step) against the
actually coded bytes (the rANS stream of ``entropy``), bracketed, at most
:data:`MAX_ITERATIONS` trial encodes; each trial re-seeds the rounding noise, so the chosen
frame is exactly the one a trial produced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from sft_actors.codec import bitpack, quantize
from sft_actors.codec.entropy import ans_encode, ans_encode_columns, column_groups
from sft_actors.errors import CodecError

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

#: Rate control stops once the frame is within this fraction of its byte target.
TOLERANCE: Final[float] = 0.015
MAX_ITERATIONS: Final[int] = 14


@dataclass(slots=True)
class CommonCodes:
    """One coded frame of common-step codes: what the writer stores, and its size."""

    step: float
    codes: I32
    groups: U8 | None  # per-column contexts (None: one histogram)
    words: bytes  # rANS words (contexts) — or empty
    table: U8  # zigzag varints of the context table — or empty
    table_len: int  # integers in the context table
    single: bytes | None  # one-histogram ANS stream (None: stored as integers)

    @property
    def nbytes(self) -> int:
        """Payload bytes these codes add (before zstd of the small side sections)."""
        if self.groups is not None:
            return len(self.words) + self.table.size + self.groups.size
        if self.single is not None:
            return len(self.single)
        return self.codes.nbytes


def quantize_with(values: F32, step: float, rng: np.random.Generator | None) -> I32:
    """Codes k of ``values`` at ``step``: stochastic (``rng``) or nearest (``None``) rounding."""
    if rng is not None:
        return quantize.quantize_common(values, step, rng)
    if values.size and float(np.abs(values).max()) / step >= quantize.MAX_COMMON_CODE:
        raise CodecError(f"common quantization step {step:.3g} is too small for these values")
    return np.rint(values * np.float32(1.0 / step)).astype(np.int32)


def code_frame(values: F32, step: float, rng: np.random.Generator | None, *, contexts: bool, ans: bool) -> CommonCodes:
    """Quantize ``values`` (N, K) at ``step`` and entropy-code them (per-column contexts or one
    histogram with ``ans``; plain integers otherwise)."""
    codes = quantize_with(values, step, rng)
    if contexts:
        groups = column_groups(codes)
        words, table = ans_encode_columns(codes, groups)
        varints = bitpack.encode_varints(bitpack.zigzag(table))
        return CommonCodes(step, codes, groups, words, varints, int(table.size), None)
    single = ans_encode(codes.reshape(-1).astype(np.int64)) if ans else None
    return CommonCodes(step, codes, None, b"", np.zeros(0, np.uint8), 0, single)


def rate_controlled(
    values: F32,
    budget: int,
    rng: np.random.Generator | None,
    *,
    contexts: bool,
    ans: bool,
) -> CommonCodes:
    """The frame of ``values`` (N, K) whose coded size is closest to ``budget`` bytes.

    ``rng`` (stochastic rounding) is restored to its state before every trial, so the returned
    frame is reproducible from the seed. A budget below what even all-zero codes cost returns
    the coarsest frame (every code 0); the caller reports the achieved ratio.
    """
    state = rng.bit_generator.state if rng is not None else None

    def trial(step: float) -> CommonCodes:
        if rng is not None:
            rng.bit_generator.state = state
        return code_frame(values, step, rng, contexts=contexts, ans=ans)

    rms = float(np.sqrt(np.mean(np.square(values, dtype=np.float64)))) if values.size else 0.0
    if rms == 0.0 or budget <= 0:
        return trial(_coarsest(values))
    # Start from the high-rate rule: bits/value ≈ h − log2(step/rms), h ≈ 2 at step = rms/2.
    bits = 8.0 * budget / values.size
    log_step = math.log(rms) + math.log(2.0) * (1.0 - bits)
    lo: tuple[float, int] | None = None  # (log step, bytes) with bytes > budget
    hi: tuple[float, int] | None = None  # with bytes <= budget
    best: CommonCodes | None = None
    for _ in range(MAX_ITERATIONS):
        step = float(np.float32(math.exp(log_step)))
        frame = trial(step)
        size = frame.nbytes
        if best is None or abs(size - budget) < abs(best.nbytes - budget):
            best = frame
        if abs(size - budget) <= TOLERANCE * budget:
            break
        if size > budget:
            lo = (log_step, size) if lo is None or log_step > lo[0] else lo
        else:
            hi = (log_step, size) if hi is None or log_step < hi[0] else hi
        log_step = _next_log_step(log_step, size, budget, lo, hi)
        if size <= budget and frame.codes.size and not frame.codes.any():
            break  # all codes zero: a larger step cannot get smaller
    assert best is not None
    return best


def _next_log_step(
    log_step: float, size: int, budget: int, lo: tuple[float, int] | None, hi: tuple[float, int] | None
) -> float:
    """Secant between the bracket's ends in (log step, log bytes); bisection if it leaves the
    bracket; a doubling/halving of the step while unbracketed."""
    if lo is not None and hi is not None:
        (x0, y0), (x1, y1) = lo, hi
        ly0, ly1, target = math.log(max(y0, 1)), math.log(max(y1, 1)), math.log(max(budget, 1))
        if ly0 != ly1:
            x = x0 + (target - ly0) * (x1 - x0) / (ly1 - ly0)
            if min(x0, x1) < x < max(x0, x1):
                return x
        return 0.5 * (x0 + x1)
    # Unbracketed: bytes fall ~ N/8 per doubling of the step at high rate; move by that slope.
    shift = float(np.clip(math.log2(max(size, 1) / max(budget, 1)), -3.0, 3.0))
    if abs(shift) < 0.05:
        shift = math.copysign(0.05, shift)
    return log_step + math.log(2.0) * shift


def _coarsest(values: F32) -> float:
    peak = float(np.abs(values).max()) if values.size else 0.0
    return float(np.float32(max(4.0 * peak, 1e-30)))
