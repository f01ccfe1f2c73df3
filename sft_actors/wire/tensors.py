"""Tensor descriptors and the tensors that travel as separate frames.

A :class:`WireTensor` is a :class:`TensorDesc` plus a flat byte buffer. The descriptor goes into
the msgpack header; the bytes travel as their own ZeroMQ frame (sent with ``copy=False``), so
tensor data is never copied into or parsed by msgpack.

``desc.codec is None`` means the bytes are the raw row-major (C-order) elements of ``dtype``,
little-endian as on every platform we run on, so ``prod(shape) * itemsize == nbytes``. A dict
means the bytes are the output of a codec chain; the dict is that chain's metadata and only the
codec layer interprets it (``dtype``/``shape`` then describe the *decoded* tensor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import torch

from sft_actors.dtypes import DTYPE_NAMES, TORCH_DTYPES
from sft_actors.errors import CodecError, MalformedFrame
from sft_actors.placement import to_host

if TYPE_CHECKING:
    from typing_extensions import Buffer

# Name on the wire -> torch dtype (one table for the package: sft_actors.dtypes).
ITEMSIZES: Final[dict[str, int]] = {name: dt.itemsize for name, dt in TORCH_DTYPES.items()}
_NAMES_BY_TORCH: Final[dict[torch.dtype, str]] = DTYPE_NAMES
# Sizes must fit torch's int64 arithmetic; anything larger is a hostile or corrupt header.
MAX_DIM: Final[int] = 2**63 - 1


def as_byte_view(data: Buffer, what: str = "tensor data") -> memoryview:
    """A 1-D unsigned-byte view of ``data`` without copying; MalformedFrame unless contiguous."""
    try:
        view = memoryview(data)
        if not view.c_contiguous:
            raise ValueError("buffer is not C-contiguous")
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
    except (TypeError, ValueError) as exc:
        raise MalformedFrame(f"{what} must be a contiguous byte buffer: {exc}") from exc
    return view


@dataclass(kw_only=True, frozen=True, slots=True)
class TensorDesc:
    """What a receiver needs to interpret one tensor frame.

    Construction validates the descriptor (known dtype, non-negative dims, and for raw tensors
    ``prod(shape) * itemsize == nbytes``) and raises :class:`MalformedFrame` otherwise, so a
    descriptor decoded from a peer is consistent by the time anyone reads it.
    """

    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    codec: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.dtype not in ITEMSIZES:
            raise MalformedFrame(f"unknown tensor dtype {self.dtype!r}; known: {', '.join(ITEMSIZES)}")
        for dim in self.shape:
            if type(dim) is not int or not 0 <= dim <= MAX_DIM:
                raise MalformedFrame(f"tensor shape {self.shape!r} has an invalid dim {dim!r}")
        # torch computes strides and storage sizes in int64 with zero dims counted as 1, so an
        # empty tensor with absurd dims would still fail there; refuse it here instead.
        if math.prod(max(dim, 1) for dim in self.shape) * self.itemsize > MAX_DIM:
            raise MalformedFrame(f"tensor shape {list(self.shape)} is too large for int64 sizes")
        if type(self.nbytes) is not int or self.nbytes < 0:
            raise MalformedFrame(f"tensor nbytes must be a non-negative int, got {self.nbytes!r}")
        if self.codec is None and self.numel * self.itemsize != self.nbytes:
            raise MalformedFrame(
                f"raw {self.dtype} tensor of shape {list(self.shape)} needs "
                f"{self.numel * self.itemsize} bytes, descriptor says {self.nbytes}"
            )

    @property
    def itemsize(self) -> int:
        return ITEMSIZES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_raw(self) -> bool:
        return self.codec is None


@dataclass(kw_only=True, frozen=True, slots=True)
class WireTensor:
    """A tensor on the wire: descriptor plus a flat byte buffer (``memoryview`` or ``bytes``).

    ``data`` is normalised to a 1-D byte ``memoryview``; it may alias the memory of the tensor
    it came from (:meth:`from_torch`) or of the received frame (decoding), so do not mutate the
    source while the message is in flight.
    """

    desc: TensorDesc
    data: memoryview

    def __init__(self, *, desc: TensorDesc, data: Buffer) -> None:
        view = as_byte_view(data)
        if view.nbytes != desc.nbytes:
            raise MalformedFrame(f"tensor descriptor says {desc.nbytes} bytes, buffer has {view.nbytes}")
        object.__setattr__(self, "desc", desc)
        object.__setattr__(self, "data", view)

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_torch(cls, tensor: torch.Tensor) -> WireTensor:
        """Raw bytes of ``tensor`` (any supported dtype, bf16 included).

        Zero-copy for a contiguous CPU tensor: the buffer aliases the tensor's storage. A
        non-contiguous tensor is made contiguous (one copy), a CUDA tensor copied into a pinned
        host buffer (:func:`~sft_actors.placement.to_host`).
        """
        name = _NAMES_BY_TORCH.get(tensor.dtype)
        if name is None:
            raise CodecError(
                f"dtype {tensor.dtype} cannot travel on the wire; convert it to one of {', '.join(ITEMSIZES)}"
            )
        flat = to_host(tensor.detach()).contiguous().reshape(-1)
        # numpy has no bfloat16 and torch cannot view a 0-d tensor as bytes, so view the flat
        # tensor as uint8 first; numpy() then shares its memory and keeps the tensor alive.
        raw = flat.view(torch.uint8).numpy()
        desc = TensorDesc(dtype=name, shape=tuple(tensor.shape), nbytes=raw.nbytes)
        return cls(desc=desc, data=raw.data)

    @classmethod
    def coded(
        cls, meta: dict[str, Any], payload: Buffer, *, dtype: str, shape: tuple[int, ...]
    ) -> WireTensor:
        """A codec chain's output: ``meta`` describes the chain, ``payload`` is its bytes."""
        view = as_byte_view(payload)
        return cls(
            desc=TensorDesc(dtype=dtype, shape=tuple(shape), nbytes=view.nbytes, codec=meta), data=view
        )

    # --- access ---------------------------------------------------------------------------
    @property
    def is_raw(self) -> bool:
        return self.desc.codec is None

    def to_torch(self) -> torch.Tensor:
        """The tensor these raw bytes describe.

        Zero-copy when the buffer is writable (e.g. a received ``zmq.Frame`` or a tensor's own
        memory): the result aliases it. A read-only buffer (``bytes``) is copied once, so the
        result always owns or shares *writable* memory and never triggers torch's
        non-writable-buffer warning. Raises :class:`CodecError` for codec output (decode it with
        the codec layer) and for ``bool`` bytes other than 0/1.
        """
        desc = self.desc
        if desc.codec is not None:
            raise CodecError(
                f"tensor is codec output ({desc.codec.get('chain', desc.codec)!r}); decode it with "
                "sft_actors.codec before converting to torch"
            )
        dtype = TORCH_DTYPES[desc.dtype]
        if desc.nbytes == 0:
            return torch.empty(desc.shape, dtype=dtype)
        if self.data.readonly:
            flat = torch.empty(desc.nbytes, dtype=torch.uint8)
            flat.numpy()[:] = np.frombuffer(self.data, dtype=np.uint8)
        else:
            flat = torch.frombuffer(self.data, dtype=torch.uint8)
        if dtype is torch.bool and bool((flat > 1).any()):
            raise CodecError("bool tensor holds bytes other than 0 and 1")
        return flat.view(dtype).reshape(desc.shape)
