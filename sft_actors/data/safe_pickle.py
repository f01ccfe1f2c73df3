"""A pickle reader for dataset files that can only build plain data, never run code.

The project sends nothing as pickle. This module exists for one reason: the CIFAR-100
"python version" release *is* a set of pickle files, and a user's copy of it comes from the
internet. ``pickle.load`` on such a file can import and call any function (``os.system`` is one
``GLOBAL`` + ``REDUCE`` away), so we never hand the file to the stock unpickler.

What a genuine file needs, and what this reader therefore allows:

* dicts, lists, tuples, bytes, str, int, float, bool, None — built by pickle opcodes that call
  no code;
* ``_codecs.encode(text, "latin1")`` — how Python 3 writes ``bytes`` at protocol <= 2 (our test
  fixtures, and any re-pickled copy). Mapped to a latin-1-only encoder, not the real function;
* numpy arrays of plain numeric dtypes — the real release stores ``b"data"`` as a uint8
  ``ndarray``, pickled through ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and
  ``numpy.dtype``. Those names resolve to inert stand-ins that only *record* their arguments;
  after loading, :func:`_materialize` checks the record (numeric dtype, shape matches the byte
  count) and builds the array with ``np.frombuffer``. No numpy callable ever sees file input.

Every other global is refused with :class:`~sft_actors.errors.UnsafePickle` before anything is
called. Files are read with ``encoding="bytes"`` because the release was written by Python 2:
its ``str`` objects (dict keys such as ``b"data"``, the dtype code ``b"u1"``) must stay bytes
instead of being decoded as ASCII text, which would fail on the raw pixel strings.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from sft_actors.errors import DatasetCorrupt, UnsafePickle

# numpy dtype codes a dataset array may use; object ("O") and structured dtypes are refused.
_NUMERIC_DTYPES = frozenset({"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8"})
_MAX_NDIM = 8


class _NdarrayMarker:
    """Stands in for ``numpy.ndarray`` (only ever passed to ``_reconstruct`` as the subtype)."""


class _DtypeRecord:
    """Records ``numpy.dtype(code, align, copy)`` and its pickled state; builds nothing."""

    __slots__ = ("byteorder", "code")

    def __init__(self, code: object, align: object = False, copy: object = True) -> None:
        if isinstance(code, bytes):
            code = code.decode("ascii", errors="replace")
        if not isinstance(code, str) or code not in _NUMERIC_DTYPES:
            raise UnsafePickle(f"dtype {code!r} is not a plain numeric dtype")
        self.code = code
        self.byteorder = "|"

    def __setstate__(self, state: object) -> None:
        # numpy's dtype state: (version, byteorder, subarray, names, fields, elsize, align, flags)
        if not isinstance(state, tuple) or len(state) < 2:
            raise UnsafePickle(f"unexpected dtype state {state!r}")
        order = state[1].decode("ascii") if isinstance(state[1], bytes) else state[1]
        if order not in ("|", "<", ">", "="):
            raise UnsafePickle(f"unexpected dtype byte order {order!r}")
        if any(part is not None for part in state[2:5]):
            raise UnsafePickle("structured or sub-array dtypes are not allowed in dataset files")
        self.byteorder = order

    def to_numpy(self) -> np.dtype[Any]:
        dtype = np.dtype(self.code)
        if self.byteorder == "<":
            return dtype.newbyteorder("<")
        if self.byteorder == ">":
            return dtype.newbyteorder(">")
        return dtype


class _ArrayRecord:
    """Records ``_reconstruct(ndarray, shape, typecode)`` and the array state set by BUILD."""

    __slots__ = ("data", "dtype", "fortran", "shape")

    def __init__(self) -> None:
        self.shape: tuple[int, ...] = ()
        self.dtype: _DtypeRecord | None = None
        self.fortran = False
        self.data = b""

    def __setstate__(self, state: object) -> None:
        # numpy's ndarray state: (version, shape, dtype, is_fortran, raw bytes)
        if not (isinstance(state, tuple) and len(state) == 5):
            raise UnsafePickle(f"unexpected ndarray state of type {type(state).__name__}")
        _version, shape, dtype, fortran, data = state
        if not (isinstance(shape, tuple) and len(shape) <= _MAX_NDIM):
            raise UnsafePickle(f"unexpected ndarray shape {shape!r}")
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise UnsafePickle(f"unexpected ndarray shape {shape!r}")
        if not isinstance(dtype, _DtypeRecord):
            raise UnsafePickle("ndarray state without a numeric dtype")
        if not isinstance(data, bytes):
            raise UnsafePickle("ndarray data must be raw bytes (object arrays are not allowed)")
        self.shape, self.dtype, self.fortran, self.data = shape, dtype, bool(fortran), data

    def to_numpy(self) -> np.ndarray:
        if self.dtype is None:
            raise UnsafePickle("ndarray reconstructed without its state")
        dtype = self.dtype.to_numpy()
        count = int(np.prod(self.shape, dtype=np.int64))
        if count * dtype.itemsize != len(self.data):
            raise DatasetCorrupt(
                f"ndarray of shape {self.shape} and dtype {dtype} needs {count * dtype.itemsize} bytes, "
                f"the file holds {len(self.data)}"
            )
        flat = np.frombuffer(self.data, dtype=dtype, count=count)
        return flat.reshape(self.shape, order="F" if self.fortran else "C")


def _reconstruct(subtype: object, shape: object, typecode: object) -> _ArrayRecord:
    if subtype is not _NdarrayMarker:
        raise UnsafePickle("_reconstruct may only build plain numpy.ndarray objects")
    return _ArrayRecord()


def _latin1_encode(text: object, encoding: object = "latin1") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickle("_codecs.encode is only allowed as Python 3's latin-1 bytes encoding")
    return text.encode("latin-1")


_ALLOWED: dict[tuple[str, str], object] = {
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "ndarray"): _NdarrayMarker,
    ("numpy", "dtype"): _DtypeRecord,
    # numpy < 2 (and the Python 2 release files) / numpy >= 2 spell the module differently.
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose ``find_class`` knows only the inert stand-ins above."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickle(
                f"refusing to load global {module}.{name}: dataset files may hold only plain data"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickle("refusing a persistent id: dataset files may hold only plain data")


def _materialize(obj: object, depth: int = 0) -> Any:
    """Replace array records by numpy arrays; refuse anything that is not plain data."""
    if depth > 64:
        raise DatasetCorrupt("pickle nesting deeper than 64 levels")
    if isinstance(obj, _ArrayRecord):
        return obj.to_numpy()
    if isinstance(obj, dict):
        return {_materialize(k, depth + 1): _materialize(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialize(v, depth + 1) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialize(v, depth + 1) for v in obj)
    if obj is None or isinstance(obj, bytes | str | int | float | bool):
        return obj
    raise UnsafePickle(f"unexpected object of type {type(obj).__name__} in a dataset file")


def load_plain_pickle(data: bytes, *, source: str) -> Any:
    """Decode a pickle that may hold only plain data and numeric numpy arrays.

    ``source`` names the file in error messages. Raises :class:`UnsafePickle` for any global
    outside the allow-list (nothing is executed) and :class:`DatasetCorrupt` for a truncated or
    malformed stream.
    """
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
        return _materialize(obj)
    except UnsafePickle as exc:
        raise UnsafePickle(f"{source}: {exc}") from None
    except DatasetCorrupt as exc:
        raise DatasetCorrupt(f"{source}: {exc}") from None
    except Exception as exc:  # a malformed stream can raise almost anything; all mean "corrupt"
        raise DatasetCorrupt(
            f"{source}: not a valid pickle file ({type(exc).__name__}: {exc}); re-extract it from the archive"
        ) from exc


def load_plain_pickle_file(path: Path) -> Any:
    """:func:`load_plain_pickle` on the bytes of ``path``."""
    return load_plain_pickle(path.read_bytes(), source=str(path))
