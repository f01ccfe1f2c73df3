"""Whole topologies through ``run_topology`` (the function ``sft run`` calls), in one process
over inproc, ipc and tcp, and as real processes through the CLI."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import zmq.asyncio

from sft_actors.actors.base import Actor, ActorState
from sft_actors.actors.testing import (
    TEST_ROLE_REFS,
    TEST_ROLES,
    CollectorCoordinator,
    PingDevice,
    small_topology,
)
from sft_actors.errors import ConfigError
from sft_actors.runtime import run_topology, select_actors
from sft_actors.topology import load_topology
from sft_actors.transport.endpoints import TRANSPORTS, Transport
from sft_actors.wire.messages import RoundStart

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "topologies" / "tiny.toml"
pytestmark = pytest.mark.timeout(90)


def ephemeral(topo: Any) -> Any:
    """The same topology with port 0 everywhere (tests must not fight over fixed ports)."""
    actors = tuple(dataclasses.replace(a, port=0) if a.addressed else a for a in topo.actors)
    return dataclasses.replace(topo, actors=actors)


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_tiny_topology_runs_to_completion(transport: Transport, zmq_ctx: zmq.asyncio.Context) -> None:
    topo = ephemeral(load_topology(TINY))
    result = await run_topology(topo, transport=transport, roles=TEST_ROLES, ctx=zmq_ctx, timeout_s=30)
    assert result.ok, result.failures
    assert result.result == {"rounds": 2, "devices": ["dev0", "dev1"]}
    assert {o.state for o in result.outcomes.values()} == {"stopped"}


class CrashingDevice(PingDevice):
    """dev0's main loop crashes at start (and says so); dev1 is healthy. (A handler that raises
    is not a crash: its caller gets an ERROR frame, see test_actor.)"""

    crashed: asyncio.Event | None = None

    async def run(self) -> None:
        if self.name == "dev0":
            if CrashingDevice.crashed is not None:
                CrashingDevice.crashed.set()
            raise RuntimeError("device main loop crashed")


class CoordinatorWithoutDev0(CollectorCoordinator):
    """Goes on without dev0 once it has crashed (the quorum decision, reduced to a test)."""

    async def run(self) -> dict[str, Any]:
        assert CrashingDevice.crashed is not None
        await CrashingDevice.crashed.wait()
        await self.wait_for_peers(["server", "dev1"])
        for r in range(2):
            await self.call("dev1", RoundStart(round=r))
        return {"rounds": 2, "devices": ["dev1"]}


@pytest.mark.asyncio
async def test_a_failing_device_does_not_stop_the_run(zmq_ctx: zmq.asyncio.Context) -> None:
    """Elastic: only the coordinator's ending stops the others; the dead device is ``lost``."""
    CrashingDevice.crashed = asyncio.Event()
    topo = small_topology(devices=2)
    roles = {**TEST_ROLES, "device": CrashingDevice, "coordinator": CoordinatorWithoutDev0}
    try:
        result = await run_topology(topo, roles=roles, ctx=zmq_ctx, timeout_s=30)
    finally:
        CrashingDevice.crashed = None
    assert result.ok and result.status == "completed", result.failures
    assert result.result == {"rounds": 2, "devices": ["dev1"]}
    assert result.outcomes["dev0"].state == "failed"
    assert all(result.outcomes[n].state == "stopped" for n in ("coordinator", "server", "dev1"))
    assert list(result.lost) == ["dev0"] and "device main loop crashed" in result.lost["dev0"]
    line = result.line()
    assert line["ok"] is True and line["status"] == "completed" and list(line["lost"]) == ["dev0"]


class NeverDone(Actor):
    async def run(self) -> None:
        await self.wait_for_peers([a.name for a in self.topology.actors if a.name != self.name])
        await self._stop.wait()


@pytest.mark.asyncio
async def test_run_timeout_stops_everyone(zmq_ctx: zmq.asyncio.Context) -> None:
    topo = small_topology(devices=1)
    result = await run_topology(
        topo, roles={**TEST_ROLES, "coordinator": NeverDone}, ctx=zmq_ctx, timeout_s=0.5
    )
    assert not result.ok and "did not finish within 0.5s" in (result.error or "")
    assert all(o.state == ActorState.STOPPED.value for o in result.outcomes.values())


