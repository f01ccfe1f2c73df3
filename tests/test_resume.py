"""Interrupt a run with a real SIGINT after a checkpoint, resume it: the losses and adapters
equal an uninterrupted run's, exactly (in-process, same seed, deterministic settings)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from sft_actors.actors.coordinator import CoordinatorActor
from sft_actors.errors import ConfigError
from sft_actors.runtime import run_topology
from sft_actors.topology import Topology, load_topology

ROOT = Path(__file__).resolve().parent.parent


def _topology(tmp_path: Path, name: str, *, rounds: int = 4, lora_rank: int = 4) -> Topology:
    text = (ROOT / "topologies" / "tiny.toml").read_text()
    text = text.replace("rounds = 2\n", f"rounds = {rounds}\n", 1)
    text = text.replace('server_update = "per_batch"', 'server_update = "per_round"')
    text = text.replace("rank = 4\n", f"rank = {lora_rank}\n")
    text = text.replace('dir = "runs/tiny"', f'dir = "{tmp_path / name}"')
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return load_topology(path)


class InterruptAfterRoundTwo(CoordinatorActor):
    """Sends this process SIGINT once checkpoint 2 is on disk (what Ctrl-C does)."""

    async def _checkpoint(self, r: int, devices: list[str] | None = None) -> None:
        await super()._checkpoint(r, devices)
        if r == 2:
            os.kill(os.getpid(), signal.SIGINT)


def _summary(run_dir: str | Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((Path(run_dir) / "summary.json").read_text())
    return data


@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    straight = await run_topology(_topology(tmp_path, "straight"), timeout_s=200)
    assert straight.ok, straight.failures
    assert straight.result["status"] == "completed"

    topo = _topology(tmp_path, "broken")
    stopped = await run_topology(
        topo, roles={"coordinator": InterruptAfterRoundTwo}, timeout_s=200, handle_signals=True
    )
    assert stopped.status == "interrupted" and stopped.signalled
    run_dir = Path(stopped.result["run_dir"])
    partial = _summary(run_dir)
    assert partial["status"] == "interrupted"
    assert partial["checkpoint"]["round"] >= 2
    assert not (run_dir / "adapters_devices.safetensors").exists()

    resumed = await run_topology(topo, resume_dir=run_dir, timeout_s=200)
    assert resumed.ok, resumed.failures
    done = _summary(run_dir)
    expected = _summary(straight.result["run_dir"])
    assert done["status"] == "completed" and done["resumed_from"] == partial["checkpoint"]["round"]
    assert [r["loss"] for r in done["rounds"]] == [r["loss"] for r in expected["rounds"]]
    assert done["after"]["loss"] == expected["after"]["loss"]
    for name in ("adapters_devices.safetensors", "adapters_server.safetensors"):
        got, want = load_file(run_dir / name), load_file(Path(straight.result["run_dir"]) / name)
        assert got.keys() == want.keys()
        assert all(bool((got[k] == want[k]).all()) for k in want), name
        assert (run_dir / name).read_bytes() == (Path(straight.result["run_dir"]) / name).read_bytes()


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_resume_refuses_a_checkpoint_of_another_topology(tmp_path: Path) -> None:
    first = await run_topology(_topology(tmp_path, "a", rounds=1), timeout_s=100)
    assert first.ok
    other = _topology(tmp_path, "b", rounds=2, lora_rank=2)
    with pytest.raises(ConfigError, match="different topology"):  # before any actor starts
        await run_topology(other, resume_dir=Path(first.result["run_dir"]), timeout_s=100)
    runs = sorted(p.name for p in (tmp_path / "b").glob("*")) if (tmp_path / "b").exists() else []
    assert runs == [], "a refused resume makes no run directory"


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_resume_from_a_dir_without_checkpoints_fails_before_anything_runs(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="has none"):
        await run_topology(_topology(tmp_path, "c", rounds=1), resume_dir=empty, timeout_s=100)
