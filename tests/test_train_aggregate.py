"""Per-block LoRA averaging with heterogeneous cuts."""

from __future__ import annotations

import pytest
import torch

from sft_actors.errors import ConfigError
from sft_actors.train.aggregate import Contribution, average_per_block, block_of, select_for_device


def _lora(blocks: range, value: float) -> dict[str, torch.Tensor]:
    return {f"blocks.{i}.attn.q.lora_A": torch.full((2, 3), value) for i in blocks}


def test_block_of_parses_global_index() -> None:
    assert block_of("blocks.12.attn.q.lora_A") == 12
    assert block_of("embed.lora_A") is None


def test_each_block_is_averaged_over_the_devices_that_hold_it() -> None:
    # dev0 holds blocks 0-1 (cut 2), dev1 holds 0-3 (cut 4); dev1 trained 3x the samples.
    avg = average_per_block(
        [
            Contribution(device="dev0", n_samples=10, tensors=_lora(range(2), 1.0)),
            Contribution(device="dev1", n_samples=30, tensors=_lora(range(4), 5.0)),
        ]
    )
    assert sorted(avg) == sorted(_lora(range(4), 0.0))
    # blocks 0,1: (10*1 + 30*5) / 40 = 4.0; blocks 2,3: only dev1 holds them -> 5.0
    assert torch.allclose(avg["blocks.0.attn.q.lora_A"], torch.full((2, 3), 4.0))
    assert torch.allclose(avg["blocks.1.attn.q.lora_A"], torch.full((2, 3), 4.0))
    assert torch.allclose(avg["blocks.3.attn.q.lora_A"], torch.full((2, 3), 5.0))
    mine = select_for_device(avg, set(_lora(range(2), 0.0)))
    assert sorted(mine) == ["blocks.0.attn.q.lora_A", "blocks.1.attn.q.lora_A"]


def test_zero_sample_devices_do_not_count_and_dtype_is_kept() -> None:
    a = {"blocks.0.x": torch.ones(2, dtype=torch.bfloat16)}
    b = {"blocks.0.x": torch.full((2,), 9.0, dtype=torch.bfloat16)}
    avg = average_per_block(
        [Contribution(device="a", n_samples=4, tensors=a), Contribution(device="b", n_samples=0, tensors=b)]
    )
    assert avg["blocks.0.x"].dtype == torch.bfloat16
    assert torch.equal(avg["blocks.0.x"], a["blocks.0.x"])


def test_mismatched_shapes_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="same LoRA config"):
        average_per_block(
            [
                Contribution(device="a", n_samples=1, tensors={"blocks.0.x": torch.ones(2)}),
                Contribution(device="b", n_samples=1, tensors={"blocks.0.x": torch.ones(3)}),
            ]
        )
