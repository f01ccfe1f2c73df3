"""The lossy encoder: one encode of a non-identity chain, stage by stage (see ``chain``).

:class:`LossyEncoder` writes the sections and fills the metadata that ``decode`` reads back;
``chain.Codec`` validates the input and handles the identity and empty cases.
"""

from __future__ import annotations

import math
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch

from sft_actors.codec import allocate, bitpack, quantize, rate
from sft_actors.codec.container import SectionWriter
from sft_actors.codec.format import per_row_lo, rows_view
from sft_actors.codec.outliers import encode_dense8, encode_dense16
from sft_actors.codec.project import BasisRegistry, project
from sft_actors.codec.sparse import (
    Exclusions,
    MassiveFilter,
    SparseSelection,
    first_token_rows,
    outlier_channels,
    row_normalized_threshold,
    scan_rows,
    select_elements,
    structured_scores,
    tensor_threshold,
    top_indices,
)
from sft_actors.codec.spec import ChainSpec
from sft_actors.errors import CodecError

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

# Salt that separates the selection's random sample from the rounding noise.
_SAMPLE_SALT: Final[int] = 0x5EED_5A3F


def seed_generators(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """(sampling, rounding) generators; independent streams from the one seed in the metadata."""
    sampling = np.random.Generator(np.random.PCG64([seed & 0xFFFF_FFFF_FFFF_FFFF, _SAMPLE_SALT]))
    rounding = np.random.Generator(np.random.PCG64(seed & 0xFFFF_FFFF_FFFF_FFFF))
    return sampling, rounding


def _as_rows(x: torch.Tensor) -> F32:
    rows, channels, _ = rows_view(tuple(x.shape))
    flat = x.reshape(rows, channels)
    if flat.dtype != torch.float32:
        flat = flat.to(torch.float32)
    return np.ascontiguousarray(flat.numpy())


class LossyEncoder:
    """One encode of a non-identity chain (a short-lived object so helpers share state)."""

    def __init__(
        self,
        spec: ChainSpec,
        bases: BasisRegistry | None,
        x: torch.Tensor,
        seed: int,
        writer: SectionWriter,
        meta: dict[str, Any],
        stage_bytes: dict[str, int],
    ) -> None:
        self.spec = spec
        self.bases = bases
        self.x = _as_rows(x)
        self.rows, self.channels, self.seq_len = rows_view(tuple(x.shape))
        self.sampling, self.rounding = seed_generators(seed)
        self.writer = writer
        self.meta = meta
        self.stage_bytes = stage_bytes
        self.dense16_bytes = 0
        self.dense16_count = 0

    def run(self) -> float:
        spec = self.spec
        n, c = self.rows, self.channels
        excl = Exclusions(rows=np.zeros(n, dtype=np.bool_), cols=np.zeros(0, dtype=np.int64))
        massive = None
        if spec.outliers is not None:
            first = first_token_rows(n, self.seq_len, spec.outliers.first_tokens)
            cols, reference = outlier_channels(self.x, spec.outliers, self.sampling, first)
            excl = Exclusions(rows=first, cols=cols)
            cap = int(spec.outliers.max_elements_fraction * n * c)
            if cap and reference > 0:
                above = spec.outliers.element_factor * reference
                massive = MassiveFilter(above=above, cap=cap, positions=[], values=[])
        s = spec.sparsify
        w = self.x
        dense_excl = excl  # what the outlier stage sends densely (projection changes ``excl``)
        streaming = spec.project is None and s is not None and s.scope in ("tensor", "token")
        if not streaming:
            # One pass finds massive elements (and NaN/inf); then the lossy stages see a clean copy.
            _check_finite(scan_rows(self.x, excl, massive))
            if massive is not None or excl.any:
                w = self.x.copy()
                w[excl.rows] = 0
                w[:, excl.cols] = 0
                if massive is not None:
                    w.reshape(-1)[massive.result()[0]] = 0
            if spec.project is not None:
                w = self._project(w, excl, massive)
                excl = Exclusions(rows=excl.rows, cols=np.zeros(0, dtype=np.int64))
        # Rate control and fixed rate budget what is left after the dense rows: write them first
        # (the non-streaming path above has already found every massive element).
        rate_first = spec.quantize is not None and spec.quantize.ratio is not None
        if spec.outliers is not None and rate_first:
            self._write_dense16(dense_excl, massive)
        self.live_rows, self.dense_cols = ~dense_excl.rows, dense_excl.cols
        # Massive elements live in activation space and were all pulled out by the scan above;
        # on projected coefficients the filter would remove (and misplace) whole components.
        sparse_count = self._sparse_and_values(w, excl, None if spec.project is not None else massive)
        if spec.outliers is not None and not rate_first:
            self._write_dense16(dense_excl, massive)
        if sparse_count is None:
            return 1.0
        return (sparse_count + self.dense16_count) / (n * c)

    def _write_dense16(self, excl: Exclusions, massive: MassiveFilter | None) -> None:
        rows = np.flatnonzero(excl.rows)
        positions, elements = massive.result() if massive is not None else (np.zeros(0, np.int64), None)
        assert self.spec.outliers is not None
        if self.spec.outliers.bits == 8:
            _check_finite(self.x[rows])
            _check_finite(self.x[:, excl.cols])
            table, stored, count = encode_dense8(
                self.x,
                rows.astype(np.int64),
                excl.cols,
                (positions, elements if elements is not None else np.zeros(0, np.float32)),
                element_factor=self.spec.outliers.element_factor,
                rng=self.rounding,
                writer=self.writer,
            )
            self.meta["outliers"] = table
            self.dense16_bytes, self.dense16_count = stored, count
            self.stage_bytes["outliers"] = stored
            return
        elements = elements if elements is not None else np.zeros(0, np.float32)
        _check_finite(elements)
        table, stored, count = encode_dense16(
            self.x, rows.astype(np.int64), excl, positions, elements, self.writer
        )
        self.meta["outliers"] = table
        self.dense16_bytes, self.dense16_count = stored, count
        self.stage_bytes["outliers"] = stored

    # --- stage 2: projection -----------------------------------------------------------
    def _project(self, clean: F32, excl: Exclusions, massive: MassiveFilter | None = None) -> F32:
        assert self.spec.project is not None and self.bases is not None
        key = self.spec.project.basis
        basis = self.bases.get(key)
        if basis.channels != self.channels:
            raise CodecError(f"basis {key!r} has {basis.channels} channels, the tensor has {self.channels}")
        if self.spec.quantize is not None and self.spec.quantize.scale == "component":
            positions = massive.result()[0] if massive is not None else np.zeros(0, np.int64)
            allocate.restore_for_basis(clean, self.x, excl.cols, positions, basis.mean)
        rank = basis.rank if self.spec.project.rank is None else min(self.spec.project.rank, basis.rank)
        coeffs = project(clean, basis, rank)
        coeffs[excl.rows] = 0
        self.meta["project"] = {"rank": rank, "digest": basis.digest}
        self.stage_bytes["project"] = coeffs.nbytes
        return coeffs

    # --- stages 3-5 ----------------------------------------------------------------------
    def _sparse_and_values(self, w: F32, excl: Exclusions, massive: MassiveFilter | None) -> int | None:
        """Write positions and values; return how many values were kept (None: all of them)."""
        spec = self.spec
        s = spec.sparsify
        if s is None or s.scope in ("tokens", "channels"):
            return self._lines_and_values(w, excl)
        layout = spec.lossless.positions if spec.lossless is not None else "bitmap"
        threshold, row_keep = self._element_cut(w, excl, massive)
        sel = select_elements(
            w,
            threshold=threshold,
            row_keep=row_keep,
            excl=excl,
            layout=layout,
            want_cols=spec.quantize is not None and spec.quantize.scale == "channel",
            massive=massive,
            row_scaled=s.score == "row_normalized",
        )
        _check_finite(sel.rowmax)
        sel.rowmax[excl.rows] = 0
        kept = int(sel.values.size)
        self.meta["sparsify"] = {"kept": kept}
        self._write_positions(sel, layout, w.shape)
        self.stage_bytes["sparsify"] = self.writer.raw_bytes["pos"] + 4 * kept
        self._write_sparse_values(
            sel.values, sel.counts, sel.lo, sel.rowmax, sel.col_ids, sel.colmax, per_row_lo=per_row_lo(s)
        )
        return kept

    def _lines_and_values(self, w: F32, excl: Exclusions) -> int | None:
        """Write W (N, K), or its kept rows/columns, densely; return how many values were kept (None: all)."""
        s = self.spec.sparsify
        dense, lines = (w, 0) if s is None else self._keep_lines(w, excl, s.scope, s.keep)
        self.stage_bytes["sparsify"] = 4 * dense.size + self.writer.raw_bytes.get("pos", 0)
        self._write_dense_values(np.ascontiguousarray(dense, dtype=np.float32))
        if s is None:
            return None
        k = w.shape[1]
        live = (k - excl.cols.size) if s.scope == "tokens" else int(np.count_nonzero(~excl.rows))
        return lines * live

    def _keep_lines(self, w: F32, excl: Exclusions, scope: str, keep: float) -> tuple[F32, int]:
        """(kept sub-matrix, count): the top-energy rows/columns of W (N, K); writes their bitmap."""
        n, k = w.shape
        axis = 1 if scope == "tokens" else 0
        chosen = top_indices(structured_scores(w, excl, axis), keep)
        flags = np.zeros(n if axis == 1 else k, dtype=np.bool_)
        flags[chosen] = True
        self.writer.add("pos", np.packbits(flags))
        self.meta["sparsify"] = {"kept": int(chosen.size)}
        # Excluded rows/columns score -1, so none is chosen; zero the other axis's ones.
        if axis == 1:
            dense = w[chosen]
            dense[:, excl.cols] = 0
        else:
            dense = w[:, chosen]
            dense[excl.rows] = 0
        return dense, int(chosen.size)

    def _element_cut(
        self, w: F32, excl: Exclusions, massive: MassiveFilter | None
    ) -> tuple[np.float32 | None, int | None]:
        """(threshold, row_keep) for ``select_elements``: a per-row count or a tensor-wide threshold."""
        s = self.spec.sparsify
        assert s is not None
        if s.scope == "token":
            live_k = w.shape[1] - excl.cols.size
            row_keep = min(live_k, max(1, round(s.keep * live_k))) if live_k else 0
            return (np.float32(np.inf), None) if row_keep == 0 else (None, row_keep)
        if s.score == "row_normalized":
            threshold = row_normalized_threshold(
                w,
                s.keep,
                exact=s.method == "exact",
                sample_size=s.sample_size,
                excl=excl,
                rng=self.sampling,
                massive_above=massive.above if massive is not None else math.inf,
            )
            return threshold, None
        threshold = tensor_threshold(
            w, s.keep, exact=s.method == "exact", sample_size=s.sample_size, excl=excl, rng=self.sampling
        )
        return threshold, None

    def _write_positions(self, sel: SparseSelection, layout: str, shape: tuple[int, int]) -> None:
        """Write the kept positions of W (N, K): delta varints, channel bitmap, or row bitmap."""
        n, k = shape
        if layout == "delta":
            assert sel.gaps is not None
            self.writer.add("pos", bitpack.encode_varints(sel.gaps))
        elif layout == "channel_bitmap" and n:
            # Channels sorted by density: each zstd block then sees bytes of one density, and its
            # Huffman table comes closer to the per-channel entropy (~5 % fewer position bytes).
            per_channel = sel.positions.reshape(k, -1)
            order = np.argsort(np.bitwise_count(per_channel).sum(axis=1), kind="stable")
            self.writer.add("perm", order.astype(np.uint32).view(np.uint8))
            self.writer.add("pos", per_channel[order])
        else:
            self.writer.add("pos", sel.positions)

    def _write_sparse_values(
        self,
        values: F32,
        counts: I64,
        lo_rows: F32,
        rowmax: F32,
        col_ids: I64 | None,
        colmax: F32 | None,
        *,
        per_row_lo: bool,
    ) -> None:
        q = self.spec.quantize
        if q is None or q.scale == "common":
            self._write_plain_values(values)
            return
        assert q.bits is not None
        top = quantize.levels(q.bits)
        if q.scale == "token":
            lo_source = lo_rows if per_row_lo else lo_rows[:1]
            lo_wire, lo = quantize.bf16_round_down(lo_source)
            peak = np.where(counts > 0, rowmax, 0).astype(np.float32)
            spread = np.maximum(peak - (lo if lo.size > 1 else lo[0]), 0) / np.float32(top)
            spread[counts == 0] = 0
            step_wire, step = quantize.bf16_round_up(spread.astype(np.float32))
            inv = np.repeat(quantize.inverse_steps(step), counts)
            lo_values: F32 | np.float32 = np.repeat(lo, counts) if lo.size > 1 else lo[0]
        else:
            assert col_ids is not None and colmax is not None
            lo_wire, lo = quantize.bf16_round_down(np.zeros(1, np.float32))
            step_wire, step = quantize.bf16_round_up(colmax / np.float32(top))
            inv = quantize.inverse_steps(step)[col_ids]
            lo_values = np.float32(0)
        codes = quantize.quantize_sign_magnitude(values, lo_values, inv, q.bits, self._rng)
        self.writer.add("lo", lo_wire.view(np.uint8))
        self._write_codes(codes, q.bits, step_wire)

    def _write_dense_values(self, dense: F32) -> None:
        q = self.spec.quantize
        if q is not None and q.scale == "component":
            self._write_component_values(dense)
            return
        if q is not None and q.scale == "common":
            self._write_common_frame(dense)
            return
        if q is None:
            self._write_plain_values(dense.reshape(-1))
            return
        assert q.bits is not None
        top = np.float32(quantize.levels(q.bits))
        axis = 1 if q.scale == "token" else 0
        peak = np.abs(dense).max(axis=axis) if dense.size else np.zeros(dense.shape[1 - axis], np.float32)
        step_wire, step = quantize.bf16_round_up(peak / top)
        inv = quantize.inverse_steps(step)
        inv_b = inv[:, None] if axis == 1 else inv[None, :]
        codes = quantize.quantize_sign_magnitude(dense, np.float32(0), inv_b, q.bits, self._rng)
        self._write_codes(codes.reshape(-1), q.bits, step_wire)

    def _write_component_values(self, coeffs: F32) -> None:
        """Fixed rate (see ``allocate``): every live row's coefficients in B bits, no side info."""
        q, p = self.spec.quantize, self.spec.project
        assert q is not None and q.ratio is not None and p is not None and self.bases is not None
        basis = self.bases.get(p.basis, self.meta["project"]["digest"])
        allocate.write_frame(
            coeffs[self.live_rows],
            basis,
            self.meta,
            self.writer,
            self.stage_bytes,
            ratio=q.ratio,
            dense_cols=self.dense_cols,
            rounding=q.rounding,
            rng=self.rounding,
        )

    def _write_codes(self, codes: U8, bits: int, step_wire: npt.NDArray[np.uint16]) -> None:
        self.writer.add("steps", step_wire.view(np.uint8))
        packed = bitpack.pack_codes(codes, bits)
        self.stage_bytes["quantize"] = self._bytes_so_far() + packed.nbytes
        use_ans = self.spec.lossless is not None and self.spec.lossless.entropy == "ans"
        self.writer.add("codes", packed, ans_symbols=codes.astype(np.int64) if use_ans else None)

    def _write_plain_values(self, values: F32) -> None:
        """Unquantized values: fp32, cast to 16 bit, or common-step integer codes."""
        q, c = self.spec.quantize, self.spec.cast
        if q is not None:  # common step (the sparse path: one histogram over the kept values)
            self._write_common_frame(values.reshape(1, -1), contexts=False)
            return
        if c is not None:
            torch_dtype = torch.float16 if c.dtype == "float16" else torch.bfloat16
            cast = torch.from_numpy(values).to(torch_dtype).view(torch.int16).numpy()
            self.stage_bytes["cast"] = self._bytes_so_far() + cast.nbytes
            self.writer.add("values", cast.view(np.uint8))
            return
        self.writer.add("values", np.ascontiguousarray(values).view(np.uint8))

    @property
    def _rng(self) -> np.random.Generator | None:  # None: round to nearest
        q = self.spec.quantize
        return None if q is not None and q.rounding == "nearest" else self.rounding

    def _write_common_frame(self, dense: F32, *, contexts: bool = True) -> None:
        """W (N, K) as common-step codes: per-column ANS contexts and/or rate control."""
        assert self.spec.quantize is not None
        lo = self.spec.lossless
        contexts = contexts and lo is not None and lo.contexts == "column_scale"
        rate.write_frame(
            dense,
            self.spec.quantize,
            self.meta,
            self.writer,
            self.stage_bytes,
            rng=self._rng,
            contexts=contexts,
            ans=lo is not None and lo.entropy == "ans",
        )

    def _bytes_so_far(self) -> int:  # raw (pre-zstd) bytes of the sections written so far
        return sum(self.writer.raw_bytes.values())


def _check_finite(values: F32) -> None:
    if not bool(np.isfinite(values).all()):
        raise CodecError(
            "tensor contains NaN or inf: fix the producer (e.g. lower the learning rate or loss scale)"
        )