def test_select_actors_and_missing_roles() -> None:
    topo = load_topology(ROOT / "topologies" / "lab.toml")
    assert [a.name for a in select_actors(topo, "device", host="board-a")] == ["board-a-dev"]
    assert [a.name for a in select_actors(topo, "server", "server")] == ["server"]
    with pytest.raises(ConfigError, match="is a device"):
        select_actors(topo, "server", "board-a-dev")
    with pytest.raises(ConfigError, match="pass --host"):
        select_actors(topo, "device")
    from sft_actors.actors.roles import resolve_factory

    with pytest.raises(ConfigError, match=r"cannot import 'no_such_pkg\.mod' for role 'server'"):
        resolve_factory("no_such_pkg.mod:Thing", role="server")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sft_run_processes(tmp_path: Path) -> None:
    """Four real processes (ipc), one per actor, with the test actors plugged in from the CLI."""
    args = [
        sys.executable,
        "-c",
        "from sft_actors.cli.main import app; app()",
        "run",
        str(TINY),
        "--processes",
        "--log-level",
        "warning",
        "--timeout-s",
        "80",
    ]
    for role, ref in TEST_ROLE_REFS.items():
        args += ["--role-factory", f"{role}={ref}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=85, cwd=tmp_path, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["ok"] is True and line["status"] == "completed", line
    assert line["result"] == {"rounds": 2, "devices": ["dev0", "dev1"]} and line["lost"] == {}


def _sft_run(tmp_path: Path, topology: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    """``sft run`` as a user runs it; (exit code, its stdout parsed: exactly one JSON line)."""
    args = [sys.executable, "-m", "sft_actors.cli.main", "run", str(topology), "--log-level", "warning"]
    proc = subprocess.run(
        [*args, "--timeout-s", "100", *extra],
        capture_output=True, text=True, timeout=110, cwd=tmp_path, env=_env(),
    )  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, (proc.stdout[-2000:], proc.stderr[-3000:])
    return proc.returncode, json.loads(lines[0])


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "mode",
    [
        pytest.param([], id="in-process"),
        pytest.param(["--processes"], id="processes", marks=pytest.mark.slow),
    ],
)
def test_sft_run_prints_one_json_line_with_ok(tmp_path: Path, mode: list[str]) -> None:
    """The real tiny model, once succeeding and once with a dataset that does not exist: the same
    line shape both ways (``ok`` always; ``result``, or ``type``/``error``/``failures``)."""
    code, line = _sft_run(tmp_path, TINY, *mode)
    assert code == 0 and line["ok"] is True and line["status"] == "completed", line
    assert line["result"]["mode"] == "sft" and line["result"]["after"]["perplexity"] > 1

    missing = tmp_path / "no-such-corpus.txt"
    bad = tmp_path / "bad.toml"
    text = TINY.read_text().replace('dataset = "stdlib-docs"', f'dataset = "text:{missing}"')
    bad.write_text(text.replace("options = { max_documents = 40 }\n", ""))
    code, line = _sft_run(tmp_path, bad, *mode)
    assert code == 2, line  # a configuration error: refused when the file loads
    assert line["ok"] is False and line["status"] == "failed" and line["type"] == "TopologyError", line
    assert "key 'dataset'" in line["error"] and str(missing) in line["error"]


class StuckInCleanup(Actor):
    """A coordinator whose cleanup hangs: only a second signal ends it quickly."""

    async def cleanup(self, exc: BaseException | None) -> None:
        await asyncio.Event().wait()


def _start_node(tmp_path: Path, factory: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sft_actors.cli.node", "--role", "coordinator", "--topology", str(TINY),
         "--transport", "ipc", "--ipc-dir", str(tmp_path), "--log-level", "debug",
         "--role-factory", f"coordinator={factory}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip


def _wait_for_line(proc: subprocess.Popen[str], fragment: str) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:  # by event (a log line), not by time
        if fragment in line:
            return
    raise AssertionError(f"{fragment!r} never logged")


@pytest.mark.slow
def test_second_signal_forces_the_stop(tmp_path: Path) -> None:
    proc = _start_node(tmp_path, "tests.test_runtime:StuckInCleanup")
    try:
        _wait_for_line(proc, "actor_ready")
        proc.send_signal(signal.SIGTERM)
        _wait_for_line(proc, "actor_stopping")
        proc.send_signal(signal.SIGTERM)
        # Exit code 130 and "forced stop" come only from the forced path; had the second signal
        # been ignored, the 10 s cleanup timeout would fail the actor (exit 1). So the outcome,
        # not a time window, tells the paths apart; the timeout only guards against a hang.
        out, rest = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "forced stop" in rest, rest[-2000:]
        line = json.loads(out.strip().splitlines()[-1])
        assert line["ok"] is False and line["status"] == "interrupted" and line["error"] == "forced stop"
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_sft_node_stops_on_sigterm(tmp_path: Path) -> None:
    """SIGTERM starts the staged shutdown: the node stops politely without its peers, and says
    the run was interrupted (130), not completed."""
    proc = _start_node(tmp_path, TEST_ROLE_REFS["coordinator"])
    try:
        _wait_for_line(proc, "actor_ready")
        proc.send_signal(signal.SIGTERM)
        out, rest = proc.communicate(timeout=60)  # reads the pipes, so a chatty exit cannot block
        assert proc.returncode == 130, rest[-2000:]
        line = json.loads(out.strip().splitlines()[-1])
        assert line["ok"] is False and line["status"] == "interrupted", line
        assert "signal_stop" in rest and "signal_force" not in rest and "forced stop" not in rest
    finally:
        proc.kill()
        proc.wait()
