"""Tensors across the cut: raw wire tensors when the chain is off, codec frames when it is on.

The glue between the codec (tensor → meta + payload) and the wire (a tensor frame with its
descriptor); training code hands tensors to the actors, which pack and unpack them here.
"""

from __future__ import annotations

import torch

from sft_actors.codec import BasisRegistry, Codec, CodecReport
from sft_actors.wire.tensors import WireTensor


def pack_tensor(t: torch.Tensor, codec: Codec | None, *, seed: int) -> tuple[WireTensor, CodecReport | None]:
    """``t`` as a wire tensor: raw bytes (``codec`` None — bit-exact) or encoded by ``codec``."""
    if codec is None:
        return WireTensor.from_torch(t.detach().contiguous()), None
    enc = codec.encode(t.detach(), seed)
    wt = WireTensor.coded(enc.meta, enc.payload, dtype=enc.meta["dtype"], shape=tuple(t.shape))
    return wt, enc.report


def unpack_tensor(wt: WireTensor, bases: BasisRegistry | None = None) -> torch.Tensor:
    """The tensor a peer sent, decoded if it is coded (raises CodecError on a bad frame).

    ``bases``: the sender's projection bases, for chains with a ``project`` stage."""
    if wt.is_raw:
        return wt.to_torch()
    assert wt.desc.codec is not None
    return Codec.decode(dict(wt.desc.codec), wt.data, bases=bases)


def step_seed(run_seed: int, device_index: int, round_: int, step: int, direction: int) -> int:
    """A distinct, replayable quantization seed per (device, round, step, direction)."""
    return ((run_seed * 1_000_003 + device_index) * 1_000_033 + round_ * 10_007 + step) * 2 + direction
