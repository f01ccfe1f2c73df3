"""Fixed-rate transform coding: per-component bit allocation and calibrated clipping.

``quantize.scale = "component"`` (after a ``project`` stage, without ``sparsify``). A frame is
at most ``raw bytes / ratio`` bytes, and its size follows from the shape, the basis and the
ratio alone, apart from the outlier stage's dense sections, whose stored bytes come off the
budget first. What is left is spread over the N live rows (tokens not sent densely): every row
gets the same B bits, ``B = min(8·K, floor(8·(raw/ratio − outlier bytes) / N))``. Raw bytes
are numel × the input dtype's size; the frame is the payload (what ``CodecReport.ratio``
counts; the metadata is not); the code section is stored raw (zstd/ANS would make the size
data-dependent, and near-uniform fixed-width codes do not compress).

**Allocation** (deterministic from the basis's float32 ``scales``, so both sides agree): greedy
reverse water-filling (Cover & Thomas, *Elements of Information Theory*, 2nd ed., §10.3.3;
greedy/marginal-return bit allocation, Gersho & Gray, *Vector Quantization and Signal
Compression*, §8.4): from 0 bits everywhere, give one bit at a time to the component with the
largest distortion ``D_j = scales_j² · 4^(−b_j)`` (ties: lowest index), at most 8 bits each,
until the B bits are spent. A component with 0 bits is dropped (decodes as 0, i.e. the mean).

**Grid**: component j with b ≥ 1 bits uses 2^b levels evenly spaced over [−a, a] *including
both ends*, ``a = min(clip_j, g(b)·scales_j)``; values beyond ±a are clipped. ``g(b)`` is the
loading factor of the MSE-optimal uniform quantizer of a unit Gaussian with this grid and this
rounding (the nearest-rounding column reproduces Max 1960's optimum uniform quantizers: ±0.798
at 1 bit, step 0.996 at 2 bits). Why not ``a = clip_j`` at every width: clip_j (the 0.9995
quantile, ≈ 3.5σ) is right at 8 bits but at 1 bit the levels ±3.5σ give ~8σ² of error, worse
than dropping the component. Why not mid-tread (2^b − 1 levels, 0 exact): at 1 bit it has one
level and carries nothing. Rounding: ``"nearest"``, or ``"stochastic"`` (index ⌊t + u⌋,
u ~ U[0, 1): E[decode] = value for |value| ≤ a; clipped values are biased).

**Outliers**: the dense rows are not coded; outlier channels keep their values through the
KLT (see :func:`restore_for_basis`) and, with a ``center`` basis, get bits last
(:func:`coded_scales`); the decoder overwrites both with the outlier stage's values.

**Packing**: each live row's fields (component order, b_j bits each, lowest bit first) are
concatenated into B bits, rows one after another, packed little-bit-first:
``ceil(N·B / 8)`` bytes, no per-frame side information (the scales are in the basis).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from sft_actors.errors import CodecError

if TYPE_CHECKING:
    from sft_actors.codec.container import SectionWriter
    from sft_actors.codec.project import Basis

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

MAX_BITS: Final[int] = 8

#: ``g(b)`` for b = 1..8: the half-range, in units of σ, of the 2^b-level uniform grid (ends
#: included) minimising the mean squared error on N(0, 1), per rounding mode (numerical
#: minimisation; ``tests/test_codec_component.py`` re-derives them).
LOADING: Final[dict[str, tuple[float, ...]]] = {
    "nearest": (0.7979, 1.4935, 2.0511, 2.5140, 2.9162, 3.2780, 3.6111, 3.9222),
    "stochastic": (0.6471, 1.2700, 1.8277, 2.3088, 2.7285, 3.1046, 3.4492, 3.7698),
}


def allocate_bits(scales: F32, row_bits: int) -> I64:
    """Bits per component (K,), summing to ``min(row_bits, 8·K)``, for component std ``scales`` (K,).

    Greedy reverse water-filling on ``D_j = scales_j² · 4^(−b_j)``, ties to the lowest index,
    capped at :data:`MAX_BITS`. Because each component's D only falls as it gains bits, the
    greedy order is the order of all (component, bit) increments sorted by their D at the
    time (descending, then component, then bit), computed exactly in float64 (4^(−b) is a power
    of two). Raises :class:`CodecError` for a negative ``row_bits``.
    """
    if row_bits < 0:
        raise CodecError(f"bits per row must be >= 0, got {row_bits}")
    k = scales.shape[0]
    var = np.square(scales.astype(np.float64))
    steps = np.arange(MAX_BITS, dtype=np.int64)
    gain = np.ldexp(var[:, None], (-2 * steps)[None, :])  # D_j before its (b+1)-th bit
    comp = np.repeat(np.arange(k, dtype=np.int64), MAX_BITS)
    order = np.lexsort((np.tile(steps, k), comp, -gain.reshape(-1)))
    chosen = comp[order[: min(row_bits, MAX_BITS * k)]]
    return np.bincount(chosen, minlength=k).astype(np.int64)


def coded_scales(scales: F32, dense_cols: I64, *, center: bool) -> F32:
    """The ``scales`` (K,) to allocate by: for a ``center`` basis (components = channels) the
    outlier channels ``dense_cols``, which travel densely, get 0 so they get bits last."""
    if not center or dense_cols.size == 0:
        return scales
    out = scales.copy()
    out[dense_cols] = 0
    return out


def clip_ranges(scales: F32, clip: F32, bits: I64, rounding: str) -> F32:
    """Half-range a_j (K,) of each component's grid: ``min(clip_j, g(b_j)·scales_j)``, 0 if b_j = 0."""
    table = np.asarray((0.0, *LOADING[rounding]), dtype=np.float64)
    a = np.minimum(clip.astype(np.float64), table[bits] * scales.astype(np.float64))
    return np.where(bits > 0, a, 0.0).astype(np.float32)


