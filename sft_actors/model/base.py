"""The interface every model family implements so that any block range can run on its own.

A :class:`SplitLM` is an embedding/stem, ``num_blocks`` blocks and a head. Nothing in its
forward assumes the parts run together: :meth:`embed` makes the hidden state, :meth:`run_blocks`
runs any ``[start, stop)`` range on it (with optional LoRA adapters per block), :meth:`head`
turns the last hidden state into outputs. Device, server and whole-model parts (``split.py``)
are thin compositions of these three calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from sft_actors.errors import ConfigError
from sft_actors.model.config import Family, LoraConfig, ModelConfig
from sft_actors.model.lora import BlockAdapters
from sft_actors.model.memory import lora_shapes
from sft_actors.model.tokenizer import Tokenizer


class SplitLM(nn.Module, ABC):
    """Base class of the model families; weights are frozen after loading."""

    family: Family
    config: ModelConfig
    blocks: nn.ModuleList
    tokenizer: Tokenizer | None

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @abstractmethod
    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) or images (B, C, H, W) → hidden state (B, T, C)."""

    @abstractmethod
    def block_context(self, hidden: torch.Tensor) -> Any:
        """Per-forward constants the blocks share (e.g. RoPE tables), computed once per range."""

    @abstractmethod
    def head(self, hidden: torch.Tensor, head: nn.Module | None = None) -> torch.Tensor:
        """Final norm and output head; ``head`` replaces the model's own (a trainable copy)."""

    @abstractmethod
    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scalar training loss of ``head`` outputs against ``labels``."""

    def lora_shapes(self, lora: LoraConfig) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection that gets an adapter, for one block."""
        return lora_shapes(self.config, lora)

    def run_blocks(
        self,
        hidden: torch.Tensor,
        start: int,
        stop: int,
        adapters: nn.ModuleDict | None = None,
    ) -> torch.Tensor:
        """Blocks ``[start, stop)`` on ``hidden``; ``adapters`` is keyed by ``str(global block index)``."""
        if not 0 <= start <= stop <= self.num_blocks:
            raise ConfigError(f"block range [{start}, {stop}) is outside [0, {self.num_blocks}]")
        if start == stop:
            return hidden
        ctx = self.block_context(hidden)
        for i in range(start, stop):
            key = str(i)
            block_adapters = adapters[key] if adapters is not None and key in adapters else None
            hidden = self.blocks[i](hidden, ctx, block_adapters)
        return hidden

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The whole model without adapters."""
        return self.head(self.run_blocks(self.embed(inputs), 0, self.num_blocks))

    def freeze(self) -> SplitLM:
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def block_parameter_count(self, index: int = 0) -> int:
        return sum(p.numel() for p in self.blocks[index].parameters())


def project(layer: nn.Linear, name: str, x: torch.Tensor, adapters: BlockAdapters | None) -> torch.Tensor:
    """A frozen projection plus its LoRA update when one is attached under ``name``."""
    y: torch.Tensor = layer(x)
    if adapters is not None and name in adapters:
        y = y + adapters[name](x)
    return y
