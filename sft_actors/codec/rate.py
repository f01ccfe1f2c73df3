"""Common-step transform codes: one uniform step, entropy-coded, with optional rate control.

With entropy coding, one uniform quantization step over all coefficients is what minimises the
mean squared error at a given rate (at high rate, every coefficient's error is step²/12
whatever its variance: uniform quantization followed by entropy coding is asymptotically
optimal, Gish & Pierce, IEEE Trans. IT 1968; equal step sizes across transform coefficients,
Goyal, "Theoretical foundations of transform coding", IEEE SPM 2001). **Rate control** picks
that step per frame so the whole frame costs ``raw bytes ÷ ratio`` (±3 %): a secant search on
log(step) against the actually coded bytes (the rANS stream of ``entropy``), bracketed, at
most :data:`MAX_ITERATIONS` trial encodes; each trial re-seeds the rounding noise, so the
chosen frame is exactly the one a trial produced.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from sft_actors.codec import bitpack, quantize
from sft_actors.codec.container import SectionWriter
from sft_actors.codec.entropy import ans_encode, ans_encode_columns, column_groups
from sft_actors.codec.spec import QuantizeSpec
from sft_actors.errors import CodecError

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

#: The finest step rate control tries, as a fraction of the frame's peak |value|: codes stay
#: within ±2^15 (an ANS alphabet of at most 2^16 symbols per context). On float32 input this
#: spends ≈ 15 bits per value, so targets below ≈ 2.5× come out smaller than asked.
FINEST_STEP = 2.0**-15
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
    side: int = 0  # stored bytes of the side sections (or of zstd'd integer codes), once known

    @property
    def nbytes(self) -> int:
        """Payload bytes these codes add."""
        if self.groups is not None:
            return len(self.words) + (self.side or self.table.size + self.groups.size)
        if self.single is not None:
            return len(self.single)
        return self.side or self.codes.nbytes


def quantize_with(values: F32, step: float, rng: np.random.Generator | None) -> I32:
    """Codes k of ``values`` at ``step``: stochastic (``rng``) or nearest (``None``) rounding."""
    if rng is not None:
        return quantize.quantize_common(values, step, rng)
    if values.size and float(np.abs(values).max()) / step >= quantize.MAX_COMMON_CODE:
        raise CodecError(f"common quantization step {step:.3g} is too small for these values")
    codes: I32 = np.rint(values * np.float32(1.0 / step)).astype(np.int32)
    return codes


def code_frame(
    values: F32, step: float, rng: np.random.Generator | None, *, contexts: bool, ans: bool
) -> CommonCodes:
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
    stored: Callable[[U8], int] | None = None,
) -> CommonCodes:
    """The frame of ``values`` (N, K) whose coded size is closest to ``budget`` bytes.

    ``stored``: how many bytes the writer will store for a side section (zstd may shrink the
    context sections); without it their raw size is counted.
    ``rng`` (stochastic rounding) is restored to its state before every trial, so the returned
    frame is reproducible from the seed. A budget below what even all-zero codes cost returns
    the coarsest frame (every code 0); the caller reports the achieved ratio.
    """
    state = rng.bit_generator.state if rng is not None else None

    def trial(step: float) -> CommonCodes:
        if rng is not None and state is not None:
            rng.bit_generator.state = state
        frame = code_frame(values, step, rng, contexts=contexts, ans=ans)
        if stored is not None and frame.groups is not None:
            frame.side = stored(frame.groups) + stored(frame.table)
        elif stored is not None and frame.single is None:  # integers, zstd-compressed
            frame.side = stored(_as_width(frame.codes).view(np.uint8))
        return frame

    rms = float(np.sqrt(np.mean(np.square(values, dtype=np.float64)))) if values.size else 0.0
    peak = float(np.abs(values).max()) if values.size else 0.0
    # Denormal-sized frames: no step that float32 can invert would resolve them; send zeros.
    if rms == 0.0 or budget <= 0 or peak * FINEST_STEP < float(np.finfo(np.float32).tiny):
        return trial(_coarsest(values))
    floor = math.log(peak * FINEST_STEP)
    # Start from the high-rate rule: bits/value ≈ h − log2(step/rms), h ≈ 2 at step = rms/2.
    bits = 8.0 * budget / values.size
    log_step = max(floor, math.log(rms) + math.log(2.0) * (1.0 - bits))
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
        if size <= budget and frame.codes.size and not frame.codes.any():
            break  # all codes zero: a larger step cannot get smaller
        nxt = _next_log_step(log_step, size, budget, lo, hi)
        if nxt < floor and log_step <= floor:
            break  # the finest step already spends less than asked
        log_step = max(floor, nxt)
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


def write_frame(
    dense: F32,
    q: QuantizeSpec,
    meta: dict[str, Any],
    writer: SectionWriter,
    stage_bytes: dict[str, int],
    *,
    rng: np.random.Generator | None,
    contexts: bool,
    ans: bool,
) -> None:
    """Write W (N, K) as common-step codes: a fixed ``step`` × RMS, or rate-controlled to
    ``raw bytes ÷ ratio`` for the whole frame (what ``writer`` already holds included).

    Sections: ``ctx_groups`` (K bytes), ``ctx_table`` (zigzag varints) and ``codes`` (rANS
    words) with contexts; else ``codes`` as int8/16/32 (zstd or one-histogram ANS). Meta:
    ``quantize = {step, contexts | width}`` and, under rate control, ``rate = {target}``."""
    if q.ratio is not None:
        target = stage_bytes["input"] / q.ratio
        budget = int(target) - sum(writer.stored_bytes.values())
        frame = rate_controlled(dense, budget, rng, contexts=contexts, ans=ans, stored=writer.stored_nbytes)
        meta["rate"] = {"target": int(target), "zero": bool(frame.codes.size) and not frame.codes.any()}
    else:
        assert q.step is not None
        rms = float(np.sqrt(np.mean(np.square(dense, dtype=np.float64)))) if dense.size else 0.0
        frame = code_frame(
            dense, float(np.float32(q.step * rms)) if rms > 0 else 1.0, rng, contexts=contexts, ans=ans
        )
    stage_bytes["quantize"] = sum(writer.raw_bytes.values()) + frame.codes.nbytes
    if frame.groups is not None:
        meta["quantize"] = {"step": frame.step, "contexts": frame.table_len}
        writer.add("ctx_groups", frame.groups)
        writer.add("ctx_table", frame.table)
        writer.add("codes", frame.words, compress=False)
        return
    raw = _as_width(frame.codes)
    meta["quantize"] = {"step": frame.step, "width": raw.itemsize}
    writer.add("codes", raw.view(np.uint8), ans_symbols=raw.astype(np.int64) if ans else None)


def _as_width(codes: I32) -> npt.NDArray[np.signedinteger[Any]]:
    """The codes, flat, as the narrowest of int8/int16/int32 that holds them."""
    return codes.reshape(-1).astype({1: np.int8, 2: np.int16, 4: np.int32}[code_width(codes)])


def code_width(codes: I32) -> int:
    """Bytes per code (1, 2 or 4) that hold every value of ``codes``."""
    if codes.size == 0:
        return 1
    low, high = int(codes.min()), int(codes.max())
    for width, dtype in ((1, np.int8), (2, np.int16)):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return width
    return 4
