"""Memory/FLOP model vs the real thing: parameter counts, saved activations, measured peak; bench smoke."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sft_actors.errors import ConfigError
from sft_actors.model import (
    LoraConfig,
    block_param_count,
    embedding_param_count,
    estimate_device_memory,
    head_param_count,
    load_model,
    lora_param_count,
    resolve_spec,
    sample_batch,
    split_model,
)

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]
# A Llama big enough that activations dwarf allocator noise (≈ 8 MiB saved per block).
MEDIUM = ["--spec", "llama-tiny", "--set", "dim=256", "--set", "ffn_dim=768", "--batch", "2", "--seq", "256"]


def _saved_bytes(part: torch.nn.Module, inputs: torch.Tensor, exclude: set[int]) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = part(inputs)
    return sum(n for p, n in seen.items() if p not in exclude) + out.nbytes


@pytest.mark.parametrize("spec", ["llama-tiny", "vit-tiny", "vit-small"])
def test_parameter_counts_match_modules(spec: str) -> None:
    model = load_model(spec)
    lora = LoraConfig(mlp=True)
    cfg = model.config
    assert block_param_count(cfg) == model.block_parameter_count(1)
    total = sum(p.numel() for p in model.parameters())
    assert total == embedding_param_count(cfg) + cfg.num_blocks * block_param_count(cfg) + head_param_count(
        cfg
    )
    device, _ = split_model(model, 2, lora=lora, train_head=False if model.family == "vit" else None)
    assert sum(p.numel() for p in device.trainable_parameters()) == 2 * lora_param_count(cfg, lora)


@pytest.mark.parametrize(
    ("spec", "mlp", "targets"),
    [
        ("llama-tiny", False, ("q", "k", "v", "o")),
        ("llama-tiny", True, ("q", "v")),
        ("vit-tiny", False, ("q", "k", "v", "o")),
        ("vit-tiny", True, ("q", "k", "v", "o")),
    ],
)
@pytest.mark.parametrize("cut", [1, 3])
def test_saved_activations_match_estimate(spec: str, mlp: bool, targets: tuple[str, ...], cut: int) -> None:
    """What autograd keeps for backward equals the estimate's activation bytes within 3 %."""
    model = load_model(spec)
    lora = LoraConfig(mlp=mlp, targets=targets)
    device, _ = split_model(model, cut, lora=lora)
    inputs, _ = sample_batch(model, 4, 64, seed=0)
    params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *device.trainable_parameters()]}
    measured = _saved_bytes(device, inputs, params)
    est = estimate_device_memory(model.config, cut, 4, 64, lora)
    assert measured == pytest.approx(est.activation_bytes, rel=0.03)


def test_estimate_parts_add_up() -> None:
    cfg = load_model("llama-tiny").config
    lora = LoraConfig(rank=8)
    adam = estimate_device_memory(cfg, 2, 4, 32, lora, "adam")
    sgd = estimate_device_memory(cfg, 2, 4, 32, lora, "sgd")
    assert adam.optimizer_bytes == 2 * adam.lora_bytes and sgd.optimizer_bytes == 0
    assert adam.frozen_bytes == 4 * (embedding_param_count(cfg) + 2 * block_param_count(cfg))
    assert adam.total_bytes - sgd.total_bytes == adam.optimizer_bytes
    bf16 = estimate_device_memory(cfg, 2, 4, 32, lora, bytes_per_param=2)
    assert bf16.frozen_bytes * 2 == adam.frozen_bytes
    longer = estimate_device_memory(cfg, 2, 4, 64, lora)
    assert longer.activation_bytes == 2 * adam.activation_bytes
    assert longer.block_forward_flops > 2 * adam.block_forward_flops  # attention is quadratic
    zero = estimate_device_memory(cfg, 0, 4, 32, lora)
    assert zero.activation_bytes == zero.lora_bytes == 0
    with pytest.raises(ConfigError, match="outside"):
        estimate_device_memory(cfg, 9, 4, 32, lora)
    with pytest.raises(ConfigError, match="seq"):
        estimate_device_memory(cfg, 1, 4, None, lora)


def test_flops_per_block_match_a_count_of_matmuls() -> None:
    cfg = resolve_spec("llama-tiny")
    model = load_model(cfg)
    c = model.config
    lora = LoraConfig(rank=8)
    est = estimate_device_memory(c, 1, 2, 32, lora)
    tokens = 64
    linear = 2 * tokens * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 192)
    attention = 2 * 2 * 2 * 4 * (32 * 32 / 2) * 16
    lora_flops = 2 * tokens * 8 * (128 + 96 + 96 + 128)
    assert est.block_forward_flops == linear + attention + lora_flops


def _run_bench(args: list[str]) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "model_split.py"), *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_bench_smoke_and_allocator_peak_matches_estimate() -> None:
    """Runs bench/model_split.py (so it can't rot); the measured peak of one device step must
    match the estimate (saved activations + workspace + LoRA grads) within 3 %.

    The peak asserted is the allocator's (exact: the profiler's allocation events), not the
    resident high-water mark the bench also reports: VmHWM comes from per-CPU RSS counters the
    kernel sums lazily and updates only when RSS is about to drop, so its error grows with the
    machine's CPU count and with where the scheduler ran the process.
    """
    out = _run_bench(
        [*MEDIUM, "--cuts", "1,2", "--repeats", "1", "--warmup", "0", "--parts", "16", "--threads", "1"]
    )
    assert out["mmap_threshold_pinned"] is True
    rows = out["cuts"]
    assert [row["cut"] for row in rows] == [1, 2]  # type: ignore[index]
    for row in rows:  # type: ignore[attr-defined]
        assert row["saved_ratio"] == pytest.approx(1.0, abs=0.03)
        assert row["alloc_peak_ratio"] == pytest.approx(1.0, abs=0.03), row
    # One more block holds one more block's activations: the step peaks differ by about that.
    extra = rows[1]["alloc_peak_bytes"] - rows[0]["alloc_peak_bytes"]  # type: ignore[index]
    per_block = rows[1]["est_activation_bytes"] - rows[0]["est_activation_bytes"]  # type: ignore[index]
    assert extra == pytest.approx(per_block, rel=0.05)
    parts = out["parts"]
    assert parts["shared_base"] is True  # type: ignore[index]
    assert parts["rss_per_part_bytes"] < 20 * 2**20  # type: ignore[index]
