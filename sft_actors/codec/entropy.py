"""Optional rANS entropy coder for integer codes (the ``constriction`` package).

zstd codes literals with Huffman, which spends at least one bit per byte; transform codes with
a common quantization step often carry under two bits per symbol, where an arithmetic-class
coder wins up to 2x. ``constriction`` is optional: ``pip install constriction==0.5.0``.

Stream layout: ``[u32 alphabet size][i64 min symbol][u32 counts × alphabet][u32 ANS words…]``.
The model is built from the integer counts on both sides, so encoder and decoder agree exactly.
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
    if alphabet > MAX_ALPHABET:
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
        decoded = lib.stream.stack.AnsCoder(words).decode(_model(lib, counts), count)
    except Exception as exc:  # the Rust extension raises its own error types on corrupt streams
        raise CodecError(f"corrupt ANS stream: {exc}") from exc
    return np.asarray(decoded, dtype=np.int64) + low


def _model(lib: Any, counts: npt.NDArray[np.uint32]) -> Any:
    probabilities = counts.astype(np.float64)
    return lib.stream.model.Categorical(probabilities / probabilities.sum(), perfect=False)
