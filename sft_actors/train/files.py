"""Files a run writes, written so that a kill never leaves a half-written one in place.

:func:`atomic_write_bytes` writes a temporary file in the target's directory, fsyncs it and
renames it over the target: a reader sees the old file or the new one, never a mix.
:func:`safetensors_bytes` serializes tensors deterministically (equal tensors and metadata give
equal bytes, in every process), and :func:`json_safe` maps non-finite floats to ``None`` so the
JSON a run writes is strict.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

#: safetensors aligns the data after the header to this many bytes (the header is space-padded).
_HEADER_ALIGN = 8
_FILE_MODE = 0o644


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file ``path`` and fsync it (no rename: for files inside a
    temporary directory that is renamed into place as a whole)."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically: a temporary file in the same directory
    (``.tmp-<name>-…``), fsync, ``os.replace``, fsync of the directory. Returns ``path``.

    Raises ``OSError`` when the directory does not exist or cannot be written; on any error the
    temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _FILE_MODE)  # mkstemp makes 0600; a run's files are 0644
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def safetensors_bytes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """The safetensors encoding of ``tensors`` (made contiguous) with ``metadata`` (str → str).

    Deterministic: tensors are laid out in sorted key order (within safetensors' dtype-alignment
    order) and the metadata keys are sorted — the library itself keeps metadata in a hash map
    whose order changes from process to process. Readable by ``safetensors.torch.load_file``."""
    from safetensors.torch import save

    blob = save({k: tensors[k].contiguous() for k in sorted(tensors)})
    if not metadata:
        return blob
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    header.pop("__metadata__", None)
    meta = {str(k): str(metadata[k]) for k in sorted(metadata)}
    text = json.dumps({"__metadata__": meta, **header}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % _HEADER_ALIGN)
    return len(text).to_bytes(8, "little") + text + blob[8 + n :]


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) replaced by ``None``, recursively
    through dicts, lists and tuples (tuples become lists), so ``json.dumps(allow_nan=False)``
    accepts it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def strict_json_bytes(value: Any, *, indent: int | None = 2, sort_keys: bool = True) -> bytes:
    """Strict JSON (non-finite floats become ``null``) ending in a newline, UTF-8.

    Raises ``TypeError`` for values JSON cannot represent."""
    text = json.dumps(json_safe(value), indent=indent, sort_keys=sort_keys, allow_nan=False)
    return (text + "\n").encode()
