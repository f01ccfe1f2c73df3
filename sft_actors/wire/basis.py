"""A transform-coding :class:`~sft_actors.codec.Basis` as a :class:`BasisUpload` and back.

The bytes are exactly those of :meth:`Basis.to_wire`: float16 vectors (none for a ``center``
basis) and float32 mean, scales and clip, each as a raw tensor frame. The receiver rebuilds the
basis with :meth:`Basis.from_wire`, which checks every size and the digest.
"""

from __future__ import annotations

import numpy as np
import torch

from sft_actors.codec import Basis
from sft_actors.errors import CodecError
from sft_actors.wire.messages import BasisUpload
from sft_actors.wire.tensors import WireTensor


def _raw(array: np.ndarray, dtype: np.dtype) -> WireTensor:
    return WireTensor.from_torch(torch.from_numpy(np.ascontiguousarray(array, dtype=dtype)))


def basis_upload(device: str, key: str, basis: Basis) -> BasisUpload:
    """The upload of ``basis`` under ``key``; its tensor frames total ``basis.wire_bytes``."""
    return BasisUpload(
        device=device,
        key=key,
        digest=basis.digest,
        kind="center" if basis.vectors is None else "klt",
        vectors=None if basis.vectors is None else _raw(basis.vectors, np.dtype(np.float16)),
        mean=_raw(basis.mean, np.dtype(np.float32)),
        scales=_raw(basis.scales, np.dtype(np.float32)),
        clip=_raw(basis.clip, np.dtype(np.float32)),
    )


def upload_bytes(msg: BasisUpload) -> int:
    """Tensor bytes of an upload (what its frames carry besides the small header)."""
    parts = (msg.vectors, msg.mean, msg.scales, msg.clip)
    return sum(t.desc.nbytes for t in parts if t is not None)


def _part(t: WireTensor | None, name: str, dtype: str, ndim: int) -> bytes:
    if t is None:
        raise CodecError(f"basis upload without {name} (a protocol 3.2 sender?): upgrade the device")
    if not t.is_raw or t.desc.dtype != dtype or len(t.desc.shape) != ndim:
        raise CodecError(
            f"basis {name} must be a raw {ndim}-D {dtype} tensor, got "
            f"{'coded ' if not t.is_raw else ''}{t.desc.dtype} of shape {list(t.desc.shape)}"
        )
    return bytes(t.data)


def basis_from_upload(msg: BasisUpload) -> Basis:
    """The basis ``msg`` carries. Raises :class:`CodecError` if a part is missing, of the wrong
    dtype or rank, inconsistent with ``kind``, or if the basis does not hash to ``msg.digest``."""
    if (msg.kind == "center") != (msg.vectors is None):
        raise CodecError(f"a {msg.kind!r} basis {'has' if msg.vectors is not None else 'lacks'} vectors")
    mean = msg.mean
    if len(mean.desc.shape) != 1:
        raise CodecError(f"basis mean must be (C,), got {list(mean.desc.shape)}")
    channels = mean.desc.shape[0]
    rank = channels if msg.vectors is None else (msg.vectors.desc.shape[-1] if msg.vectors.desc.shape else 0)
    payload = b"" if msg.vectors is None else _part(msg.vectors, "vectors", "float16", 2)
    for t, name in ((msg.mean, "mean"), (msg.scales, "scales"), (msg.clip, "clip")):
        payload += _part(t, name, "float32", 1)
    meta = {"kind": msg.kind, "channels": channels, "rank": rank, "digest": msg.digest}
    return Basis.from_wire(meta, payload)
