"""Honest endings: ``RunResult.status``, the JSON line and exit codes of ``sft run``/``sft-node``,
one Ctrl-C = one polite stop under ``--processes``, ``--resume RUN_DIR`` and ``sft status``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import zmq.asyncio
from typer.testing import CliRunner

from sft_actors.actors.base import Actor
from sft_actors.actors.env import topology_schema_hash
from sft_actors.actors.testing import TEST_ROLE_REFS, TEST_ROLES, small_topology
from sft_actors.cli.main import app
from sft_actors.cli.node import app as node_app
from sft_actors.cli.status import NO_SUMMARY
from sft_actors.errors import ConfigError
from sft_actors.runtime import ActorOutcome, RunResult, run_topology
from sft_actors.topology import load_topology
from sft_actors.train.checkpoint import write_checkpoint
from sft_actors.wire.messages import RoundStart

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "topologies" / "tiny.toml"
runner = CliRunner()
pytestmark = pytest.mark.timeout(90)


# --- RunResult: status, reason, lost, the JSON line, the outcome file -------------------------


def _outcomes(**states: str) -> dict[str, ActorOutcome]:
    roles = {"coordinator": "coordinator", "server": "server"}
    return {
        n: ActorOutcome(
            name=n,
            role=roles.get(n, "device"),
            state=s,
            error=None if s == "stopped" else f"RuntimeError: {n} broke",
        )
        for n, s in states.items()
    }


def test_status_is_derived_from_the_coordinator_then_the_signal() -> None:
    everyone = _outcomes(coordinator="stopped", server="stopped", dev0="stopped")
    done = RunResult(result={"rounds": 2}, outcomes=everyone)
    assert done.status == "completed" and done.ok and done.reason == "completed" and done.lost == {}

    # A signal began the stop: interrupted, though every actor stopped cleanly.
    stopped = RunResult(result=None, outcomes=everyone, signalled=True)
    assert stopped.status == "interrupted" and not stopped.ok and "signal" in stopped.reason

    # A lost device does not fail a run whose coordinator completed.
    lost = RunResult(result={}, outcomes=_outcomes(coordinator="stopped", server="stopped", dev0="failed"))
    assert lost.status == "completed" and lost.lost == {"dev0": "RuntimeError: dev0 broke"}

    failed = RunResult(result=None, outcomes=_outcomes(coordinator="failed", dev0="failed"))
    assert failed.status == "failed" and set(failed.failures) == {"coordinator", "dev0"}
    assert failed.lost == {"dev0": "RuntimeError: dev0 broke"} and "coordinator" in failed.reason
    with pytest.raises(Exception, match="run failed: coordinator: RuntimeError"):
        failed.raise_for_failures()

    timed_out = RunResult(result=None, outcomes=everyone, error="run did not finish within 1s")
    assert timed_out.status == "failed" and timed_out.failures == {"<run>": "run did not finish within 1s"}

    # The coordinator's own word wins (it knows about quorum and checkpoints).
    said = {"status": "interrupted", "reason": "quorum lost: 1 of 3 devices"}
    quorum = RunResult(result=said, outcomes=everyone)
    assert quorum.status == "interrupted" and quorum.reason == "quorum lost: 1 of 3 devices"
    assert RunResult(result={"status": "failed", "reason": "x"}, outcomes=everyone).status == "failed"
    assert RunResult(result={"status": "completed"}, outcomes=everyone, signalled=True).ok

    # A node without a coordinator: every one of its actors counts, and a failed one is named.
    devices = RunResult(result=None, outcomes=_outcomes(dev0="stopped", dev1="failed"))
    assert devices.status == "failed" and devices.lost == {"dev1": "RuntimeError: dev1 broke"}
    # ...also when the coordinator's SHUTDOWN said the run completed without it.
    went_on = RunResult(result={"status": "completed"}, outcomes=_outcomes(dev0="stopped", dev1="failed"))
    assert went_on.ok and went_on.line()["lost"] == {"dev1": "RuntimeError: dev1 broke"}
    assert RunResult(result=None, outcomes=_outcomes(dev0="stopped")).status == "completed"


def test_the_json_line_always_has_ok_and_status() -> None:
    ok = RunResult(result={"rounds": 2}, outcomes=_outcomes(coordinator="stopped"), elapsed_s=1.23456)
    assert ok.line() == {
        "ok": True,
        "status": "completed",
        "elapsed_s": 1.235,
        "result": {"rounds": 2},
        "lost": {},
    }
    stopped = RunResult(result=None, outcomes=_outcomes(coordinator="stopped"), signalled=True).line()
    assert stopped["ok"] is False and stopped["status"] == "interrupted" and stopped["type"] == "Interrupted"
    assert stopped["failures"] == {} and stopped["result"] is None and "run interrupted" in stopped["error"]
    failed = RunResult(result=None, outcomes=_outcomes(coordinator="failed", dev0="failed")).line()
    assert failed["status"] == "failed" and failed["type"] == "ActorFailed"
    assert set(failed["failures"]) == {"coordinator", "dev0"} and set(failed["lost"]) == {"dev0"}
    assert failed["error"].startswith("run failed: coordinator: RuntimeError")


def test_the_outcome_file_round_trips() -> None:
    from sft_actors.node_process import read_outcome, write_outcome

    original = RunResult(
        result={"status": "interrupted", "reason": "signal"},
        outcomes=_outcomes(coordinator="stopped", dev0="failed"),
        elapsed_s=2.5,
        signalled=True,
    )
    data = json.loads(json.dumps(original.to_dict()))
    assert data["status"] == "interrupted" and data["reason"] == "signal" and data["signalled"] is True
    back = RunResult.from_dict(data)
    assert back == original and back.status == "interrupted" and back.lost == original.lost
    assert RunResult.from_dict({**data, "signalled": False}).signalled is False
    with pytest.raises(ValueError, match="not a run result"):
        RunResult.from_dict({"result": None})
    # An outcome file from before ``signalled`` existed still reads.
    old = {k: v for k, v in data.items() if k not in ("signalled", "status", "reason")}
    assert RunResult.from_dict(old).signalled is False

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "o.json"
        write_outcome(path, original)
        assert read_outcome(path) == original


# --- --resume RUN_DIR --------------------------------------------------------------------------


class ReportsResume(Actor):
    """A coordinator whose result is the ``resume_dir`` the runtime handed it."""

    async def run(self) -> dict[str, Any]:
        return {"resume_dir": None if self.env.resume_dir is None else str(self.env.resume_dir)}


@pytest.mark.asyncio
async def test_resume_dir_reaches_the_actors(tmp_path: Path, zmq_ctx: zmq.asyncio.Context) -> None:
    roles = {**TEST_ROLES, "coordinator": ReportsResume}
    topo = small_topology(devices=1)
    write_checkpoint(tmp_path, 0, meta={"schema_hash": topology_schema_hash(topo)}, states={})
    result = await run_topology(topo, roles=roles, ctx=zmq_ctx, timeout_s=30, resume_dir=tmp_path)
    assert result.ok and result.result == {"resume_dir": str(tmp_path)}, result.failures
    with pytest.raises(ConfigError, match=r"cannot resume: .*checkpoints does not exist"):
        await run_topology(topo, roles=roles, ctx=zmq_ctx, resume_dir=tmp_path / "nope")


def test_resume_without_checkpoints_is_a_configuration_error(tmp_path: Path) -> None:
    expected = f"cannot resume: {tmp_path / 'checkpoints'} does not exist; pass the run directory"
    for extra in ([], ["--processes"]):
        out = runner.invoke(
            app, ["run", str(TINY), "--resume", str(tmp_path), "--log-level", "warning", *extra]
        )
        assert out.exit_code == 2, out.output
        line = json.loads(out.stdout.strip().splitlines()[-1])
        assert line["ok"] is False and line["status"] == "failed" and line["type"] == "ConfigError"
        assert expected in line["error"], line
    node_args = ["--role", "coordinator", "--topology", str(TINY), "--resume", str(tmp_path)]
    out = runner.invoke(node_app, node_args)
    assert out.exit_code == 2 and expected in out.output, out.output


# --- sft status RUN_DIR ------------------------------------------------------------------------


def _checkpoint(run_dir: Path, name: str, complete: bool = True) -> None:
    d = run_dir / "checkpoints" / name
    d.mkdir(parents=True)
    if complete:
        (d / "checkpoint.json").write_text("{}")


def test_sft_status_reads_the_summary_and_lists_complete_checkpoints(tmp_path: Path) -> None:
    run_dir = tmp_path / "tiny-20250101"
    _checkpoint(run_dir, "round-0000")
    _checkpoint(run_dir, "round-0001")
    _checkpoint(run_dir, "round-0002", complete=False)  # killed while writing
    _checkpoint(run_dir, ".tmp-round-0003")  # still being written
    out = runner.invoke(app, ["status", str(run_dir)])
    assert out.exit_code == 0, out.output
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["status"] == NO_SUMMARY and line["reason"] is None and line["rounds_done"] == 0
    assert line["last_checkpoint_round"] == 1
    assert [c["round"] for c in line["checkpoints"]] == [0, 1]
    assert line["resume"].startswith(f"sft run TOPOLOGY.toml --resume {run_dir}")
    assert line["run_dir"] == str(run_dir) and "sft-node --role coordinator" in line["resume"]
    assert "resume with: sft run TOPOLOGY.toml --resume" in out.stderr
    # A run killed outright has no summary; its last checkpoint knows the file and the history.
    meta = {"topology": "lab.toml", "summary": {"rounds": [{}, {}, {}]}}
    (run_dir / "checkpoints" / "round-0001" / "checkpoint.json").write_text(json.dumps({"meta": meta}))
    line = json.loads(runner.invoke(app, ["status", str(run_dir)]).stdout.strip().splitlines()[-1])
    assert line["rounds_done"] == 3 and line["resume"].startswith(f"sft run lab.toml --resume {run_dir}")

    summary = {"status": "interrupted", "reason": "signal SIGINT", "rounds": [{}, {}]}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    line = json.loads(runner.invoke(app, ["status", str(run_dir)]).stdout.strip().splitlines()[-1])
    assert (line["status"], line["reason"], line["rounds_done"]) == ("interrupted", "signal SIGINT", 2)

    empty = tmp_path / "empty"
    empty.mkdir()
    out = runner.invoke(app, ["status", str(empty)])
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.exit_code == 0 and line["checkpoints"] == [] and line["last_checkpoint_round"] is None
    assert "cannot resume" in out.stderr

    out = runner.invoke(app, ["status", str(tmp_path / "missing")])
    assert out.exit_code == 2 and "is not a directory" in out.output


def test_sft_status_does_not_import_torch() -> None:
    code = "import sys; import sft_actors.cli.status; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env=_env())


# --- real processes: completed, and stopped by a signal ---------------------------------------


class WaitsForever(Actor):
    """A coordinator that, once every peer is there, logs ``waiting_forever`` and waits."""

    async def run(self) -> None:
        await self.wait_for_peers([a.name for a in self.topology.actors if a.name != self.name])
        resume = None if self.env.resume_dir is None else str(self.env.resume_dir)
        self.log.warning("waiting_forever", resume_dir=resume)
        await self._stop.wait()


FOREVER = f"coordinator={__name__}:WaitsForever"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _sft_run(*extra: str) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "sft_actors.cli.main", "run", str(TINY), "--log-level", "warning"]
    for role in ("server", "device"):
        args += ["--role-factory", f"{role}={TEST_ROLE_REFS[role]}"]
    return subprocess.Popen(
        [*args, "--timeout-s", "80", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT,
        start_new_session=True,  # its own process group, as a terminal's foreground job has
    )  # fmt: skip


def _read_until(proc: subprocess.Popen[str], fragment: str) -> list[str]:
    """stderr lines up to and including the first with ``fragment`` (by event, not by time;
    the test's timeout bounds it)."""
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if fragment in line:
            return seen
    raise AssertionError(f"{fragment!r} never logged: {''.join(seen)[-3000:]}")


def _finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    out, err = proc.communicate(timeout=70)
    return out, err


def test_sft_run_stopped_by_sigint_is_interrupted() -> None:
    proc = _sft_run("--role-factory", FOREVER)
    try:
        before = _read_until(proc, "waiting_forever")
        proc.send_signal(signal.SIGINT)
        out, err = _finish(proc)
        assert proc.returncode == 130, err[-3000:]
        lines = out.strip().splitlines()
        assert len(lines) == 1, out
        line = json.loads(lines[0])
        assert line["ok"] is False and line["status"] == "interrupted" and line["type"] == "Interrupted"
        log = "".join(before) + err
        assert log.count("signal_stop") == 1 and "signal_force" not in log, log[-3000:]
    finally:
        proc.kill()
        proc.wait()


def test_sft_run_completed_prints_status_and_exits_0() -> None:
    proc = _sft_run("--role-factory", f"coordinator={TEST_ROLE_REFS['coordinator']}")
    try:
        out, err = _finish(proc)
        assert proc.returncode == 0, err[-3000:]
        line = json.loads(out.strip().splitlines()[-1])
        assert line["ok"] is True and line["status"] == "completed" and line["lost"] == {}
        assert line["result"] == {"rounds": 2, "devices": ["dev0", "dev1"]}
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_one_ctrl_c_is_one_polite_stop_under_processes(tmp_path: Path) -> None:
    """Ctrl-C as a terminal sends it, to the whole foreground process group: only the parent
    gets it (the nodes have their own session) and forwards one SIGINT to each node; each
    stops politely once, none is forced. ``--resume`` reaches every node (the coordinator logs
    the RUN_DIR it was given)."""
    tiny_hash = topology_schema_hash(load_topology(TINY))
    write_checkpoint(tmp_path, 0, meta={"schema_hash": tiny_hash}, states={})
    proc = _sft_run("--processes", "--role-factory", FOREVER, "--resume", str(tmp_path))
    try:
        before = _read_until(proc, "waiting_forever")
        assert str(tmp_path) in before[-1], before[-1]
        os.killpg(proc.pid, signal.SIGINT)
        out, err = _finish(proc)
        assert proc.returncode == 130, err[-3000:]
        line = json.loads(out.strip().splitlines()[-1])
        assert line["ok"] is False and line["status"] == "interrupted", line
        log = "".join(before) + err
        assert log.count("signal_forwarded") == 1, log[-3000:]
        assert log.count("signal_stop") == 4, log[-3000:]  # coordinator, server, dev0, dev1
        assert "signal_force" not in log and "forced stop" not in log, log[-3000:]
    finally:
        proc.kill()
        proc.wait()


class GoesOnWithoutDev0(Actor):
    """Once every peer is there, logs ``waiting_for_loss``; when dev0 is gone, runs two rounds
    with dev1 and completes (the quorum decision, reduced to a test)."""

    async def run(self) -> dict[str, Any]:
        await self.wait_for_peers([a.name for a in self.topology.actors if a.name != self.name])
        self.log.warning("waiting_for_loss")
        while "dev0" in self.peers:
            self._peer_change.clear()
            await self._peer_change.wait()
        for r in range(2):
            await self.call("dev1", RoundStart(round=r))
        return {"rounds": 2, "devices": ["dev1"]}


def _child_pid(parent: int, name: str) -> int:
    """The pid of the node process ``--name name`` that ``parent`` started."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"--name" in args and args[args.index(b"--name") + 1] == name.encode():
            return int(entry.name)
    raise AssertionError(f"no node process {name!r} under {parent}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the node by /proc")
def test_a_killed_device_process_does_not_stop_the_run() -> None:
    """kill -9 of one device's process: the others go on; the coordinator completes the run
    and the dead device is reported under ``lost``, with exit 0."""
    proc = _sft_run("--processes", "--role-factory", f"coordinator={__name__}:GoesOnWithoutDev0")
    try:
        _read_until(proc, "waiting_for_loss")
        os.kill(_child_pid(proc.pid, "dev0"), signal.SIGKILL)
        out, err = _finish(proc)
        assert proc.returncode == 0, err[-3000:]
        line = json.loads(out.strip().splitlines()[-1])
        assert line["ok"] is True and line["status"] == "completed", line
        assert line["result"] == {"rounds": 2, "devices": ["dev1"]}
        assert line["lost"] == {"dev0": "process exited with code -9"}, line
        assert "process_lost" in err
    finally:
        proc.kill()
        proc.wait()
