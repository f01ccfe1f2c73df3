"""The dense part of the outlier stage at 8 bits: first-token rows and outlier channels.

At 16 bit every value of those rows/channels goes as float16 (2 bytes). At 8 bit the *massive*
single values in them (attention-sink channels of ×100-1000, spikes inside an outlier channel)
are pulled out and sent as float16 with their positions, and what remains is quantized to 8-bit
sign-magnitude codes, one step per row (first tokens) or per channel (outlier channels), with
unbiased stochastic rounding. Removing the massive values first keeps those steps small: the
rest of a first-token row is then coded as finely as an ordinary token.

Layout (sections, in this order): ``o_rows``, ``o_cols``, ``o_pos`` (sorted flat positions of
the massive values, int64), ``o_steps`` (bfloat16: rows, then channels), ``o_codes`` (uint8:
rows row-major, then the channels of the remaining rows row-major), ``o_vals`` (float16 ×
2^exp: massive values in position order).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from sft_actors.codec import quantize
from sft_actors.codec.container import SectionReader, SectionWriter
from sft_actors.codec.sparse import Exclusions
from sft_actors.errors import CodecError

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

BITS = 8
# A value of a dense row/channel is "massive" above element_factor × its 90th percentile of |x|
# (a Student-t(5) tail 8× beyond it has probability ~1e-4); robust with few channels.
_REFERENCE_QUANTILE = 0.9


def scaled_float16(values: F32) -> tuple[npt.NDArray[np.float16], int]:
    """float16 after scaling by 2^-exp so the largest magnitude sits near the top of its range."""
    peak = float(np.abs(values).max()) if values.size else 0.0
    exponent = math.frexp(peak)[1] - 15 if peak > 0 else 0
    return np.ldexp(values, -exponent).astype(np.float16), exponent


def _massive_above(block: F32, axis: int, factor: float) -> F32:
    reference = np.quantile(np.abs(block), _REFERENCE_QUANTILE, axis=axis).astype(np.float32)
    return np.where(reference > 0, factor * reference, np.inf).astype(np.float32)


def _pull_massive(block: F32, above: F32 | float) -> tuple[I64, I64, F32]:
    """(row, column, value) of |block| > above; those entries of ``block`` are zeroed in place."""
    r, c = np.nonzero(np.abs(block) > above)
    values = block[r, c].copy()
    block[r, c] = 0
    return r.astype(np.int64), c.astype(np.int64), values


def encode_dense8(
    x: F32,
    rows: I64,
    cols: I64,
    bulk_massive: tuple[I64, F32],
    *,
    element_factor: float,
    rng: np.random.Generator,
    writer: SectionWriter,
) -> tuple[dict[str, int], int, int]:
    """Write the 8-bit dense outliers; return (meta table, stored bytes, values transmitted)."""
    n, c = x.shape
    live = np.ones(n, dtype=np.bool_)
    live[rows] = False
    head = x[rows]  # copies (fancy indexing)
    body = x[live][:, cols]
    # Each dense row/channel is measured against its own 90th percentile: a sink token's
    # massive channels and a spike inside an outlier channel leave, the ordinary values stay.
    if head.size:
        hr, hc, hv = _pull_massive(head, _massive_above(head, 1, element_factor)[:, None])
    else:
        hr, hc, hv = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if body.size:
        br, bc, bv = _pull_massive(body, _massive_above(body, 0, element_factor)[None, :])
    else:
        br, bc, bv = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    positions = np.concatenate(
        [bulk_massive[0], rows[hr] * c + hc, np.flatnonzero(live)[br] * c + cols[bc]]
    ).astype(np.int64)
    massive = np.concatenate([bulk_massive[1], hv, bv]).astype(np.float32)
    order = np.argsort(positions, kind="stable")
    positions, massive = positions[order], massive[order]
    top = np.float32(quantize.levels(BITS))
    row_peak = np.abs(head).max(axis=1) if head.size else np.zeros(rows.size, np.float32)
    col_peak = np.abs(body).max(axis=0) if body.size else np.zeros(cols.size, np.float32)
    peaks = np.concatenate([row_peak, col_peak]).astype(np.float32)
    steps_wire, steps = quantize.bf16_round_up(peaks / top)
    inv = quantize.inverse_steps(steps)
    zero = np.float32(0)
    head_codes = quantize.quantize_sign_magnitude(head, zero, inv[: rows.size, None], BITS, rng)
    body_codes = quantize.quantize_sign_magnitude(body, zero, inv[None, rows.size :], BITS, rng)
    codes = np.concatenate([head_codes.reshape(-1), body_codes.reshape(-1)])
    scaled, exponent = scaled_float16(massive)
    writer.add("o_rows", rows.astype(np.uint32).view(np.uint8))
    writer.add("o_cols", cols.astype(np.uint32).view(np.uint8))
    writer.add("o_pos", positions.astype("<i8").view(np.uint8))
    writer.add("o_steps", steps_wire.view(np.uint8))
    writer.add("o_codes", codes)
    writer.add("o_vals", scaled.view(np.uint8))
    names = ("o_rows", "o_cols", "o_pos", "o_steps", "o_codes", "o_vals")
    stored = sum(writer.stored_bytes[name] for name in names)
    table = {"rows": int(rows.size), "cols": int(cols.size), "elements": int(positions.size), "exp": exponent}
    return table, stored, int(codes.size + massive.size)


def decode_dense8(
    reader: SectionReader, rows: I64, cols: I64, positions: I64, n: int, c: int, exponent: int
) -> F32:
    """Dense values in the order the decoder scatters them: rows, channels, massive values."""
    head_count = rows.size * c
    body_count = (n - rows.size) * cols.size
    steps = quantize.bf16_to_f32(reader.take("o_steps", 2 * (rows.size + cols.size)).view(np.uint16))
    codes = reader.take("o_codes", head_count + body_count)
    if not bool(np.isfinite(steps).all()):
        raise CodecError("outlier steps must be finite")
    out = np.empty(head_count + body_count + positions.size, dtype=np.float32)
    if head_count:
        out[:head_count] = quantize.dequantize_sign_magnitude(
            codes[:head_count].reshape(rows.size, c), np.float32(0), steps[: rows.size, None], BITS
        ).reshape(-1)
    if body_count:
        out[head_count : head_count + body_count] = quantize.dequantize_sign_magnitude(
            codes[head_count:].reshape(-1, cols.size), np.float32(0), steps[None, rows.size :], BITS
        ).reshape(-1)
    massive = reader.take("o_vals", 2 * positions.size).view(np.float16).astype(np.float32)
    out[head_count + body_count :] = np.ldexp(massive, exponent)
    return out


def encode_dense16(
    x: F32, rows: I64, excl: Exclusions, positions: I64, elements: F32, writer: SectionWriter
) -> tuple[dict[str, int], int, int]:
    """Rows ``rows`` and columns ``excl.cols`` of ``x`` (N, C) and the massive ``elements``
    as scaled float16 (see :func:`scaled_float16`). Returns (meta table, stored bytes, values
    sent); CodecError if any of them is not finite."""
    dense = np.concatenate([x[rows].reshape(-1), x[:, excl.cols][~excl.rows].reshape(-1), elements])
    if not bool(np.isfinite(dense).all()):
        raise CodecError("tensor contains NaN or inf: fix the producer (e.g. lower the learning rate)")
    scaled, exponent = scaled_float16(dense)
    table = {
        "rows": int(rows.size),
        "cols": int(excl.cols.size),
        "elements": int(positions.size),
        "exp": exponent,
    }
    writer.add("o_rows", rows.astype(np.uint32).view(np.uint8))
    writer.add("o_cols", excl.cols.astype(np.uint32).view(np.uint8))
    writer.add("o_pos", positions.astype("<i8").view(np.uint8))
    writer.add("o_vals", scaled.view(np.uint8))
    stored = 4 * (rows.size + excl.cols.size) + 8 * positions.size + scaled.nbytes
    return table, int(stored), int(dense.size)
