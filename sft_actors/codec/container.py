"""The payload: named sections, each stored raw, zstd-compressed or ANS-coded.

``meta["sections"]`` lists ``[name, stored_nbytes, encoding]`` in payload order. A decoder
derives the *raw* size of every section from the (validated) tensor shape and counts, never from
the peer, and checks it against what decompression yields — so a hostile or corrupt message can
make decoding fail with :class:`CodecError` but cannot make it allocate more than the tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import zstandard

from sft_actors.codec.entropy import ans_decode, ans_encode
from sft_actors.errors import CodecError

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]
ENCODINGS = ("raw", "zstd", "ans")
# Below this size zstd's frame header costs more than it can save.
_MIN_ZSTD_BYTES = 64


class SectionWriter:
    """Collects sections; ``stage_bytes`` accumulates stored bytes per chain stage for the report."""

    def __init__(self, zstd_level: int) -> None:
        self._level = zstd_level
        self._compressor = zstandard.ZstdCompressor(level=zstd_level) if zstd_level > 0 else None
        self._parts: list[bytes] = []
        self.sections: list[list[Any]] = []
        self.raw_bytes: dict[str, int] = {}
        self.stored_bytes: dict[str, int] = {}

    def add(
        self, name: str, data: bytes | U8, *, compress: bool = True, ans_symbols: I64 | None = None
    ) -> None:
        raw = data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes()
        stored, encoding = raw, "raw"
        if ans_symbols is not None:
            coded = ans_encode(ans_symbols)
            if coded is not None and len(coded) < len(raw):
                stored, encoding = coded, "ans"
        if encoding == "raw" and compress and self._compressor is not None and len(raw) >= _MIN_ZSTD_BYTES:
            packed = self._compressor.compress(raw)
            if len(packed) < len(raw):
                stored, encoding = packed, "zstd"
        self._parts.append(stored)
        self.sections.append([name, len(stored), encoding])
        self.raw_bytes[name] = len(raw)
        self.stored_bytes[name] = len(stored)

    def stored_nbytes(self, data: U8) -> int:
        """The bytes :meth:`add` would store for ``data`` (zstd when it helps), without adding it."""
        if self._compressor is None or data.nbytes < _MIN_ZSTD_BYTES:
            return int(data.nbytes)
        return min(int(data.nbytes), len(self._compressor.compress(np.ascontiguousarray(data).tobytes())))

    def payload(self) -> bytes:
        return b"".join(self._parts)


class SectionReader:
    """Validates the section table against the payload, then hands out decoded sections."""

    def __init__(self, table: Any, payload: bytes | memoryview) -> None:
        if not isinstance(table, list):
            raise CodecError("meta.sections must be a list")
        view = memoryview(payload).cast("B")
        self._sections: dict[str, tuple[memoryview, str]] = {}
        offset = 0
        for entry in table:
            if (
                not isinstance(entry, list | tuple)
                or len(entry) != 3
                or not isinstance(entry[0], str)
                or isinstance(entry[1], bool)
                or not isinstance(entry[1], int)
                or entry[1] < 0
                or entry[2] not in ENCODINGS
            ):
                raise CodecError(f"malformed section entry {entry!r}: expected [name, nbytes, encoding]")
            name, nbytes, encoding = entry
            if name in self._sections:
                raise CodecError(f"section {name!r} appears twice")
            if offset + nbytes > len(view):
                raise CodecError(f"section {name!r} runs past the end of the {len(view)}-byte payload")
            self._sections[name] = (view[offset : offset + nbytes], encoding)
            offset += nbytes
        if offset != len(view):
            raise CodecError(f"payload has {len(view)} bytes but its sections account for {offset}")
        self._used: set[str] = set()

    def encoding_of(self, name: str) -> str:
        if name not in self._sections:
            raise CodecError(f"payload lacks section {name!r}")
        return self._sections[name][1]

    def take(self, name: str, raw_nbytes: int) -> U8:
        """The decoded bytes of section ``name``, which must be exactly ``raw_nbytes`` long."""
        out = self.take_bounded(name, raw_nbytes)
        if out.size != raw_nbytes:
            raise CodecError(f"section {name!r} holds {out.size} bytes, expected {raw_nbytes}")
        return out

    def take_bounded(self, name: str, max_nbytes: int) -> U8:
        """The decoded bytes of section ``name``, at most ``max_nbytes`` of them."""
        encoding = self.encoding_of(name)
        data = self._sections[name][0]
        self._used.add(name)
        if encoding == "ans":
            raise CodecError(f"section {name!r} is ANS-coded where bytes were expected")
        if encoding == "raw":
            if len(data) > max_nbytes:
                raise CodecError(f"section {name!r} has {len(data)} bytes, at most {max_nbytes} expected")
            return np.frombuffer(data, dtype=np.uint8)
        try:
            size = zstandard.frame_content_size(data)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd section {name!r} has no valid frame header: {exc}") from exc
        if not 0 <= size <= max_nbytes:
            raise CodecError(f"zstd section {name!r} declares {size} bytes, at most {max_nbytes} expected")
        try:
            out = zstandard.ZstdDecompressor().decompress(data, max_output_size=max(size, 1))
        except zstandard.ZstdError as exc:
            raise CodecError(f"corrupt zstd section {name!r}: {exc}") from exc
        if len(out) != size:
            raise CodecError(f"zstd section {name!r} decompressed to {len(out)} bytes, declared {size}")
        return np.frombuffer(out, dtype=np.uint8)

    def take_ans(self, name: str, count: int) -> I64:
        if self.encoding_of(name) != "ans":
            raise CodecError(f"section {name!r} is not ANS-coded")
        self._used.add(name)
        return ans_decode(bytes(self._sections[name][0]), count)

    def take_symbols(self, name: str, count: int, raw_dtype: type[np.generic]) -> I64:
        """Integer symbols stored either ANS-coded or as ``raw_dtype`` bytes (raw or zstd)."""
        if self.encoding_of(name) == "ans":
            return self.take_ans(name, count)
        itemsize = np.dtype(raw_dtype).itemsize
        return self.take(name, count * itemsize).view(raw_dtype).astype(np.int64)

    def finish(self) -> None:
        unused = set(self._sections) - self._used
        if unused:
            raise CodecError(f"payload has sections the chain does not use: {sorted(unused)}")
