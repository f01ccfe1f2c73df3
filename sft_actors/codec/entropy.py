"""rANS entropy coding of integer codes (the ``constriction`` package, a runtime dependency).

zstd codes literals with Huffman, which spends at least one bit per byte; transform codes with
a common quantization step often carry under two bits per symbol, where an arithmetic-class
coder wins up to 2x. (An install without ``constriction`` still runs every chain that does not
ask for ``entropy = "ans"``; ``sft topology check`` says so for one that does.)

One histogram (:func:`ans_encode`): ``[u32 alphabet size][i64 min symbol][u32 counts ×
alphabet][u32 ANS words…]``. Per-column contexts (:func:`ans_encode_columns`): one stream, one
histogram per group of columns, the tables stored by the caller. Models are built from the
integer counts on both sides, so encoder and decoder agree exactly; a stream must end exactly
with its last symbol (leftover words are a corrupt stream).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from sft_actors.errors import CodecError, ConfigError

I64 = npt.NDArray[np.int64]
# Larger alphabets cost more in the count table than they save; the caller falls back to zstd.
MAX_ALPHABET = 1 << 16
_HEADER = 12


def _constriction() -> Any:
    try:
        import constriction
    except ImportError:
        return None
    return constriction


def ans_available() -> bool:
    return _constriction() is not None


def require_ans() -> None:
    if not ans_available():
        raise ConfigError(
            "codec.lossless.entropy = 'ans' needs the optional package constriction: "
            "pip install constriction==0.5.0 (or set entropy = 'none')"
        )


def ans_encode(symbols: I64) -> bytes | None:
    """Encode integers; ``None`` if the alphabet is too large (use zstd instead)."""
    lib = _constriction()
    if lib is None:
        raise CodecError("entropy coder 'ans' requested but constriction is not installed")
    if symbols.size == 0:
        return None
    low, high = int(symbols.min()), int(symbols.max())
    alphabet = high - low + 1
    if alphabet > MAX_ALPHABET or alphabet == 1:  # one symbol: nothing to code, zstd takes it
        return None
    shifted = (symbols - low).astype(np.int32)
    counts = np.bincount(shifted, minlength=alphabet).astype(np.uint32)
    coder = lib.stream.stack.AnsCoder()
    coder.encode_reverse(shifted, _model(lib, counts))
    words = np.asarray(coder.get_compressed(), dtype=np.uint32)
    header = np.array([alphabet], dtype=np.uint32).tobytes() + np.array([low], dtype=np.int64).tobytes()
    return header + counts.tobytes() + words.tobytes()


def ans_decode(data: bytes, count: int) -> I64:
    lib = _constriction()
    if lib is None:
        raise CodecError("payload uses the 'ans' entropy coder: pip install constriction==0.5.0 to decode it")
    if len(data) < _HEADER:
        raise CodecError("ANS stream shorter than its header")
    alphabet = int(np.frombuffer(data, dtype=np.uint32, count=1)[0])
    low = int(np.frombuffer(data, dtype=np.int64, count=1, offset=4)[0])
    words_at = _HEADER + 4 * alphabet
    if not 1 <= alphabet <= MAX_ALPHABET or len(data) < words_at or (len(data) - words_at) % 4:
        raise CodecError(f"ANS stream header is inconsistent (alphabet {alphabet}, {len(data)} bytes)")
    counts = np.frombuffer(data, dtype=np.uint32, count=alphabet, offset=_HEADER)
    if int(counts.sum(dtype=np.uint64)) != count:
        raise CodecError(f"ANS symbol counts sum to {int(counts.sum(dtype=np.uint64))}, expected {count}")
    words = np.frombuffer(data, dtype=np.uint32, offset=words_at).copy()
    try:
        coder = lib.stream.stack.AnsCoder(words)
        decoded = coder.decode(_model(lib, counts), count)
    except Exception as exc:  # the Rust extension raises its own error types on corrupt streams
        raise CodecError(f"corrupt ANS stream: {exc}") from exc
    if not coder.is_empty():  # a valid stream ends exactly with its last symbol
        raise CodecError("corrupt ANS stream: words left over after the last symbol")
    return np.asarray(decoded, dtype=np.int64) + low


def _model(lib: Any, counts: npt.NDArray[np.uint32]) -> Any:
    probabilities = counts.astype(np.float64)
    return lib.stream.model.Categorical(probabilities / probabilities.sum(), perfect=False)


# --- per-column contexts ----------------------------------------------------------------------
#: Half-octave buckets of a column's code RMS; bucket 0 holds all-zero columns (nothing coded).
_BUCKETS_PER_OCTAVE = 2
MAX_GROUPS = 64


def column_groups(codes: npt.NDArray[np.int32]) -> npt.NDArray[np.uint8]:
    """Context of every column of ``codes`` (N, K): 0 for an all-zero column (not coded), else
    1 + the half-octave bucket of its RMS. Columns of one bucket share one histogram: their
    codes have about the same spread, so one model fits each of them almost as well as its own
    (on SmolLM2 cut activations: 1.72 bits/code with a histogram per column, 1.91 with one for all).
    """
    rms = np.sqrt(np.mean(np.square(codes, dtype=np.float64), axis=0))
    groups = np.zeros(codes.shape[1], dtype=np.uint8)
    live = rms > 0
    # rms of a non-zero integer column is >= 1/sqrt(N); shift so the smallest bucket is 1.
    bucket = (
        np.floor(np.log2(np.maximum(rms[live], 1e-12)) * _BUCKETS_PER_OCTAVE) + 2 * _BUCKETS_PER_OCTAVE * 8
    )
    groups[live] = np.clip(bucket, 0, MAX_GROUPS - 2).astype(np.uint8) + 1
    return groups


def ans_encode_columns(codes: npt.NDArray[np.int32], groups: npt.NDArray[np.uint8]) -> tuple[bytes, I64]:
    """Codes (N, K) as one rANS stream with one histogram per column group (see :func:`column_groups`).

    Returns ``(words, table)``: the stream's 32-bit words, and the model table — per live group,
    in increasing group order: ``[min symbol, alphabet size, count × alphabet]`` as integers
    (the caller stores them as zigzag varints). Group-0 columns are not coded. Raises
    :class:`CodecError` if a group's alphabet exceeds :data:`MAX_ALPHABET`.
    """
    lib = _constriction()
    if lib is None:
        raise CodecError("entropy coder 'ans' requested but constriction is not installed")
    table: list[int] = []
    streams: list[tuple[npt.NDArray[np.int32], Any]] = []
    for g in np.unique(groups[groups > 0]):
        symbols = np.ascontiguousarray(codes[:, groups == g]).reshape(-1)
        low, high = int(symbols.min()), int(symbols.max())
        alphabet = high - low + 1
        if alphabet > MAX_ALPHABET:
            raise CodecError(f"code alphabet of {alphabet} symbols in one context: the step is far too small")
        counts = np.bincount(symbols - low, minlength=alphabet)
        table += [low, alphabet, *counts.tolist()]
        if alphabet > 1:  # one symbol costs no bits: the table alone says where it goes
            streams.append(((symbols - low).astype(np.int32), _model(lib, counts.astype(np.uint32))))
    coder = lib.stream.stack.AnsCoder()
    for symbols, model in reversed(streams):  # a stack: the last encoded is decoded first
        coder.encode_reverse(symbols, model)
    words = np.asarray(coder.get_compressed(), dtype=np.uint32)
    return words.tobytes(), np.asarray(table, dtype=np.int64)


def ans_decode_columns(
    words: bytes, table: I64, groups: npt.NDArray[np.uint8], rows: int
) -> npt.NDArray[np.int64]:
    """Inverse of :func:`ans_encode_columns`: codes (rows, K). :class:`CodecError` when the table
    does not match the groups (counts must sum to rows × columns of each group) or the stream
    is corrupt; never decodes more than rows × K symbols."""
    lib = _constriction()
    if lib is None:
        raise CodecError("payload uses the 'ans' entropy coder: pip install constriction to decode it")
    if len(words) % 4:
        raise CodecError("ANS stream length is not a whole number of 32-bit words")
    out = np.zeros((rows, groups.size), dtype=np.int64)
    live = np.unique(groups[groups > 0])
    coder = lib.stream.stack.AnsCoder(np.frombuffer(words, dtype=np.uint32).copy())
    at = 0
    for g in live:
        if at + 2 > table.size:
            raise CodecError("context table ends early")
        low, alphabet = int(table[at]), int(table[at + 1])
        if not 1 <= alphabet <= MAX_ALPHABET or at + 2 + alphabet > table.size:
            raise CodecError(f"context table is inconsistent (alphabet {alphabet})")
        counts = table[at + 2 : at + 2 + alphabet]
        at += 2 + alphabet
        cols = groups == g
        expected = rows * int(np.count_nonzero(cols))
        if int(counts.min()) < 0 or int(counts.sum()) != expected:
            raise CodecError(f"context counts sum to {int(counts.sum())}, expected {expected}")
        if alphabet == 1:
            out[:, cols] = low
            continue
        try:
            decoded = coder.decode(_model(lib, counts.astype(np.uint32)), expected)
        except Exception as exc:  # the Rust extension raises its own error types on corrupt streams
            raise CodecError(f"corrupt ANS stream: {exc}") from exc
        out[:, cols] = (np.asarray(decoded, dtype=np.int64) + low).reshape(rows, -1)
    if at != table.size:
        raise CodecError("context table has entries for groups the frame does not use")
    if not coder.is_empty():  # a valid stream ends exactly with its last symbol
        raise CodecError("corrupt ANS stream: words left over after the last symbol")
    return out
