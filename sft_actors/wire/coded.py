"""Tensors across the cut: raw wire tensors when the chain is off, codec frames when it is on.

The glue between the codec (tensor → meta + payload) and the wire (a tensor frame with its
descriptor); training code hands tensors to the actors, which pack and unpack them here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sft_actors.codec import BasisRegistry, Codec, CodecReport
from sft_actors.errors import MalformedFrame, ProtocolViolation
from sft_actors.placement import to_host
from sft_actors.wire.tensors import WireTensor


def pack_tensor(
    t: torch.Tensor, codec: Codec | None, *, seed: int, measure_error: bool = False
) -> tuple[WireTensor, CodecReport | None]:
    """``t`` as a wire tensor: raw bytes (``codec`` None — bit-exact) or encoded by ``codec``.

    ``measure_error``: decode the frame again and put ‖x̂ − x‖ / ‖x‖ in the report's
    ``rel_error`` (coded tensors only; what a device's basis-drift check measures).

    ``t`` may live on a CUDA device: it is copied into a pinned host buffer first. A bfloat16 or
    float16 tensor travels as such: raw as its 16-bit words, coded from a float32 copy with the
    descriptor's (and the decoded tensor's) dtype the original one."""
    t = to_host(t.detach())
    if codec is None:
        return WireTensor.from_torch(t.detach().contiguous()), None
    enc = codec.encode(t.detach(), seed, measure_error=measure_error)
    wt = WireTensor.coded(enc.meta, enc.payload, dtype=enc.meta["dtype"], shape=tuple(t.shape))
    return wt, enc.report


def unpack_tensor(
    wt: WireTensor, bases: BasisRegistry | None = None, *, max_shape: Sequence[int] | None = None
) -> torch.Tensor:
    """The tensor a peer sent, decoded if it is coded.

    ``bases``: the sender's projection bases, for chains with a ``project`` stage. ``max_shape``:
    the largest shape the plan allows here (same rank, each dim at most that); the declared
    shape is checked against it before anything is decoded (:class:`ProtocolViolation`). A raw
    tensor's bytes already bound its size; a coded one is decoded only against a ``max_shape``,
    only if its codec header declares the same shape as its descriptor, and never to more
    elements than that (:class:`MalformedFrame`; :class:`CodecError` for a bad payload) — so
    a few hundred bytes cannot make the receiver allocate gigabytes.
    """
    shape = wt.desc.shape
    if max_shape is not None and (len(shape) != len(max_shape) or any(map(int.__gt__, shape, max_shape))):
        raise ProtocolViolation(f"tensor of shape {list(shape)}; the plan allows at most {list(max_shape)}")
    if wt.is_raw:
        return wt.to_torch()
    assert wt.desc.codec is not None
    if max_shape is None:
        raise ProtocolViolation("a coded tensor where the plan expects a raw one")
    if wt.desc.codec.get("shape") != list(shape):
        raise MalformedFrame(f"codec header shape {wt.desc.codec.get('shape')!r} differs from {list(shape)}")
    return Codec.decode(dict(wt.desc.codec), wt.data, bases=bases, max_elements=max(1, wt.desc.numel))


def step_seed(run_seed: int, device_index: int, round_: int, step: int, direction: int) -> int:
    """A distinct, replayable quantization seed per (device, round, step, direction)."""
    return ((run_seed * 1_000_003 + device_index) * 1_000_033 + round_ * 10_007 + step) * 2 + direction
