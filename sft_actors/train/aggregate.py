"""Per-block LoRA averaging across devices with heterogeneous cuts.

Device *n* holds blocks ``[0, cut_n)``, so block *i* is averaged only over the devices that
hold it, weighted by the samples each device trained on since the last aggregation. A device
that holds no samples for a round contributes nothing (weight 0); a block held by no device
with a positive weight keeps no entry in the result.

Keys follow the model layer's convention ``blocks.{i}.<module path>`` with *i* the global block
index; any other key (e.g. an embedding adapter) is averaged over every device that has it.

This is FedAvg of every tensor, LoRA factors included; ``lora_average`` measures what that
misses (avg(B)·avg(A) ≠ avg(B·A)) and offers the exact average of products, re-factorized.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from sft_actors.errors import ConfigError

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


def block_of(key: str) -> int | None:
    """The global block index a LoRA key belongs to, or None for non-block keys."""
    m = _BLOCK_KEY.match(key)
    return int(m.group(1)) if m else None


@dataclass(frozen=True, kw_only=True, slots=True)
class Contribution:
    """One device's adapters and the number of samples behind them."""

    device: str
    n_samples: int
    tensors: Mapping[str, torch.Tensor]


def average_per_block(contributions: list[Contribution]) -> dict[str, torch.Tensor]:
    """Sample-weighted average of every key over the devices that hold it.

    Shapes of one key must agree across devices (same LoRA config): a mismatch is a
    configuration error, not something to average around.
    """
    sums: dict[str, torch.Tensor] = {}
    weights: dict[str, int] = defaultdict(int)
    for c in contributions:
        if c.n_samples < 0:
            raise ConfigError(f"device {c.device} reported a negative sample count {c.n_samples}")
        if c.n_samples == 0:
            continue
        for key, t in c.tensors.items():
            t32 = t.detach().to(torch.float64)
            if key in sums:
                if sums[key].shape != t32.shape:
                    raise ConfigError(
                        f"adapter {key!r} from {c.device} has shape {tuple(t32.shape)}, others have "
                        f"{tuple(sums[key].shape)}: every device must use the same LoRA config"
                    )
                sums[key] += t32 * c.n_samples
            else:
                sums[key] = t32 * c.n_samples
            weights[key] += c.n_samples
    dtypes = {k: t.dtype for c in contributions for k, t in c.tensors.items()}
    return {k: (s / weights[k]).to(dtypes[k]) for k, s in sums.items()}


def select_for_device(averaged: Mapping[str, torch.Tensor], keys: set[str]) -> dict[str, torch.Tensor]:
    """The part of an averaged state a device holds (the keys of its own adapters)."""
    return {k: v for k, v in averaged.items() if k in keys}