def row_bits_for(*, raw_bytes: int, ratio: float, overhead: int, live_rows: int, rank: int) -> int:
    """Bits B per live row of a frame of ``raw_bytes`` input bytes at ``ratio``.

    ``overhead``: stored bytes of the frame's other sections (the dense outliers). The codes
    then take ``ceil(live_rows·B/8) <= floor(raw_bytes/ratio) − overhead`` bytes. Raises
    :class:`CodecError` naming the highest achievable ratio when the budget does not cover the
    overhead plus one bit per live row (the smallest frame the chain can make).
    """
    budget = math.floor(raw_bytes / ratio) - overhead
    bits = min(MAX_BITS * rank, (8 * budget) // live_rows) if live_rows else 0
    if budget < 0 or (live_rows and bits < 1):
        smallest = overhead + (live_rows + 7) // 8
        raise CodecError(
            f"codec.quantize.ratio = {ratio:g} is out of reach for this frame: the outlier sections "
            f"({overhead} bytes) plus 1 bit per token ({live_rows} tokens) need {smallest} of the "
            f"{raw_bytes} raw bytes, so the highest achievable ratio is {raw_bytes / smallest:.4g}; "
            "lower the ratio (or the outlier stage's rows/channels)"
        )
    return int(bits)


def restore_for_basis(clean: F32, x: F32, cols: I64, positions: I64, mean: F32) -> None:
    """Undo the outlier stage's zeroing of ``clean`` (N, C) in place, so coefficients stay calibrated.

    The basis was fitted on rows *with* their outlier channels, and its small components are
    small only because channels cancel: zeroed channels ``cols`` would add −x_c·V[c] to every
    component, far outside the calibrated range of the small ones, which then clip. So the
    channels get their values back from ``x`` (N, C), and the massive elements at flat
    ``positions`` get the basis ``mean`` (x − mean = 0: they add nothing). The decoder
    overwrites all of them with the outlier stage's values anyway.
    """
    if cols.size:
        clean[:, cols] = x[:, cols]
    if positions.size:
        clean.reshape(-1)[positions] = mean[positions % clean.shape[1]]


def code_nbytes(live_rows: int, row_bits: int) -> int:
    """Bytes of the packed codes of ``live_rows`` rows of ``row_bits`` bits."""
    return (live_rows * row_bits + 7) // 8


def _fields(bits: I64) -> tuple[I64, U8]:
    """(active components, bit position inside its field for each of the B row bits)."""
    active = np.flatnonzero(bits > 0).astype(np.int64)
    shifts = np.concatenate(
        [np.arange(int(b), dtype=np.uint8) for b in bits[active]] or [np.zeros(0, np.uint8)]
    )
    return active, shifts.astype(np.uint8)


def encode_components(coeffs: F32, bits: I64, ranges: F32, rounding: str, rng: np.random.Generator) -> U8:
    """Packed codes (``code_nbytes(N, sum(bits))`` bytes) of coefficients (N, K).

    ``bits`` (K,) from :func:`allocate_bits`, ``ranges`` (K,) from :func:`clip_ranges`;
    ``rounding`` is ``"nearest"`` or ``"stochastic"`` (uniform noise from ``rng``).
    """
    active, shifts = _fields(bits)
    n = coeffs.shape[0]
    if active.size == 0 or n == 0:
        return np.zeros(code_nbytes(n, int(bits.sum())), dtype=np.uint8)
    top = (np.int64(1) << bits[active]) - 1
    a = ranges[active]
    step = (2 * a / top).astype(np.float32)
    inv = np.zeros_like(step)
    np.divide(np.float32(1), step, out=inv, where=step > 0)
    t = (np.clip(coeffs[:, active], -a, a) + a) * inv
    if rounding == "stochastic":
        t += rng.random(t.shape, dtype=np.float32)
        np.floor(t, out=t)
    else:
        np.rint(t, out=t)
    codes = np.clip(t, 0, top.astype(np.float32)).astype(np.uint8)
    field = np.repeat(np.arange(active.size), bits[active])
    planes = (codes[:, field] >> shifts) & np.uint8(1)
    packed: U8 = np.packbits(planes.reshape(-1), bitorder="little")
    return packed


def decode_components(data: U8, n: int, bits: I64, ranges: F32) -> F32:
    """Coefficients (N, K) from :func:`encode_components`'s bytes; dropped components are 0.

    Raises :class:`CodecError` unless ``data`` is exactly ``code_nbytes(N, sum(bits))`` bytes.
    """
    k = bits.shape[0]
    row_bits = int(bits.sum())
    if data.size != code_nbytes(n, row_bits):
        raise CodecError(
            f"component code section has {data.size} bytes, expected {code_nbytes(n, row_bits)} "
            f"({n} rows x {row_bits} bits)"
        )
    out = np.zeros((n, k), dtype=np.float32)
    active, shifts = _fields(bits)
    if active.size == 0 or n == 0:
        return out
    planes = np.unpackbits(data, count=n * row_bits, bitorder="little").reshape(n, row_bits)
    weighted = planes.astype(np.uint16) << shifts.astype(np.uint16)
    starts = np.concatenate([[0], np.cumsum(bits[active])[:-1]]).astype(np.int64)
    codes = np.add.reduceat(weighted, starts, axis=1)
    top = (np.int64(1) << bits[active]) - 1
    a = ranges[active]
    step = (2 * a / top).astype(np.float32)
    out[:, active] = codes.astype(np.float32) * step - a
    return out


def write_frame(
    live: F32,
    basis: Basis,
    meta: dict[str, Any],
    writer: SectionWriter,
    stage_bytes: dict[str, int],
    *,
    ratio: float,
    dense_cols: I64,
    rounding: str,
    rng: np.random.Generator,
) -> None:
    """Write the live rows' coefficients (N_live, K) at a fixed rate: the frame (with what
    ``writer`` already holds) takes at most ``raw bytes ÷ ratio``; the codes section is raw,
    its size is the contract. Meta: ``quantize = {row_bits, rows}``. Raises
    :class:`CodecError` (from :func:`row_bits_for`) when the ratio is out of reach."""
    rank = int(meta["project"]["rank"])
    overhead = sum(writer.stored_bytes.values())
    row_bits = row_bits_for(
        raw_bytes=stage_bytes["input"], ratio=ratio, overhead=overhead, live_rows=live.shape[0], rank=rank
    )
    scales = coded_scales(basis.scales[:rank], dense_cols, center=basis.vectors is None)
    bits = allocate_bits(scales, row_bits)
    ranges = clip_ranges(basis.scales[:rank], basis.clip[:rank], bits, rounding)
    packed = encode_components(live, bits, ranges, rounding, rng)
    meta["quantize"] = {"row_bits": row_bits, "rows": int(live.shape[0])}
    meta["rate"] = {"target": int(stage_bytes["input"] / ratio), "zero": row_bits == 0}
    writer.add("codes", packed, compress=False)
    stage_bytes["quantize"] = overhead + packed.nbytes
