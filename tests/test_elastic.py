"""Rounds that survive losses, in one process: a device that fails a round, one that crashes,
a straggler past the deadline, and a run that falls below its quorum.

The debug-sized Llama of ``topologies/tiny.toml`` with three devices over inproc sockets. Faults
are injected by device subclasses (chosen per device name by the role factory) and ordered by
events — the round the coordinator has recorded — never by sleeps.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from sft_actors.actors.coordinator import CoordinatorActor
from sft_actors.actors.device import DeviceActor
from sft_actors.actors.env import ActorEnv
from sft_actors.actors.handlers import MsgContext
from sft_actors.errors import ActorFailed, ProtocolViolation
from sft_actors.runtime import run_topology
from sft_actors.topology import ActorSpec, Topology, load_topology
from sft_actors.wire import RoundDone, RoundStart

ROOT = Path(__file__).resolve().parent.parent


def _topology(tmp_path: Path, *, rounds: int = 3, extra_train: str = "", devices: int = 3) -> Topology:
    text = (ROOT / "topologies" / "tiny.toml").read_text()
    text = text.replace("rounds = 2\n", f"rounds = {rounds}\n{extra_train}", 1)
    text = text.replace('dir = "runs/tiny"', f'dir = "{tmp_path / "runs"}"')
    text = text.replace("heartbeat_timeout_s = 20.0", "heartbeat_timeout_s = 20.0\nrejoin_timeout_s = 5.0")
    for i in range(2, devices):
        text += f'\n[[actors]]\nname = "dev{i}"\nrole = "device"\ncut = 1\n'
    path = tmp_path / "elastic.toml"
    path.write_text(text)
    return load_topology(path)


class _Coordinator(CoordinatorActor):
    """Sets ``ROUNDS_CLOSED[r]`` once round ``r`` is closed, averaged and checkpointed."""

    async def _round(self, r: int) -> None:
        await super()._round(r)
        ROUNDS_CLOSED.setdefault(r, asyncio.Event()).set()


ROUNDS_CLOSED: dict[int, asyncio.Event] = {}


async def _round_closed(r: int) -> None:
    """Until the coordinator has closed round ``r`` (bounded: the test's timeout)."""
    await ROUNDS_CLOSED.setdefault(r, asyncio.Event()).wait()


class FailsRoundTwo(DeviceActor):
    """Answers round 2 with an error (a bad batch, say); stays connected."""

    async def on_round_start(self, msg: RoundStart, ctx: MsgContext) -> RoundDone:
        if msg.round == 2:
            raise ProtocolViolation("injected: this device cannot do round 2")
        return await super().on_round_start(msg, ctx)


class CrashesInRoundTwo(DeviceActor):
    """Its process dies in round 2: the actor fails (no BYE)."""

    async def on_round_start(self, msg: RoundStart, ctx: MsgContext) -> RoundDone:
        if msg.round == 2:
            self._spawn(self._crash())
        return await super().on_round_start(msg, ctx)

    async def _crash(self) -> None:
        raise RuntimeError("injected crash")


class LateInRoundTwo(DeviceActor):
    """Finishes round 2 only after the coordinator closed it without this device."""

    async def on_round_start(self, msg: RoundStart, ctx: MsgContext) -> RoundDone:
        if msg.round == 2:
            await _round_closed(2)
        return await super().on_round_start(msg, ctx)


def _roles(special: dict[str, type[DeviceActor]]) -> dict[str, Any]:
    def device(spec: ActorSpec, env: ActorEnv) -> DeviceActor:
        return special.get(spec.name, DeviceActor)(spec, env)

    return {"device": device, "coordinator": _Coordinator}


def _is_file(path: Path) -> bool:
    return path.is_file()


def _summary(result: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((Path(result.result["run_dir"]) / "summary.json").read_text())
    return data


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_a_device_that_fails_a_round_is_dropped_from_it_then_rejoins(tmp_path: Path) -> None:
    topo = _topology(tmp_path)
    result = await run_topology(topo, roles=_roles({"dev1": FailsRoundTwo}), timeout_s=150)
    assert result.ok, result.failures
    s = _summary(result)
    assert s["status"] == "completed"
    lost = [r["devices_lost"] for r in s["rounds"]]
    assert list(lost[1]) == ["dev1"] and "injected" in lost[1]["dev1"]
    assert lost[0] == {} and lost[2] == {}, "dev1 is back from the next round"
    assert sorted(s["rounds"][2]["per_device_loss"]) == ["dev0", "dev1", "dev2"]
    assert sorted(s["rounds"][1]["per_device_loss"]) == ["dev0", "dev2"]
    assert s["devices_lost"] == 1


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_a_crashed_device_is_lost_and_the_run_completes_without_it(tmp_path: Path) -> None:
    topo = _topology(tmp_path)
    result = await run_topology(topo, roles=_roles({"dev2": CrashesInRoundTwo}), timeout_s=150)
    assert result.outcomes["coordinator"].state == "stopped"
    assert result.outcomes["dev2"].state == "failed"
    s = _summary(result)
    assert s["status"] == "completed", s["reason"]
    assert "dev2" in s["rounds"][1]["devices_lost"]
    assert sorted(s["rounds"][2]["per_device_loss"]) == ["dev0", "dev1"]
    assert s["checkpoint"]["round"] == 3


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_a_straggler_is_dropped_from_the_round_not_the_run(tmp_path: Path) -> None:
    ROUNDS_CLOSED.clear()
    topo = _topology(tmp_path, extra_train="round_deadline_s = 3.0\n")
    result = await run_topology(topo, roles=_roles({"dev0": LateInRoundTwo}), timeout_s=150)
    assert result.ok, result.failures
    s = _summary(result)
    assert "late" in s["rounds"][1]["devices_lost"]["dev0"]
    assert sorted(s["rounds"][2]["per_device_loss"]) == ["dev0", "dev1", "dev2"]


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_below_quorum_the_run_stops_with_an_error_a_summary_and_a_checkpoint(tmp_path: Path) -> None:
    topo = _topology(tmp_path, extra_train="min_devices = 3\n")
    result = await run_topology(topo, roles=_roles({"dev2": CrashesInRoundTwo}), timeout_s=150)
    s = _summary(result)
    assert s["status"] == "failed"
    assert "quorum" in s["reason"] and "min_devices = 3" in s["reason"]
    assert s["checkpoint"]["round"] >= 1
    assert _is_file(Path(s["checkpoint"]["path"], "checkpoint.json"))
    assert result.result["status"] == "failed"
    with pytest.raises(ActorFailed):
        result.raise_for_failures()


def test_the_default_deadline_adapts_to_the_rounds_so_far() -> None:
    from sft_actors.topology.schema import TrainConfig

    t = TrainConfig(round_timeout_s=1800.0)
    assert t.deadline_s() == 1800.0  # nothing measured yet: the round timeout
    assert t.deadline_s([2.0, 3.0, 100.0]) == 60.0  # 10 × median 3 s is below the floor
    assert t.deadline_s([20.0, 30.0, 40.0]) == 300.0
    assert t.deadline_s([500.0]) == 1800.0  # never past the round timeout
    assert TrainConfig(round_deadline_s=5.0).deadline_s([1000.0]) == 5.0  # an explicit one wins
