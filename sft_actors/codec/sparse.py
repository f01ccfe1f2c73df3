"""Selection: which elements (or rows / channels) are sent, and which go densely in 16 bit.

Everything works on a 2-D float32 "work matrix" W (rows = tokens, columns = channels or
components) and streams over it in cache-sized row blocks: |W|, the row maxima, the mask, the
bitmap and the kept values of one block are produced while the block is in cache, so the whole
selection reads W from memory about twice instead of once per numpy operation.

Excluded rows/columns (sent densely by the outlier stage) are treated as zeros here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from sft_actors.codec.spec import OutlierSpec

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]
BoolArr = npt.NDArray[np.bool_]

# Bytes of W per block: large enough to amortise per-call overhead, small enough for L2.
_BLOCK_BYTES = 512 * 1024
# Smallest positive float32: "a >= _TINY" means "a > 0", so zeros are never "kept".
_TINY = np.float32(np.finfo(np.float32).smallest_subnormal)


def block_rows(cols: int) -> int:
    """Rows per block, a multiple of 8 so that per-block bitmaps concatenate on byte borders."""
    return max(8, (_BLOCK_BYTES // (4 * max(cols, 1))) // 8 * 8)


@dataclass(kw_only=True, slots=True)
class Exclusions:
    """Rows and columns of W that the sparse/quantized part must ignore."""

    rows: BoolArr  # (N,) True where the row is excluded
    cols: I64  # sorted column indices

    @property
    def any(self) -> bool:
        return bool(self.cols.size) or bool(self.rows.any())


def outlier_channels(
    x: F32, spec: OutlierSpec, rng: np.random.Generator, skip_rows: BoolArr
) -> tuple[I64, float]:
    """(outlier channels, typical row maximum) from a sample of rows.

    A channel is an outlier when its sampled |max| exceeds ``channel_factor`` × the median
    channel maximum; the typical row maximum (median over sampled rows, outlier channels left
    out) is the yardstick for massive single elements. ``skip_rows`` (first tokens, sent densely
    anyway) are left out: a channel that is massive only there costs nothing extra.
    """
    c = x.shape[1]
    candidates = np.flatnonzero(~skip_rows)
    if candidates.size == 0:
        return np.zeros(0, dtype=np.int64), 0.0
    rows = np.sort(rng.choice(candidates, size=min(candidates.size, 256), replace=False))
    sample = np.abs(x[rows])
    cols = np.zeros(0, dtype=np.int64)
    if spec.max_channels and c >= 4:
        colmax = sample.max(axis=0)
        reference = float(np.median(colmax))
        cols = np.flatnonzero(colmax > spec.channel_factor * reference)
        if cols.size > spec.max_channels:
            cols = cols[np.argsort(colmax[cols])[::-1][: spec.max_channels]]
        cols = np.sort(cols).astype(np.int64)
    sample[:, cols] = 0
    return cols, float(np.median(sample.max(axis=1)))


def first_token_rows(n: int, seq_len: int, first_tokens: int) -> BoolArr:
    """The first ``first_tokens`` rows of every sequence (attention sinks)."""
    if not first_tokens or not seq_len:
        return np.zeros(n, dtype=np.bool_)
    return (np.arange(n) % seq_len) < first_tokens


@dataclass(kw_only=True, slots=True)
class MassiveFilter:
    """Pulls single elements with |x| > ``above`` out of the stream (they go densely in 16 bit).

    At most ``cap`` of them, the first ones in row-major order, so the result is deterministic.
    """

    above: float
    cap: int
    positions: list[I64]
    values: list[F32]
    count: int = 0

    def apply(self, block: F32, a: F32, rm: F32, start: int) -> None:
        """Zero massive entries of ``a`` (|block|) in place and fix the row maxima ``rm``."""
        hot = np.flatnonzero(rm > self.above)
        if hot.size == 0 or self.count >= self.cap:
            return
        sub = a[hot]
        big = sub > self.above
        r, c = np.nonzero(big)
        take = min(r.size, self.cap - self.count)
        r, c = r[:take], c[:take]
        rows = hot[r]
        k = a.shape[1]
        self.positions.append((start + rows) * k + c)
        self.values.append(block[rows, c].astype(np.float32))
        self.count += take
        a[rows, c] = 0
        rm[hot] = a[hot].max(axis=1)

    def result(self) -> tuple[I64, F32]:
        if not self.positions:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        return np.concatenate(self.positions).astype(np.int64), np.concatenate(self.values)


def scan_rows(w: F32, excl: Exclusions, massive: MassiveFilter | None) -> F32:
    """Row maxima of |w| with exclusions zeroed and massive elements pulled out (NaN propagates)."""
    n, k = w.shape
    out = np.empty(n, dtype=np.float32)
    step = block_rows(k)
    buf = np.empty((min(step, n), k), dtype=np.float32)
    for start in range(0, n, step):
        block = w[start : start + step]
        a = _clean_abs(block, buf, excl, start)
        rm = a.max(axis=1)
        if massive is not None:
            massive.apply(block, a, rm, start)
        out[start : start + block.shape[0]] = rm
    return out


def _clean_abs(block: F32, buf: F32, excl: Exclusions, start: int) -> F32:
    a = np.abs(block, out=buf[: block.shape[0]])
    if excl.cols.size:
        a[:, excl.cols] = 0
    dead = excl.rows[start : start + block.shape[0]]
    if dead.any():
        a[dead] = 0
    return a


def tensor_threshold(
    w: F32, keep: float, *, exact: bool, sample_size: int, excl: Exclusions, rng: np.random.Generator
) -> np.float32:
    """|value| above which a fraction ``keep`` of the non-excluded elements lies."""
    n, k = w.shape
    live_cols = np.ones(k, dtype=np.bool_)
    live_cols[excl.cols] = False
    if exact:
        pool = np.abs(w[~excl.rows][:, live_cols].reshape(-1))
    else:
        flat = rng.integers(0, n * k, size=min(sample_size, n * k))
        flat = flat[~excl.rows[flat // k] & live_cols[flat % k]]
        pool = np.abs(w.reshape(-1)[flat])
    if pool.size == 0:
        return np.float32(np.inf)
    rank = min(pool.size - 1, max(0, round((1.0 - keep) * pool.size)))
    return max(np.float32(np.partition(pool, rank)[rank]), _TINY)


def row_normalized_threshold(
    w: F32,
    keep: float,
    *,
    exact: bool,
    sample_size: int,
    excl: Exclusions,
    rng: np.random.Generator,
    massive_above: float,
) -> np.float32:
    """Threshold on |value| / ‖row‖ above which a fraction ``keep`` of the live elements lies.

    Scores need whole rows, so the sample is of rows (about ``sample_size`` elements' worth);
    values above ``massive_above`` (sent densely) are left out of the norms as the selection will.
    """
    k = w.shape[1]
    live_cols = np.ones(k, dtype=np.bool_)
    live_cols[excl.cols] = False
    live_rows = np.flatnonzero(~excl.rows)
    if live_rows.size == 0 or not live_cols.any():
        return np.float32(np.inf)
    if not exact:
        # Whole rows differ more than elements: at least 256 rows keep κ within ~2 % of target.
        want = min(live_rows.size, max(256, -(-sample_size // k)))
        live_rows = np.sort(rng.choice(live_rows, size=want, replace=False))
    a = np.abs(w[live_rows][:, live_cols])
    a[a > massive_above] = 0
    norms = np.sqrt(np.einsum("ij,ij->i", a, a, dtype=np.float64)).astype(np.float32)
    pool = np.divide(a, norms[:, None], out=np.zeros_like(a), where=norms[:, None] > 0).reshape(-1)
    rank = min(pool.size - 1, max(0, round((1.0 - keep) * pool.size)))
    return max(np.float32(np.partition(pool, rank)[rank]), _TINY)


@dataclass(kw_only=True, slots=True)
class SparseSelection:
    values: F32  # kept values, row-major order
    counts: I64  # kept values per row (N,)
    positions: U8  # packed bitmap (row- or channel-major); empty for the delta layout
    gaps: I64 | None  # zeros skipped before each kept value (delta layout)
    lo: F32  # per-row threshold (every kept |value| >= lo[row])
    rowmax: F32  # max |value| per row after exclusions (NaN if the row had one)
    col_ids: I64 | None  # column of every kept value (only if asked)
    colmax: F32 | None  # per-column max |kept value| (only if asked)


def select_elements(
    w: F32,
    *,
    threshold: np.float32 | None,
    row_keep: int | None,
    excl: Exclusions,
    layout: str,
    want_cols: bool,
    massive: MassiveFilter | None,
    row_scaled: bool = False,
) -> SparseSelection:
    """Keep |w| >= threshold (tensor scope) or the ``row_keep`` largest per row (token scope).

    ``row_scaled``: the threshold is relative, each row keeps |w| >= threshold × ‖row‖.
    """
    n, k = w.shape
    step = block_rows(k)
    buf = np.empty((min(step, n), k), dtype=np.float32)
    values: list[F32] = []
    packs: list[npt.NDArray[np.generic]] = []
    cols: list[I64] = []
    counts = np.empty(n, dtype=np.int64)
    rowmax = np.empty(n, dtype=np.float32)
    lo = np.empty(n, dtype=np.float32)
    colmax = np.zeros(k, dtype=np.float32) if want_cols else None
    for start in range(0, n, step):
        block = w[start : start + step]
        rows = block.shape[0]
        a = _clean_abs(block, buf, excl, start)
        rm = a.max(axis=1)
        if massive is not None:
            massive.apply(block, a, rm, start)
        rowmax[start : start + rows] = rm
        cut, row_lo = _block_cut(a, threshold, row_keep, row_scaled)
        lo[start : start + rows] = row_lo
        m = a >= cut
        counts[start : start + rows] = m.view(np.uint8).sum(axis=1, dtype=np.int64)
        values.append(np.compress(m.reshape(-1), block.reshape(-1)))
        packs.append(_pack_block(m, layout, start * k))
        if want_cols:
            assert colmax is not None
            cols.append(np.nonzero(m)[1])
            np.maximum(colmax, np.where(m, a, 0).max(axis=0), out=colmax)
    positions, gaps = _join_positions(packs, layout)
    return SparseSelection(
        values=np.concatenate(values) if values else np.zeros(0, np.float32),
        counts=counts,
        positions=positions,
        gaps=gaps,
        rowmax=rowmax,
        lo=lo,
        col_ids=np.concatenate(cols).astype(np.int64) if want_cols and cols else None,
        colmax=colmax,
    )


def _block_cut(
    a: F32, threshold: np.float32 | None, row_keep: int | None, row_scaled: bool
) -> tuple[F32 | np.float32, F32 | np.float32]:
    """(cut, lo) for a block of |W| (rows, K): keep ``a >= cut``; ``lo`` is each row's floor."""
    # cut: a scalar or a (rows, 1) column; lo: a scalar or (rows,), 0 where a row keeps nothing.
    if row_keep is None and row_scaled:
        assert threshold is not None
        norms = np.sqrt(np.einsum("ij,ij->i", a, a, dtype=np.float64)).astype(np.float32)
        with np.errstate(invalid="ignore"):  # 0 × inf: an all-zero row, or nothing to keep
            row_cut = np.where(norms > 0, np.maximum(norms * threshold, _TINY), np.inf)
        return row_cut[:, None], np.where(np.isfinite(row_cut), row_cut, 0)
    if row_keep is None:
        assert threshold is not None
        return threshold, threshold
    k = a.shape[1]
    kth = np.partition(a, k - row_keep, axis=1)[:, k - row_keep]
    cut = np.maximum(kth, _TINY)[:, None]
    return cut, cut[:, 0]


def _pack_block(m: BoolArr, layout: str, offset: int) -> npt.NDArray[np.generic]:
    """The block's kept mask m (rows, K) as ``layout`` stores it: bits by row, bits by channel, or indices."""
    if layout == "bitmap":
        return np.packbits(m)
    if layout == "channel_bitmap":
        return np.packbits(np.ascontiguousarray(m.T), axis=1)
    return np.flatnonzero(m) + offset


def _join_positions(packs: list[npt.NDArray[np.generic]], layout: str) -> tuple[U8, I64 | None]:
    """(bitmap bytes, delta gaps) of the whole selection, joined from its blocks' packs."""
    if layout == "bitmap" and packs:
        return np.concatenate(packs), None
    if layout == "channel_bitmap" and packs:
        return np.concatenate(packs, axis=1).reshape(-1), None
    if layout == "delta":
        flat = np.concatenate(packs) if packs else np.zeros(0, np.int64)
        return np.zeros(0, np.uint8), np.diff(flat, prepend=-1).astype(np.int64) - 1
    return np.zeros(0, np.uint8), None


def structured_scores(w: F32, excl: Exclusions, axis: int) -> npt.NDArray[np.float64]:
    """Energy per row (axis=1) or per column (axis=0), excluded rows/columns scoring -1."""
    n, k = w.shape
    scores = np.zeros(n if axis == 1 else k, dtype=np.float64)
    step = block_rows(k)
    for start in range(0, n, step):
        block = w[start : start + step].astype(np.float64)
        if excl.cols.size:
            block[:, excl.cols] = 0
        block[excl.rows[start : start + block.shape[0]]] = 0
        sq = np.einsum("ij,ij->i" if axis == 1 else "ij,ij->j", block, block)
        if axis == 1:
            scores[start : start + block.shape[0]] = sq
        else:
            scores += sq
    if axis == 1:
        scores[excl.rows] = -1.0
    else:
        scores[excl.cols] = -1.0
    return scores


def top_indices(scores: npt.NDArray[np.float64], keep: float) -> I64:
    """Sorted indices of the round(keep × live) highest scores (at least one if any is live)."""
    live = int(np.count_nonzero(scores >= 0))
    count = min(live, max(1, round(keep * live))) if live else 0
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    chosen = np.argpartition(scores, scores.size - count)[scores.size - count :]
    return np.sort(chosen).astype(np.int64)
