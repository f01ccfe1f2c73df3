"""``sft model info`` / ``sft model verify`` through typer's CliRunner."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sft_actors.cli.model import app
from sft_actors.model import LoraConfig, estimate_device_memory, load_config

runner = CliRunner()


def test_info_prints_blocks_memory_and_flops() -> None:
    result = runner.invoke(app, ["info", "llama-tiny", "--cut", "2", "--batch", "2", "--seq", "32"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "blocks 4" in out and "per block" in out and "fwd GFLOP" in out
    assert "device memory at cut 2" in out and "activation" in out and "optimizer" in out
    assert len([line for line in out.splitlines() if line.strip().split(" ")[0].isdigit()]) >= 4


def test_info_json_matches_the_estimate() -> None:
    result = runner.invoke(
        app, ["info", "vit-tiny", "--cut", "3", "--batch", "4", "--rank", "4", "--mlp", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    expected = estimate_device_memory(load_config("vit-tiny"), 3, 4, None, LoraConfig(rank=4, mlp=True))
    assert data["estimate"]["total_bytes"] == expected.total_bytes
    assert data["blocks"] == 4 and data["estimate"]["seq"] == 65
    by_cut = data["device_bytes_by_cut"]
    assert len(by_cut) == 5 and by_cut == sorted(by_cut)


@pytest.mark.parametrize(
    ("spec", "args", "grads"),
    [
        # Every LoRA tensor (A and B) of every block, on both sides of the split: 4 blocks ×
        # 4 adapted projections (Llama: q, k, v, o; ViT with --mlp: qkv, proj, fc1, fc2).
        ("llama-tiny", ["--cut", "2"], 4 * 4 * 2),
        ("vit-tiny", ["--cut", "3", "--server-start", "1", "--mlp"], 4 * 4 * 2),
    ],
)
def test_verify_json_last_line(spec: str, args: list[str], grads: int) -> None:
    result = runner.invoke(app, ["verify", spec, *args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["ok"] is True
    assert data["max_abs_logit_diff"] <= 1e-6 and data["max_rel_grad_diff"] <= 1e-6
    assert data["grads_compared"] == grads


def test_errors_exit_2_with_a_hint() -> None:
    bad_cut = runner.invoke(app, ["verify", "llama-tiny", "--cut", "9"])
    assert bad_cut.exit_code == 2 and "outside" in bad_cut.output
    unknown = runner.invoke(app, ["info", "no-such-model"])
    assert unknown.exit_code == 2 and "smollm2-135m" in unknown.output


def test_registered_in_the_sft_app() -> None:
    from sft_actors.cli.main import app as sft

    result = runner.invoke(sft, ["model", "info", "llama-tiny", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["family"] == "llama"


@pytest.mark.slow
def test_verify_smollm2_within_1e_4() -> None:
    result = runner.invoke(
        app, ["verify", "smollm2-135m", "--cut", "4", "--server-start", "2", "--seq", "12", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["max_abs_logit_diff"] <= 1e-4 and data["max_rel_grad_diff"] <= 1e-4
    assert data["grads_compared"] == 240
