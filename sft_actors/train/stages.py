"""Server stages: the server's blocks cut into ranges run by separate stage actors.

A middle stage holds blocks ``[start, end)`` (no head) and enters at any cut in that range;
the last stage is an ordinary server part (blocks to the end, final norm, head). Different
devices' micro-batches then flow through the stages concurrently: while the last stage runs
device A's micro-batch, the first runs device B's (asynchronous server stages).

A middle stage has several micro-batches between its forward and backward, like a pipelined
device, so it trains through :class:`~sft_actors.train.device_trainer.DeviceTrainer` (private
LoRA snapshots per micro-batch; exact gradients for the weights each forward used).
"""

from __future__ import annotations

import torch

from sft_actors.errors import ConfigError
from sft_actors.model import LoraConfig, Part, SplitLM


class StagePart(Part):
    """Blocks ``[start, end)`` of a frozen model with their LoRA adapters; no head."""

    def __init__(self, model: SplitLM, start: int, end: int, lora: LoraConfig, *, seed: int) -> None:
        if not 0 <= start < end <= model.num_blocks:
            raise ConfigError(f"stage blocks [{start}, {end}) are outside [0, {model.num_blocks}]")
        super().__init__(model, range(start, end), lora, seed=seed)
        self.start, self.end = start, end

    def forward(self, hidden: torch.Tensor, cut: int) -> torch.Tensor:
        if not self.start <= cut < self.end:
            raise ConfigError(
                f"activations at cut {cut} cannot enter the stage holding [{self.start}, {self.end})"
            )
        return self.model.run_blocks(hidden, cut, self.end, self.adapters)


def stage_ranges(starts: list[int], num_blocks: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each stage from the sorted start blocks (the last ends at the model's end)."""
    ordered = sorted(starts)
    if len(set(ordered)) != len(ordered):
        raise ConfigError(f"server stages must start at distinct blocks, got {ordered}")
    return [(s, ordered[i + 1] if i + 1 < len(ordered) else num_blocks) for i, s in enumerate(ordered)]
