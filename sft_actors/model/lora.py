"""LoRA adapters that live *beside* frozen base weights instead of wrapping them.

A block's forward takes an optional mapping ``projection name -> LoraAdapter`` and adds
``scale * B(A(dropout(x)))`` to the frozen projection. Keeping adapters outside the base
modules is what lets hundreds of device parts share one copy of the base weights: only A and B
are per part.

Adapters and their optimizer state are always float32, whatever the base weights' dtype
(float32, bfloat16 or float16): as PEFT's ``LoraLayer.forward`` does, the input is cast to the
adapter's dtype and the update cast back to the input's dtype. Low-precision adapters lose the
small updates of AdamW (measured: bfloat16 ``lora_A`` changed in 25 % of its entries after 5
steps at lr 1e-4, float32 in 100 %) and float16 ones overflow.

Adapters are initialised from a seed derived from ``(seed, global block index, projection)``,
so the same seed gives the same adapter for block ``i`` whatever the cut; a split model and the
whole model built with one seed start identical.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from sft_actors.model.config import LoraConfig

#: The dtype of every adapter (and trainable head) and of its optimizer state (as in PEFT).
ADAPTER_DTYPE = torch.float32


class LoraAdapter(nn.Module):
    """The low-rank update ``x -> scale * B(A(dropout(x)))`` of one frozen projection.

    ``lora_A`` (r, in) and ``lora_B`` (out, r) are ``dtype`` (float32 unless a caller insists
    otherwise). :meth:`forward` takes ``x`` (..., in) of any floating dtype, computes in the
    adapter's dtype and returns (..., out) in ``x``'s dtype (PEFT ``LoraLayer.forward``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        scale: float,
        dropout: float,
        generator: torch.Generator,
        dtype: torch.dtype = ADAPTER_DTYPE,
    ) -> None:
        super().__init__()
        self.scale = scale
        # A like nn.Linear's default (kaiming-uniform, a=sqrt(5)), B zero: a fresh adapter is the identity.
        bound = 1.0 / math.sqrt(in_features)
        a = torch.empty(rank, in_features, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype))  # (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_A
        h = self.dropout(x.to(a.dtype))  # (..., in) in the adapter's dtype (PEFT casts the same way)
        update: torch.Tensor = (h @ a.t()) @ self.lora_B.t() * self.scale  # (..., out)
        return update.to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``scale * B @ A`` (out, in) that merging adds to the base weight."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale


# ``{projection name: LoraAdapter}`` of one block.
BlockAdapters = nn.ModuleDict


def adapter_seed(seed: int, block: int, projection: str) -> int:
    """A stable 63-bit seed for one adapter (independent of Python's hash randomisation)."""
    digest = hashlib.blake2b(f"{seed}/{block}/{projection}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def build_block_adapters(
    shapes: Mapping[str, tuple[int, int]],
    config: LoraConfig,
    *,
    block: int,
    seed: int,
    dtype: torch.dtype = ADAPTER_DTYPE,
) -> nn.ModuleDict:
    """Adapters for one block; ``shapes`` maps each projection to its (in, out) features.

    ``dtype`` is the adapters' own (default float32, whatever the base model's dtype)."""
    adapters = nn.ModuleDict()
    for name, (fan_in, fan_out) in shapes.items():
        gen = torch.Generator().manual_seed(adapter_seed(seed, block, name))
        adapters[name] = LoraAdapter(
            fan_in,
            fan_out,
            rank=config.rank,
            scale=config.scale,
            dropout=config.dropout,
            generator=gen,
            dtype=dtype,
        )
    return adapters


def adapter_items(adapters: nn.ModuleDict) -> Iterable[tuple[str, LoraAdapter]]:
    """(``"blocks.{i}.{proj}"``, adapter) pairs of a ``{str(i): {proj: adapter}}`` ModuleDict."""
    for block, per_block in adapters.items():
        assert isinstance(per_block, nn.ModuleDict)
        for proj, adapter in per_block.items():
            assert isinstance(adapter, LoraAdapter)
            yield f"blocks.{block}.{proj}", adapter


def randomize_lora_B(adapters: nn.ModuleDict, *, seed: int, std: float = 0.02) -> None:
    """Give every B a small random value (seeded per adapter), so gradients of A are non-zero.

    Used by verification: with B = 0 the gradient of A is exactly zero and compares nothing.
    """
    with torch.no_grad():
        for key, adapter in adapter_items(adapters):
            gen = torch.Generator().manual_seed(adapter_seed(seed, -1, key))
            noise = torch.randn(adapter.lora_B.shape, generator=gen, dtype=torch.float32) * std
            adapter.lora_B.copy_(noise.to(adapter.lora_B.dtype))
