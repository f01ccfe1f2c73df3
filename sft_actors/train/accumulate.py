"""Gradient accumulation for ``per_round`` server updates that does not depend on arrival order.

Devices' micro-batches reach the server in whatever order the network delivers them. Summing
their gradients as they arrive makes the round's update depend on that order through float
rounding, and AdamW's first steps turn such rounding into update-sized differences (a
coordinate whose summed gradient is ~0 moves by ±lr). So each micro-batch's gradient is kept
apart, keyed by (device, step), and the round sums them in key order: the same micro-batches
give the same update, bit for bit, whatever the order — and whether the blocks run in one
server actor or in several stages.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from sft_actors.errors import ProtocolViolation

#: Steps per device fit in 32 bits; the device index goes above them.
_STEP_BITS = 32


def order_key(device_index: int, step: int) -> int:
    """A sortable key of one micro-batch: device index first, then its step in the run."""
    if not 0 <= step < 1 << _STEP_BITS:
        raise ProtocolViolation(f"micro-batch step {step} outside [0, 2^{_STEP_BITS})")
    return (device_index << _STEP_BITS) | step


def device_of(key: int) -> int:
    """The device index of an :func:`order_key`."""
    return key >> _STEP_BITS


class OrderedGradients:
    """Per-micro-batch gradients of a set of parameters, summed in key order on demand."""

    def __init__(self) -> None:
        self._grads: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._grads)

    def add(self, key: int, grads: Mapping[str, torch.Tensor | None]) -> None:
        """Keep one micro-batch's gradients (parameters it did not reach are left out)."""
        if key in self._grads:
            raise ProtocolViolation(f"micro-batch {key} was already accumulated this round")
        self._grads[key] = {name: g.detach().clone() for name, g in grads.items() if g is not None}

    def discard(self, keep: Callable[[int], bool]) -> int:
        """Forget the micro-batches whose order key ``keep`` rejects (e.g. ``lambda k:
        device_of(k) != lost``: a device lost mid-round); returns how many were dropped."""
        dropped = [key for key in self._grads if not keep(key)]
        for key in dropped:
            del self._grads[key]
        return len(dropped)

    def apply_mean(self, params: Mapping[str, torch.nn.Parameter], divisor: int) -> int:
        """Set each parameter's ``.grad`` to the key-ordered sum over micro-batches / ``divisor``
        (at least the number kept); forget them; return how many there were."""
        n = len(self._grads)
        divisor = max(divisor, n)
        for name, p in params.items():
            total: torch.Tensor | None = None
            for key in sorted(self._grads):
                g = self._grads[key].get(name)
                if g is not None:
                    total = g.clone() if total is None else total.add_(g)
            p.grad = None if total is None else total.div_(divisor)
        self._grads.clear()
        return n
