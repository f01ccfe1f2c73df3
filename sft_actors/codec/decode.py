"""Decoding: metadata + payload (from an untrusted peer) back to a tensor.

Every count in the metadata is checked against the shape before anything is allocated, and
every section against the size the counts imply; whatever is wrong raises :class:`CodecError`.
"""

from __future__ import annotations

import math
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch

from sft_actors.codec import allocate, bitpack, quantize
from sft_actors.codec.container import SectionReader
from sft_actors.codec.entropy import MAX_ALPHABET, MAX_GROUPS, ans_decode_columns
from sft_actors.codec.format import DTYPES, FORMAT_VERSION, RAW_VIEW, per_row_lo, rows_view
from sft_actors.codec.outliers import decode_dense8
from sft_actors.codec.project import BasisRegistry, unproject
from sft_actors.codec.spec import ChainSpec
from sft_actors.errors import CodecError, ConfigError

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
BoolArr = npt.NDArray[np.bool_]

_MAX_NDIM: Final[int] = 16


def _int(table: Any, key: str, low: int, high: int) -> int:
    value = table.get(key) if isinstance(table, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CodecError(f"meta field {key!r} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _table(meta: dict[str, Any], key: str) -> dict[str, Any]:
    value = meta.get(key)
    if not isinstance(value, dict):
        raise CodecError(f"meta lacks the {key!r} table its chain needs")
    return value


def decode(
    meta: dict[str, Any], payload: bytes | memoryview, *, bases: BasisRegistry | None, max_elements: int
) -> torch.Tensor:
    if not isinstance(meta, dict):
        raise CodecError(f"codec meta must be a dict, got {type(meta).__name__}")
    if meta.get("format") != FORMAT_VERSION:
        raise CodecError(
            f"unsupported codec format {meta.get('format')!r}; this build reads {FORMAT_VERSION}"
        )
    dtype_name = meta.get("dtype")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise CodecError(f"meta dtype {dtype_name!r} is not one of {sorted(DTYPES)}")
    shape = meta.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= max_elements for d in shape)
    ):
        raise CodecError(f"meta shape must be a list of at most {_MAX_NDIM} non-negative ints, got {shape!r}")
    numel = math.prod(shape)
    if numel > max_elements:
        raise CodecError(f"tensor of {numel} elements exceeds the decode limit of {max_elements}")
    try:
        spec = ChainSpec.from_dict(meta.get("chain"))  # type: ignore[arg-type]
    except ConfigError as exc:
        raise CodecError(f"meta chain is invalid: {exc}") from exc
    reader = SectionReader(meta.get("sections"), payload)
    dtype = DTYPES[dtype_name]
    if numel == 0:
        reader.finish()
        return torch.empty(shape, dtype=dtype)
    if spec.is_identity:
        _, np_view = RAW_VIEW[dtype_name]
        raw = reader.take("raw", numel * dtype.itemsize)
        reader.finish()
        return torch.from_numpy(raw.view(np_view).reshape(shape).copy()).view(dtype)
    rows, channels, _ = rows_view(tuple(shape))
    out = _LossyDecoder(spec, meta, reader, bases, rows, channels).run()
    reader.finish()
    if not bool(np.isfinite(out).all()):  # a tampered step or scale; the encoder never sends one
        raise CodecError("decoded values are not finite: the metadata or payload is corrupt")
    return torch.from_numpy(out).reshape(shape).to(dtype)


