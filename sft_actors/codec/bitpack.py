"""Vectorised bit-level packing: b-bit codes, position bitmaps and delta-varint streams.

All functions are pure numpy, allocate output proportional to their input, and raise
:class:`CodecError` when a stream does not have the length its caller expects (decoders are
fed peer data).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from sft_actors.errors import CodecError

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_codes(codes: U8, bits: int) -> U8:
    """Pack ``codes`` (each < 2**bits) into a dense little-bit-order stream."""
    n = codes.size
    if bits == 8:
        return codes
    per_byte = 8 // bits if 8 % bits == 0 else 0
    if per_byte:
        # 1, 2 and 4 bits: several whole codes per byte, lowest code in the lowest bits.
        padded = np.zeros(-(-n // per_byte) * per_byte, dtype=np.uint8)
        padded[:n] = codes
        lanes = padded.reshape(-1, per_byte)
        out = lanes[:, 0].copy()
        for lane in range(1, per_byte):
            out |= lanes[:, lane] << np.uint8(lane * bits)
        return out
    # 3, 5, 6, 7 bits: spread into bit planes (8x the codes, fine for the ~1M values we see).
    planes = (codes[:, None] >> np.arange(bits, dtype=np.uint8)) & np.uint8(1)
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_codes(data: U8, count: int, bits: int) -> U8:
    """Inverse of :func:`pack_codes`; ``data`` must be exactly ``packed_nbytes(count, bits)`` long."""
    if data.size != packed_nbytes(count, bits):
        raise CodecError(
            f"{bits}-bit code stream has {data.size} bytes, expected {packed_nbytes(count, bits)}"
        )
    if bits == 8:
        return data
    per_byte = 8 // bits if 8 % bits == 0 else 0
    if per_byte:
        mask = np.uint8((1 << bits) - 1)
        lanes = np.empty((data.size, per_byte), dtype=np.uint8)
        for lane in range(per_byte):
            lanes[:, lane] = (data >> np.uint8(lane * bits)) & mask
        return lanes.reshape(-1)[:count]
    planes = np.unpackbits(data, bitorder="little")[: count * bits].reshape(count, bits)
    weights = (np.uint8(1) << np.arange(bits, dtype=np.uint8)).astype(np.uint8)
    codes: U8 = (planes * weights).sum(axis=1, dtype=np.uint8)
    return codes


def bitmap_to_mask(data: U8, count: int) -> npt.NDArray[np.bool_]:
    """Unpack a big-endian-bit bitmap (``np.packbits`` order) of exactly ``count`` bits."""
    if data.size != (count + 7) // 8:
        raise CodecError(f"position bitmap has {data.size} bytes, expected {(count + 7) // 8}")
    return np.unpackbits(data, count=count).view(np.bool_)


def encode_varints(values: I64) -> U8:
    """LEB128 unsigned varints of non-negative ``values`` (gaps between kept positions)."""
    if values.size == 0:
        return np.zeros(0, dtype=np.uint8)
    v = values.astype(np.uint64)
    nbytes = np.ones(v.size, dtype=np.int64)
    for k in range(1, 10):
        nbytes += v >= np.uint64(1 << (7 * k))
    ends = np.cumsum(nbytes)
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    starts = ends - nbytes
    for k in range(int(nbytes.max())):
        sel = nbytes > k
        chunk = (v[sel] >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = (nbytes[sel] > k + 1).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + k] = (chunk | more).astype(np.uint8)
    return out


def decode_varints(data: U8, count: int, limit: int) -> I64:
    """Decode exactly ``count`` varints, each ``< limit``; CodecError on any inconsistency."""
    terminators = np.flatnonzero(data < 0x80)
    if terminators.size != count or (count and terminators[-1] != data.size - 1):
        raise CodecError(f"varint stream holds {terminators.size} complete values, expected {count}")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.empty(count, dtype=np.int64)
    starts[0] = 0
    starts[1:] = terminators[:-1] + 1
    lengths = terminators - starts + 1
    if int(lengths.max()) > 9:
        raise CodecError("varint longer than 9 bytes in position stream")
    payload = (data & 0x7F).astype(np.int64)
    out = np.zeros(count, dtype=np.int64)
    for k in range(int(lengths.max())):
        sel = lengths > k
        out[sel] |= payload[starts[sel] + k] << (7 * k)
    if out.size and (int(out.min()) < 0 or int(out.max()) >= limit):
        raise CodecError("position gap out of range")
    return out


def zigzag(values: I64) -> I64:
    """Signed integers → non-negative ones for varints: 0, -1, 1, -2, … → 0, 1, 2, 3, …"""
    return (values << 1) ^ (values >> 63)


def unzigzag(values: I64) -> I64:
    """Inverse of :func:`zigzag`."""
    return (values >> 1) ^ -(values & 1)
