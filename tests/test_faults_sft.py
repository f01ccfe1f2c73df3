"""Real processes, real faults: a run survives killed, paused and restarted nodes, and a Ctrl-C.

One node process per actor (``python -m sft_actors.node_process``, the flags of ``sft-node``),
tcp on loopback with ports picked free per test, ``--log-format json``. The topology is
``topologies/tiny.toml`` with a third device, so the default quorum (2 of 3) holds with one
device down. A thread reads the coordinator's stderr (one JSON object per line) and the test
waits — always bounded — for the events it needs (``round_done``, ``device_lost``,
``devices_admitted``, …) before it injects the next fault; no wall-clock duration is asserted.

- a device killed (SIGKILL) is dropped, the run goes on; restarted, it is admitted again;
- a device paused (SIGSTOP) past ``heartbeat_timeout_s`` is lost; resumed (SIGCONT), it rejoins
  and its process ends cleanly with the run;
- a server killed mid-run aborts the round; restarted, every actor rolls back to the last
  checkpoint and the run completes;
- SIGINT to the coordinator ends the run ``interrupted`` (exit 130) with a checkpoint; the
  nodes started again, the coordinator with ``--resume RUN_DIR``, finish it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from sft_actors.security import generate_keys
from sft_actors.topology import load_topology
from tests.ports import free_ports

ROOT = Path(__file__).resolve().parent.parent
# Small enough that a lost node is noticed quickly, large enough that a node starved for a few
# seconds by a loaded 2-core machine is not taken for lost.
HEARTBEAT_TIMEOUT_S = 4.0
WAIT_S = 90.0  # the most any single step of a scenario may take (never reached when healthy)
DEVICES = ("dev0", "dev1", "dev2")

Event = dict[str, Any]


def _topology(tmp_path: Path, *, rounds: int, secure: bool = False) -> Path:
    text = (ROOT / "topologies" / "tiny.toml").read_text()
    if secure:  # CURVE: no ROUTER_HANDOVER, so a restarted device must wait for its old id to free
        text = text.replace(
            "[run.train]", f'[run.security]\nmode = "curve"\nkeys = "{tmp_path / "keys"}"\n\n[run.train]', 1
        )
    text = text.replace("rounds = 2\n", f"rounds = {rounds}\n", 1)
    text = text.replace('dir = "runs/tiny"', f'dir = "{tmp_path / "runs"}"')
    coordinator, server = free_ports(2)
    # One pass: a free port that happens to be 47311 must not be rewritten by the second swap.
    ports = {"47310": coordinator, "47311": server}
    text = re.sub(r"port = (4731[01])\b", lambda m: f"port = {ports[m.group(1)]}", text)
    text = text.replace(
        "heartbeat_timeout_s = 20.0",
        f"heartbeat_timeout_s = {HEARTBEAT_TIMEOUT_S}\nrejoin_timeout_s = 60.0",
    )
    text += '\n[[actors]]\nname = "dev2"\nrole = "device"\ncut = 1\n'
    path = tmp_path / "faults.toml"
    path.write_text(text)
    if secure:
        generate_keys(load_topology(path, roles=()), tmp_path / "keys")
    return path


class Cluster:
    """The node processes of one run, and the coordinator's log as it is written."""

    def __init__(self, tmp_path: Path, topology: Path) -> None:
        self.tmp_path = tmp_path
        self.topology = topology
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.events: list[Event] = []
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader: threading.Thread | None = None
        self._logs: list[IO[str]] = []
        self._starts = 0

    def start(self, name: str, *extra: str) -> subprocess.Popen[str]:
        """Start ``name``'s node (the same command every time: a restart is a start)."""
        role = name if name in ("coordinator", "server") else "device"
        cmd = [sys.executable, "-m", "sft_actors.node_process", "--role", role, "--name", name]
        cmd += ["--topology", str(self.topology), "--transport", "tcp", "--log-format", "json"]
        cmd += ["--timeout-s", "400", *extra]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self._starts += 1
        if role == "coordinator":
            err: Any = subprocess.PIPE
            self.events, self.lines = [], []
        else:  # a file: nobody reads these pipes, so they must not fill up
            err = open(self.tmp_path / f"{name}-{self._starts}.log", "w")  # noqa: SIM115
            self._logs.append(err)
        proc = subprocess.Popen(
            cmd, cwd=self.tmp_path, env=env, stdout=subprocess.PIPE, stderr=err, text=True
        )  # fmt: skip
        self.procs[name] = proc
        if role == "coordinator":
            self._reader = threading.Thread(target=self._read, args=(proc,), daemon=True)
            self._reader.start()
        return proc

    def start_all(self, *coordinator_args: str) -> None:
        self.start("coordinator", *coordinator_args)
        for name in ("server", *DEVICES):
            self.start(name)

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            event: Event | None = None
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
            with self._changed:
                self.lines.append(line)
                if event is not None:
                    self.events.append(event)
                self._changed.notify_all()

    def wait_for(self, event: str, timeout_s: float = WAIT_S, **fields: Any) -> Event:
        """The first logged ``event`` whose fields match (a value may be a predicate)."""

        def match(e: Event) -> bool:
            if e.get("event") != event:
                return False
            for k, want in fields.items():
                got = e.get(k)
                if not (want(got) if callable(want) else got == want):
                    return False
            return True

        with self._changed:
            found = self._changed.wait_for(
                lambda: next((e for e in self.events if match(e)), None), timeout_s
            )
        if found is None:
            pytest.fail(
                f"no {event} {fields or ''} within {timeout_s}s; the coordinator's last lines:\n{self.tail()}"
            )
        return found

    def count(self, event: str) -> int:
        with self._changed:
            return sum(1 for e in self.events if e.get("event") == event)

    def tail(self, n: int = 25) -> str:
        with self._changed:
            return "".join(self.lines[-n:])

    def finish(self, name: str = "coordinator", timeout_s: float = WAIT_S) -> tuple[int, str]:
        """Wait for ``name``'s process; its exit code and stdout."""
        proc = self.procs[name]
        try:  # not communicate(): it would read the stderr the coordinator's reader reads
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"{name} did not end within {timeout_s}s; the coordinator's last lines:\n{self.tail()}"
            )
        if name == "coordinator" and self._reader is not None:
            self._reader.join(timeout=10)
        assert proc.stdout is not None
        return proc.returncode, proc.stdout.read()  # one line: it cannot have filled the pipe

    def result(self) -> tuple[int, Event, Event]:
        """The coordinator's exit code, its JSON line, and the run's summary.json."""
        code, out = self.finish()
        line: Event = json.loads(out.strip().splitlines()[-1])
        started = self.wait_for("run_started", timeout_s=0)
        summary: Event = json.loads((Path(started["run_dir"]) / "summary.json").read_text())
        return code, line, summary

    def stop(self) -> None:
        (self.tmp_path / "coordinator.log").write_text("".join(self.lines))
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        for f in self._logs:
            f.close()


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(rounds: int, secure: bool = False) -> Cluster:
        made.append(Cluster(tmp_path, _topology(tmp_path, rounds=rounds, secure=secure)))
        return made[-1]

    yield make
    for c in made:
        c.stop()