class _LossyDecoder:
    def __init__(
        self,
        spec: ChainSpec,
        meta: dict[str, Any],
        reader: SectionReader,
        bases: BasisRegistry | None,
        rows: int,
        channels: int,
    ) -> None:
        self.spec, self.meta, self.reader, self.bases = spec, meta, reader, bases
        self.rows, self.channels = rows, channels

    def run(self) -> F32:
        n, c = self.rows, self.channels
        dense = self._read_dense16() if self.spec.outliers is not None else None
        none = np.zeros(0, dtype=np.int64)
        self.dense_rows, self.dense_cols = (dense[0], dense[1]) if dense is not None else (none, none)
        basis = None
        k = c
        if self.spec.project is not None:
            basis, k = self._basis()
        w = self._read_work(n, k)
        out = unproject(w, basis, k) if basis is not None else w
        if dense is not None:
            rows, cols, positions, vals = dense
            head = rows.size * c
            out[rows] = vals[:head].reshape(-1, c)
            if cols.size:
                live = np.ones(n, dtype=np.bool_)
                live[rows] = False
                body = vals[head : head + (n - rows.size) * cols.size].reshape(-1, cols.size)
                out[np.ix_(np.flatnonzero(live), cols)] = body
            out.reshape(-1)[positions] = vals[vals.size - positions.size :]
        return out

    def _read_dense16(self) -> tuple[I64, I64, I64, F32]:
        info = _table(self.meta, "outliers")
        n, c = self.rows, self.channels
        n_rows = _int(info, "rows", 0, n)
        n_cols = _int(info, "cols", 0, c)
        n_elements = _int(info, "elements", 0, n * c)
        exponent = _int(info, "exp", -400, 400)
        rows = self._indices("o_rows", n_rows, n, np.uint32)
        cols = self._indices("o_cols", n_cols, c, np.uint32)
        positions = self._indices("o_pos", n_elements, n * c, np.int64)
        count = n_rows * c + (n - n_rows) * n_cols + n_elements
        if count > n * c:
            raise CodecError("outlier sections claim more values than the tensor has")
        assert self.spec.outliers is not None
        if self.spec.outliers.bits == 8:
            return rows, cols, positions, decode_dense8(self.reader, rows, cols, positions, n, c, exponent)
        vals = self.reader.take("o_vals", 2 * count).view(np.float16).astype(np.float32)
        return rows, cols, positions, np.ldexp(vals, exponent).astype(np.float32)

    def _indices(self, name: str, count: int, limit: int, dtype: type[np.generic]) -> I64:
        size = np.dtype(dtype).itemsize
        idx = self.reader.take(name, size * count).view(dtype).astype(np.int64)
        if idx.size and int(idx[0]) < 0:
            raise CodecError(f"section {name!r} holds a negative index")
        if idx.size and (int(idx[-1]) >= limit or (idx.size > 1 and not bool((np.diff(idx) > 0).all()))):
            raise CodecError(f"section {name!r} must hold strictly increasing indices below {limit}")
        return idx

    def _basis(self) -> tuple[Any, int]:
        assert self.spec.project is not None
        if self.bases is None:
            raise CodecError(
                f"tensor was projected on basis {self.spec.project.basis!r}: pass bases=registry to decode"
            )
        info = _table(self.meta, "project")
        digest = info.get("digest")
        if not isinstance(digest, str):
            raise CodecError("meta project.digest must be a string")
        # By digest: a frame coded before the sender refitted its basis still decodes.
        basis = self.bases.get(self.spec.project.basis, digest)
        if basis.channels != self.channels:
            raise CodecError(f"basis has {basis.channels} channels, tensor has {self.channels}")
        return basis, _int(info, "rank", 1, basis.rank)

    # --- sparse / dense work matrix --------------------------------------------------------
    def _read_work(self, n: int, k: int) -> F32:
        s = self.spec.sparsify
        if s is None:
            return self._read_dense(n, k)
        info = _table(self.meta, "sparsify")
        if s.scope == "tokens":
            chosen = self._flags(n)
            _check_kept(info, chosen.size)
            w = np.zeros((n, k), dtype=np.float32)
            w[chosen] = self._read_dense(chosen.size, k)
            return w
        if s.scope == "channels":
            chosen = self._flags(k)
            _check_kept(info, chosen.size)
            w = np.zeros((n, k), dtype=np.float32)
            w[:, chosen] = self._read_dense(n, chosen.size)
            return w
        kept = _int(info, "kept", 0, n * k)
        layout = self.spec.lossless.positions if self.spec.lossless is not None else "bitmap"
        mask = self._positions(layout, n, k, kept)
        counts = np.count_nonzero(mask, axis=1)
        values = self._read_sparse_values(kept, counts, mask, k, per_row=per_row_lo(s))
        w = np.zeros((n, k), dtype=np.float32)
        np.place(w, mask, values)
        return w

    def _flags(self, size: int) -> I64:
        return np.flatnonzero(bitpack.bitmap_to_mask(self.reader.take("pos", (size + 7) // 8), size))

    def _positions(self, layout: str, n: int, k: int, kept: int) -> BoolArr:
        if layout == "bitmap":
            mask = bitpack.bitmap_to_mask(self.reader.take("pos", (n * k + 7) // 8), n * k).reshape(n, k)
        elif layout == "channel_bitmap":
            per_channel = (n + 7) // 8
            order = self.reader.take("perm", 4 * k).view(np.uint32).astype(np.int64)
            if not np.array_equal(np.sort(order), np.arange(k)):
                raise CodecError("channel order of the position bitmap is not a permutation")
            data = np.empty((k, per_channel), dtype=np.uint8)
            data[order] = self.reader.take("pos", k * per_channel).reshape(k, per_channel)
            mask = np.ascontiguousarray(np.unpackbits(data, axis=1, count=n).view(np.bool_).T)
        else:
            width = max(1, math.ceil(max(n * k, 2).bit_length() / 7))
            data = self.reader.take_bounded("pos", kept * width)
            gaps = bitpack.decode_varints(data, kept, limit=n * k)
            flat = np.cumsum(gaps + 1) - 1
            if flat.size and int(flat[-1]) >= n * k:
                raise CodecError("delta positions run past the end of the tensor")
            flat_mask = np.zeros(n * k, dtype=np.bool_)
            flat_mask[flat] = True
            mask = flat_mask.reshape(n, k)
        if int(np.count_nonzero(mask)) != kept:
            raise CodecError(f"positions mark {int(np.count_nonzero(mask))} values, meta says {kept}")
        return mask

    def _read_sparse_values(self, kept: int, counts: I64, mask: BoolArr, k: int, *, per_row: bool) -> F32:
        q = self.spec.quantize
        if q is None or q.scale == "common":
            return self._read_plain(kept)
        assert q.bits is not None
        n = counts.size
        per_row_lo = per_row and q.scale == "token"
        lo = quantize.bf16_to_f32(self.reader.take("lo", 2 * (n if per_row_lo else 1)).view(np.uint16))
        codes = self._codes(kept, q.bits)
        if q.scale == "token":
            step = np.repeat(self._steps(n), counts)
            lo_values: F32 | np.float32 = np.repeat(lo, counts) if per_row_lo else lo[0]
        else:
            cols = np.flatnonzero(mask) % k
            step = self._steps(k)[cols]
            lo_values = lo[0]
        return quantize.dequantize_sign_magnitude(codes, lo_values, step, q.bits)

    def _read_dense(self, n: int, k: int) -> F32:
        q = self.spec.quantize
        if q is not None and q.scale == "common" and "contexts" in _table(self.meta, "quantize"):
            return self._read_contexts(n, k)
        if q is not None and q.scale == "component":
            return self._read_component(n, k)
        if q is None or q.scale == "common":
            return self._read_plain(n * k).reshape(n, k)
        assert q.bits is not None
        codes = self._codes(n * k, q.bits).reshape(n, k)
        step = self._steps(n)[:, None] if q.scale == "token" else self._steps(k)[None, :]
        return quantize.dequantize_sign_magnitude(codes, np.float32(0), step, q.bits)

    def _read_contexts(self, n: int, k: int) -> F32:
        """Common-step codes (N, K) coded with one histogram per column group."""
        info = _table(self.meta, "quantize")
        step = info.get("step")
        if not isinstance(step, float) or not math.isfinite(step) or step <= 0:
            raise CodecError(f"meta quantize.step must be a positive float, got {step!r}")
        # A table holds (min, alphabet, counts...) per group: bounded by the groups' alphabets.
        size = _int(info, "contexts", 0, MAX_GROUPS * (2 + MAX_ALPHABET))
        groups = self.reader.take("ctx_groups", k)
        if groups.size and int(groups.max()) >= MAX_GROUPS:
            raise CodecError(f"column context {int(groups.max())} out of range")
        table = bitpack.unzigzag(
            bitpack.decode_varints(self.reader.take_bounded("ctx_table", 10 * size), size, 1 << 62)
        )
        words = bytes(self.reader.take_bounded("codes", 4 * (n * k + 1024)))
        codes = ans_decode_columns(words, table, groups, n)
        if codes.size and int(np.abs(codes).max()) > quantize.MAX_COMMON_CODE:
            raise CodecError("common-step code out of range")
        return quantize.dequantize_common(codes.astype(np.int32), step).reshape(n, k)

    def _read_component(self, n: int, k: int) -> F32:
        """Fixed-rate coefficients (N, K): the row budget is re-derived and must match the meta."""
        q = self.spec.quantize
        assert q is not None and q.ratio is not None
        basis, rank = self._basis()
        if rank != k:
            raise CodecError(f"meta project.rank {rank} does not match the {k} components decoded")
        live = np.ones(n, dtype=np.bool_)
        live[self.dense_rows] = False
        n_live = int(np.count_nonzero(live))
        overhead = sum(int(e[1]) for e in self.meta["sections"] if e[0] != "codes")
        raw_bytes = math.prod(self.meta["shape"]) * DTYPES[self.meta["dtype"]].itemsize
        row_bits = allocate.row_bits_for(
            raw_bytes=raw_bytes, ratio=q.ratio, overhead=overhead, live_rows=n_live, rank=k
        )
        info = _table(self.meta, "quantize")
        if _int(info, "row_bits", 0, allocate.MAX_BITS * k) != row_bits or _int(info, "rows", 0, n) != n_live:
            raise CodecError(f"meta quantize {info!r} does not match {n_live} rows of {row_bits} bits")
        scales = allocate.coded_scales(basis.scales[:k], self.dense_cols, center=basis.vectors is None)
        bits = allocate.allocate_bits(scales, row_bits)
        ranges = allocate.clip_ranges(basis.scales[:k], basis.clip[:k], bits, q.rounding)
        data = self.reader.take("codes", allocate.code_nbytes(n_live, row_bits))
        out = np.zeros((n, k), dtype=np.float32)
        out[live] = allocate.decode_components(data, n_live, bits, ranges)
        return out

    def _steps(self, count: int) -> F32:
        return quantize.bf16_to_f32(self.reader.take("steps", 2 * count).view(np.uint16))

    def _codes(self, count: int, bits: int) -> npt.NDArray[np.uint8]:
        if self.reader.encoding_of("codes") == "ans":
            symbols = self.reader.take_ans("codes", count)
            if symbols.size and (int(symbols.min()) < 0 or int(symbols.max()) >= 1 << bits):
                raise CodecError(f"code out of range for {bits} bits")
            return symbols.astype(np.uint8)
        return bitpack.unpack_codes(
            self.reader.take("codes", bitpack.packed_nbytes(count, bits)), count, bits
        )

    def _read_plain(self, count: int) -> F32:
        q, c = self.spec.quantize, self.spec.cast
        if q is not None:
            info = _table(self.meta, "quantize")
            step = info.get("step")
            if not isinstance(step, float) or not math.isfinite(step) or step <= 0:
                raise CodecError(f"meta quantize.step must be a positive float, got {step!r}")
            width = _int(info, "width", 1, 4)
            if width not in (1, 2, 4):
                raise CodecError(f"meta quantize.width must be 1, 2 or 4, got {width}")
            widths: dict[int, type[np.generic]] = {1: np.int8, 2: np.int16, 4: np.int32}
            raw_dtype = widths[width]
            codes = self.reader.take_symbols("codes", count, raw_dtype)
            if codes.size and max(abs(int(codes.min())), abs(int(codes.max()))) > quantize.MAX_COMMON_CODE:
                raise CodecError("common-step code out of range")
            return quantize.dequantize_common(codes.astype(np.int32), step)
        if c is not None:
            raw = self.reader.take("values", 2 * count).view(np.int16)
            torch_dtype = torch.float16 if c.dtype == "float16" else torch.bfloat16
            return torch.from_numpy(raw.copy()).view(torch_dtype).float().numpy()
        return self.reader.take("values", 4 * count).view(np.float32).copy()


def _check_kept(info: dict[str, Any], actual: int) -> None:
    if info.get("kept") != actual:
        raise CodecError(
            f"meta sparsify.kept {info.get('kept')!r} does not match the {actual} flagged positions"
        )