def _lost_in(summary: Event, device: str) -> list[int]:
    return [r["round"] for r in summary["rounds"] if device in r["devices_lost"]]


def _took_part(summary: Event, device: str) -> list[int]:
    return [r["round"] for r in summary["rounds"] if device in r["per_device_loss"]]


def _completed(code: int, line: Event, summary: Event, rounds: int) -> None:
    assert (code, line["ok"], line["status"]) == (0, True, "completed"), line
    assert summary["status"] == "completed", summary["reason"]
    assert [r["round"] for r in summary["rounds"]] == list(range(1, rounds + 1))


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("secure", [False, True], ids=["none", "curve"])
def test_a_killed_device_is_dropped_and_a_restarted_one_rejoins(
    cluster_factory: Callable[..., Cluster], secure: bool
) -> None:
    rounds = 150  # rounds take ~0.1 s: enough left for the restarted process to start and join
    c = cluster_factory(rounds, secure=secure)
    c.start_all()
    c.wait_for("round_done", round=1)
    c.procs["dev1"].send_signal(signal.SIGKILL)
    c.procs["dev1"].wait()
    c.wait_for("device_lost", device="dev1")
    c.start("dev1")  # the same command again
    c.wait_for("devices_admitted", active=lambda a: a is not None and "dev1" in a)
    code, line, summary = c.result()
    _completed(code, line, summary, rounds)
    assert summary["devices_lost"] >= 1 and _lost_in(summary, "dev1"), summary["rounds"]
    lost_at = _lost_in(summary, "dev1")[0]
    back = [r for r in _took_part(summary, "dev1") if r > lost_at]
    assert back and back[-1] == rounds, "dev1 trains again after its restart, to the end"
    assert all(_took_part(summary, d) == list(range(1, rounds + 1)) for d in ("dev0", "dev2"))
    assert c.procs["dev1"].wait(timeout=WAIT_S) == 0  # the restarted device ends with the run


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_paused_device_is_lost_then_rejoins_when_resumed(cluster_factory: Callable[[int], Cluster]) -> None:
    rounds = 30
    c = cluster_factory(rounds)
    c.start_all()
    c.wait_for("round_done", round=1)
    dev = c.procs["dev2"]
    dev.send_signal(signal.SIGSTOP)
    try:
        c.wait_for("device_lost", device="dev2")
    finally:
        dev.send_signal(signal.SIGCONT)
    c.wait_for("devices_admitted", active=lambda a: a is not None and "dev2" in a)
    code, line, summary = c.result()
    _completed(code, line, summary, rounds)
    lost_at = _lost_in(summary, "dev2")
    assert lost_at, summary["rounds"]
    assert [r for r in _took_part(summary, "dev2") if r > lost_at[0]], "dev2 trains again after SIGCONT"
    assert c.finish("dev2")[0] == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_killed_server_aborts_the_round_and_a_restarted_one_resumes_the_run(
    cluster_factory: Callable[[int], Cluster],
) -> None:
    rounds = 12
    c = cluster_factory(rounds)
    c.start_all()
    c.wait_for("round_done", round=2)
    c.procs["server"].send_signal(signal.SIGKILL)
    c.procs["server"].wait()
    c.wait_for("server_lost", server="server")
    c.start("server")
    c.wait_for("rolled_back")
    code, line, summary = c.result()
    _completed(code, line, summary, rounds)
    assert summary["rounds_aborted"], summary
    aborted = summary["rounds_aborted"][0]
    # Killed after round 2 closed: its averaging or checkpoint, or a later round, is aborted.
    assert aborted["round"] >= 2 and aborted["rolled_back_to"] < aborted["round"]
    for name in ("server", *DEVICES):
        assert c.finish(name)[0] == 0, name


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigint_interrupts_with_a_checkpoint_and_resume_finishes_the_run(
    cluster_factory: Callable[[int], Cluster],
) -> None:
    rounds = 8
    c = cluster_factory(rounds)
    c.start_all()
    c.wait_for("checkpoint_written", round=2)
    c.procs["coordinator"].send_signal(signal.SIGINT)
    code, line, summary = c.result()
    assert (code, line["ok"], line["status"]) == (130, False, "interrupted"), line
    assert summary["status"] == "interrupted"
    run_dir = Path(summary["run_dir"])
    assert summary["checkpoint"]["round"] >= 2
    assert Path(summary["checkpoint"]["path"], "checkpoint.json").is_file()
    assert len(summary["rounds"]) < rounds
    for name in ("server", *DEVICES):  # the coordinator's SHUTDOWN stops them: interrupted too
        assert c.finish(name)[0] == 130, name

    c.start_all("--resume", str(run_dir))
    code, line, done = c.result()
    _completed(code, line, done, rounds)
    assert done["resumed_from"] == summary["checkpoint"]["round"]
    assert done["run_dir"] == str(run_dir)
