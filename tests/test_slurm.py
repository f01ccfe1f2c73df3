"""``sft launch --backend slurm``: the job (pure), then real jobs on a one-node Slurm cluster.

The pure tests build the batch script from hostile-looking values (a log directory, working
directory, interpreter and run directory holding quotes, ``$(…)``, backticks, ``;``) and run it
under a real ``bash`` with a stub ``srun`` on ``PATH`` that records its words: every node gets
exactly its argv, nothing is injected; a value sbatch would read on a ``#SBATCH`` line (a
partition, a time) must be plain or is refused.

The real tests start ``deploy/slurm/local-cluster.sh`` once for the module (munged, slurmctld,
slurmd on free loopback ports, all state under a temporary directory; stopped at the end even
on failure) and run copies of ``topologies/tiny.toml`` through ``sft launch --backend slurm``
as a process. A thread reads the launcher's progress lines; the tests wait, always bounded, for
the lines they need (``submitted job N``, ``round 1 done``) before they act (``scancel``, a
Ctrl-C); jobs still known at the end are cancelled.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from typer.testing import CliRunner

from sft_actors.cli.main import app
from sft_actors.launch.outcome import NodeEnd
from sft_actors.launch.placement import NodeSpec, placement
from sft_actors.launch.procs import LaunchConfigError
from sft_actors.launch.slurm import SlurmOptions, plan_slurm
from sft_actors.launch.slurm_script import (
    Job,
    batch_script,
    job_name,
    parse_sinfo,
    plan_components,
    plan_steps,
    srun_words,
    step_argv,
)
from sft_actors.launch.slurm_watch import NodeLog, job_ended, judge_job, read_steps
from sft_actors.rendezvous import advertised_address
from sft_actors.security import generate_keys
from sft_actors.topology import Topology, load_topology, parse_topology

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "deploy" / "slurm" / "local-cluster.sh"
WAIT_S = 120.0  # the most any single wait may take (never reached when healthy)
HOSTILE = "a b'c\"d $(touch pwned) `touch pwned2`; echo INJECTED #"


def _tiny(hosts: dict[str, str] | None = None) -> Topology:
    """tiny.toml; with ``hosts`` (role → host name) its actors placed on those hosts."""
    import tomllib

    data = tomllib.loads((ROOT / "topologies" / "tiny.toml").read_text())
    if hosts:
        for a in data["actors"]:
            a["host"] = hosts[a["role"]]
        data["hosts"] = [{"name": h, "address": "auto"} for h in dict.fromkeys(hosts.values())]
        data["run"]["security"] = {"mode": "none", "allow_insecure": True}
    return parse_topology(data, source="tiny.toml", model_config=lambda _spec: None, roles=())


def _nodes(
    topo: Topology, python: str = "/usr/bin/python3", topology: str = "/t/tiny.toml"
) -> list[NodeSpec]:
    return placement(topo, topology=topology, remote_python=python, local_python=python)


# --- the job (pure) ------------------------------------------------------------------------


def test_one_component_without_a_gpu_partition_hosts_spread_over_the_nodes() -> None:
    nodes = _nodes(_tiny({"coordinator": "edge", "server": "edge", "device": "board"}))
    (c,) = plan_components(nodes, partition="cpu", gpu_partition=None, max_nodes=None)
    assert (c.hosts, c.nodes, c.partition, c.gres, c.cpus_per_node) == (("edge", "board"), 2, "cpu", None, 2)
    (one,) = plan_components(nodes, partition=None, gpu_partition=None, max_nodes=1)
    assert (one.nodes, one.cpus_per_node) == (1, 4)  # every actor on the one node
    assert [(s.node.label, s.component, s.relative) for s in plan_steps(nodes, [c])] == [
        ("edge-coordinator", 0, 0), ("edge-server", 0, 0), ("board-device", 0, 1),
    ]  # fmt: skip


def test_a_gpu_partition_makes_a_heterogeneous_job_edge_hosts_with_a_gpu() -> None:
    nodes = _nodes(_tiny({"coordinator": "edge", "server": "edge", "device": "board"}))
    edge, board = plan_components(nodes, partition="cpu", gpu_partition="gpu", max_nodes=None)
    assert (edge.hosts, edge.partition, edge.gres) == (("edge",), "gpu", "gpu:1")
    assert (board.hosts, board.partition, board.gres) == (("board",), "cpu", None)
    job = Job(name="sft-tiny", components=(edge, board), steps=plan_steps(nodes, [edge, board]),
              logs=Path("/l"), cwd=Path("/c"), grace_s=12)  # fmt: skip
    script = batch_script(job)
    head = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert head[3:] == [
        "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=2",
        "#SBATCH --partition=gpu", "#SBATCH --gres=gpu:1", "#SBATCH hetjob", "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=2", "#SBATCH --partition=cpu",
    ]  # fmt: skip
    assert srun_words(job, job.steps[2])[:2] == ["srun", "--het-group=1"]
    # Everything on the GPU hosts: one component, no hetjob.
    (only,) = plan_components(_nodes(_tiny()), partition=None, gpu_partition="gpu", max_nodes=None)
    assert only.partition == "gpu" and only.gres == "gpu:1"


def test_the_default_cpu_count_is_capped_by_the_partitions_smallest_node() -> None:
    cpus = parse_sinfo("debug* 2\nbig 64+\nweird x\n")
    assert cpus == {"debug": 2, None: 2, "big": 64}
    nodes = _nodes(_tiny())
    assert (
        plan_components(nodes, partition=None, gpu_partition=None, max_nodes=None, cpus=cpus)[0].cpus_per_node
        == 2
    )
    assert (
        plan_components(nodes, partition="big", gpu_partition=None, max_nodes=None, cpus=cpus)[
            0
        ].cpus_per_node
        == 4
    )
    given = plan_components(
        nodes, partition=None, gpu_partition=None, max_nodes=None, cpus=cpus, cpus_per_node=8
    )
    assert given[0].cpus_per_node == 8  # asked for: not capped


def test_job_names_and_sbatch_values_are_plain() -> None:
    assert job_name("tiny") == "sft-tiny"
    assert job_name("a b/c") == "sft-a-b-c"
    for bad in ("debug --wrap=x", "a\nb", "$(id)", "p'q"):
        with pytest.raises(LaunchConfigError):
            plan_slurm(SlurmOptions(topology=ROOT / "topologies/tiny.toml", logs=Path("l"), partition=bad))
    with pytest.raises(LaunchConfigError, match="--time"):
        plan_slurm(SlurmOptions(topology=ROOT / "topologies/tiny.toml", logs=Path("l"), time="1:00 x"))


def test_the_batch_script_runs_exactly_the_intended_words_under_bash(tmp_path: Path) -> None:
    """The script under a real bash, a stub srun recording its words: hostile values arrive
    intact, nothing is injected, every step's exit code is recorded."""
    logs, cwd, run = tmp_path / f"logs {HOSTILE}", tmp_path / f"cwd {HOSTILE}", tmp_path / f"run {HOSTILE}"
    for d in (logs, cwd, run):
        d.mkdir()
    python = f"/opt/{HOSTILE}/python"
    nodes = _nodes(_tiny(), python=python, topology=f"/t/{HOSTILE}.toml")
    (c,) = plan_components(nodes, partition=None, gpu_partition=None, max_nodes=None)
    job = Job(name="sft-tiny", components=(c,), steps=plan_steps(nodes, [c]), logs=logs, cwd=cwd, grace_s=1,
              node_args=("--resume", str(run)))  # fmt: skip
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "calls.jsonl"
    # The stub: one JSON line per call (its cwd and words); a device's step exits 130.
    stub = (
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"with open({str(record)!r}, 'a') as f: f.write(json.dumps([os.getcwd(), sys.argv[1:]]) + '\\n')\n"
        "sys.exit(130 if '--job-name=localhost-device' in sys.argv else 0)\n"
    )
    (bin_dir / "srun").write_text(stub)
    (bin_dir / "srun").chmod(0o755)
    script = tmp_path / "job.sh"
    script.write_text(batch_script(job))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n1"}
    proc = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=WAIT_S)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == proc.stderr == ""  # all output goes to the job's log
    calls = sorted((json.loads(line) for line in record.read_text().splitlines()), key=lambda c: c[1][5])
    tail = ["--rendezvous", f"{logs}/rendezvous-42", "--resume", str(run)]
    expected = sorted(
        (
            [str(cwd), [*srun_words(job, s)[1:], f"--output={logs}/{s.node.label}.log", "--",
                        *step_argv(s.node), *tail]]
            for s in job.steps
        ),
        key=lambda c: c[1][5],
    )  # fmt: skip
    assert calls == expected
    assert read_steps(logs / "steps-42.txt") == {
        "localhost-coordinator": 0, "localhost-server": 0, "localhost-device": 130,
    }  # fmt: skip
    assert "INJECTED" not in (logs / "job-42.out").read_text()
    assert not list(tmp_path.rglob("pwned*"))


def test_dry_run_prints_the_script_and_ssh_refuses_slurm_options(tmp_path: Path) -> None:
    tiny = str(ROOT / "topologies/tiny.toml")
    out = CliRunner().invoke(
        app, ["launch", tiny, "--backend", "slurm", "--dry-run", "--logs", str(tmp_path)]
    )
    assert out.exit_code == 0, out.output
    first, *script = out.stdout.splitlines()
    assert shlex.split(first, comments=True) == []  # a comment naming the sbatch command
    assert script[0] == "#!/bin/bash" and "--role coordinator" in "\n".join(script)
    assert subprocess.run(["bash", "-n"], input="\n".join(script), text=True).returncode == 0
    assert not list(tmp_path.iterdir())  # nothing written
    for args in (["--partition", "p"], ["--resume", "r"], ["--no-wait"]):
        assert CliRunner().invoke(app, ["launch", tiny, "--dry-run", *args]).exit_code == 2
    bad = ["launch", tiny, "--backend", "slurm", "--ship", "checkout", "--dry-run"]
    assert CliRunner().invoke(app, bad).exit_code == 2


def test_a_missing_secret_key_is_a_config_error_before_submitting(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    security = f'[run.security]\nmode = "curve"\nkeys = "{tmp_path / "keys"}"\n\n[run.train]'
    path.write_text((ROOT / "topologies/tiny.toml").read_text().replace("[run.train]", security, 1))
    generate_keys(load_topology(path, roles=()), tmp_path / "keys")
    (tmp_path / "keys" / "dev1.key_secret").chmod(0o644)
    out = CliRunner().invoke(app, ["launch", str(path), "--backend", "slurm", "--logs", str(tmp_path / "l")])
    assert out.exit_code == 2 and "readable by others" in out.stderr
    assert not (tmp_path / "l").exists()


def _end(role: str, code: int | None, status: str | None) -> NodeEnd:
    return NodeEnd(label=f"h-{role}", role=role, returncode=code, status=status)


@pytest.mark.parametrize(
    ("ends", "signals", "state", "started", "want"),
    [
        ([_end("coordinator", 0, "completed")], 0, "COMPLETED", True, ("completed", 0)),
        ([_end("coordinator", 130, "interrupted")], 0, "CANCELLED", True, ("interrupted", 130)),
        ([_end("coordinator", 130, "interrupted")], 0, "TIMEOUT", True, ("interrupted", 130)),
        ([_end("coordinator", 130, "interrupted")], 1, "COMPLETED", True, ("interrupted", 0)),
        ([_end("coordinator", 130, "interrupted")], 2, "CANCELLED", True, ("interrupted", 130)),
        ([_end("coordinator", None, None)], 0, "CANCELLED", True, ("failed", 1)),
        ([_end("coordinator", 2, "failed")], 0, "COMPLETED", True, ("failed", 2)),
        ([_end("coordinator", None, None)], 0, "CANCELLED", False, ("interrupted", 130)),
        ([_end("coordinator", None, None)], 1, "CANCELLED", False, ("interrupted", 0)),
        ([_end("coordinator", None, None)], 0, "FAILED", False, ("failed", 1)),
    ],
)
def test_how_a_job_ended(
    ends: list[NodeEnd], signals: int, state: str, started: bool, want: tuple[str, int]
) -> None:
    o = judge_job(ends, signals=signals, state=state, started=started)
    assert (o.status, o.exit_code) == want, o.reason


def test_a_log_is_read_as_it_grows_complete_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    log = NodeLog(path=path, role="coordinator")
    said: list[str] = []
    log.read(said.append)  # no file yet
    event = {"event": "round_done", "round": 1, "loss": 2.5, "timestamp": "2026-01-01T00:00:01.5Z"}
    path.write_text('{"event": "run_started", "run_dir": "runs/x", "devices": 2}\n' + json.dumps(event)[:20])
    log.read(said.append)
    assert said == ["[launch] run started: 2 devices, run_dir runs/x"]
    with path.open("a") as f:
        f.write(
            json.dumps(event)[20:]
            + '\nnot json\n{"ok": true, "status": "completed", "result": {"run_dir": "r"}}\n'
        )
    log.read(said.append)
    assert said[1] == "[launch] round 1 done: loss 2.5"
    assert log.line is not None and log.line["status"] == "completed" and log.run_dir == "r"
    assert log.first_round_at is not None and log.first_round_at.second == 1
    assert job_ended(["COMPLETED", "CANCELLED"]) and job_ended([]) and not job_ended(["COMPLETING"])


# --- real jobs on a one-node cluster -----------------------------------------------------


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _slurm_env(conf: Path) -> dict[str, str]:
    """This environment without any Slurm job's variables, pointed at the test cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    return env | {"SLURM_CONF": str(conf), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Cluster:
    conf: Path

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, env=_slurm_env(self.conf), capture_output=True, text=True, timeout=WAIT_S)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A one-node Slurm cluster, all its state in a temporary directory; stopped at the end."""
    missing = [p for p in ("slurmctld", "slurmd", "munged", "sbatch", "srun") if shutil.which(p) is None]
    missing += [p for p in ("/usr/sbin/slurmctld",) if not Path(p).exists() and "slurmctld" not in missing]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} missing: as root run apt-get install slurm-wlm munge (bin/_setup.sh does)"
        )
    if os.geteuid() != 0:
        pytest.skip("a local Slurm cluster needs root (slurmd starts jobs as their users)")
    # Not under pytest's base directory: munged runs as the munge user, who must enter it.
    d = Path(tempfile.mkdtemp(prefix="sft-slurm-"))
    ctld, slurmd = _free_ports(2)
    env = os.environ | {
        "SFT_SLURM_DIR": str(d),
        "SFT_SLURM_CTLD_PORT": str(ctld),
        "SFT_SLURM_SLURMD_PORT": str(slurmd),
    }
    try:
        up = subprocess.run([str(CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=WAIT_S)
        assert up.returncode == 0, f"{up.stderr}\n{_tail(d / 'log')}"
        assert up.stdout.strip() == f"export SLURM_CONF={d / 'slurm.conf'}"
        yield Cluster(conf=d / "slurm.conf")
    finally:
        down = subprocess.run([str(CLUSTER), "stop"], env=env, capture_output=True, text=True, timeout=WAIT_S)
        assert down.returncode == 0, down.stderr
        assert subprocess.run([str(CLUSTER), "status"], env=env, capture_output=True).returncode != 0
        shutil.rmtree(d)


def _tail(log_dir: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted(log_dir.glob("*")) if p.is_file())


class Lines:
    """A stream's lines as a thread reads them; :meth:`wait_for` blocks (bounded) on one."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def wait_for(self, pattern: str, timeout_s: float = WAIT_S) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            return next((m for m in map(re.compile(pattern).search, self.lines) if m), None)

        with self._changed:
            match = self._changed.wait_for(found, timeout_s)
        if match is None:
            pytest.fail(f"no line matching {pattern!r} within {timeout_s}s; got:\n{self.text()}")
        return match

    def join(self) -> None:
        self._thread.join(WAIT_S)

    def text(self) -> str:
        with self._changed:
            return "".join(self.lines)


class Launch:
    """``sft launch --backend slurm`` as a process, its progress lines read as they come."""

    def __init__(self, cluster: Cluster, cwd: Path, topology: Path, logs: str, *extra: str) -> None:
        self.logs = cwd / logs
        cmd = [sys.executable, "-m", "sft_actors.cli.main", "launch", topology.name, "--backend", "slurm"]
        cmd += ["--logs", logs, "--threads", "1", *extra]
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=_slurm_env(cluster.conf), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert self.proc.stderr is not None
        self.progress = Lines(self.proc.stderr)

    def job_id(self) -> str:
        return self.progress.wait_for(r"submitted job (\d+)").group(1)

    def finish(self) -> tuple[int, dict[str, Any]]:
        """The launcher's exit code and its JSON line."""
        try:
            code = self.proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launch did not end within {WAIT_S}s:\n{self.progress.text()}")
        self.progress.join()
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        assert out.count("\n") == 1, f"stdout: {out!r}\nstderr:\n{self.progress.text()}"
        return code, json.loads(out)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def launcher(cluster: Cluster, tmp_path: Path) -> Iterator[Callable[..., Launch]]:
    made: list[Launch] = []

    def make(topology: Path, logs: str, *extra: str) -> Launch:
        made.append(Launch(cluster, tmp_path, topology, logs, *extra))
        return made[-1]

    yield make
    for launched in made:
        launched.close()
        submitted = re.search(r"submitted job (\d+)", launched.progress.text())
        if submitted:  # a failed test's job must not hold the cluster for the next one
            cluster.run("scancel", submitted.group(1))


def _topology(tmp_path: Path, *, rounds: int, steps: int = 2, auto: bool = False) -> Path:
    """tiny.toml with free ports and its run directory under ``tmp_path``, ``steps`` per round;
    with ``auto``, the coordinator and server on host ``edge`` and the devices on ``board``, both
    ``address = "auto"``, CURVE keys in ``tmp_path/keys``."""
    text = (ROOT / "topologies" / "tiny.toml").read_text().replace("rounds = 2\n", f"rounds = {rounds}\n", 1)
    text = text.replace("steps_per_round = 2\n", f"steps_per_round = {steps}\n", 1)
    ports = dict(zip(("47310", "47311"), map(str, _free_ports(2)), strict=True))
    text = re.sub(r"port = (4731[01])\b", lambda m: f"port = {ports[m.group(1)]}", text)
    text = text.replace('dir = "runs/tiny"', f'dir = "{tmp_path / "runs"}"')
    if auto:
        for role, host in (("coordinator", "edge"), ("server", "edge"), ("device", "board")):
            text = text.replace(f'role = "{role}"\n', f'role = "{role}"\nhost = "{host}"\n')
        text = text.replace(
            "[run.output]", f'[run.security]\nmode = "curve"\nkeys = "{tmp_path / "keys"}"\n\n[run.output]'
        )
        text += (
            '\n[[hosts]]\nname = "edge"\naddress = "auto"\n\n[[hosts]]\nname = "board"\naddress = "auto"\n'
        )
    path = tmp_path / ("auto.toml" if auto else "tiny.toml")
    path.write_text(text)
    if auto:
        generate_keys(load_topology(path, roles=()), tmp_path / "keys")
    return path


def _after_a_checkpoint(launched: Launch) -> None:
    """Return once the coordinator has written a checkpoint after round 1 (its log is a file
    the nodes write, with no event to wait on: read, bounded, as it grows), so that the stop
    has a checkpoint to leave and the resumed job a round to continue from."""
    log = launched.logs / "localhost-coordinator.log"
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            for raw in log.read_text().split("\n")[:-1]:  # complete lines only
                if '"checkpoint_written"' in raw and json.loads(raw).get("round", 0) >= 1:
                    return
        if launched.proc.poll() is not None:
            break
        time.sleep(0.05)
    pytest.fail(f"no checkpoint after round 1 in {log} within {WAIT_S}s:\n{launched.progress.text()}")


def _summary(line: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads((Path(line["results"]) / "summary.json").read_text())
    return summary


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_slurm_launch_completes_with_the_run_and_logs_in_place(
    tmp_path: Path, launcher: Callable[..., Launch]
) -> None:
    launched = launcher(_topology(tmp_path, rounds=2), "logs")
    code, line = launched.finish()
    assert (code, line["status"], line["job_state"]) == (0, "completed", "COMPLETED"), (
        launched.progress.text()
    )
    labels = ["localhost-coordinator", "localhost-server", "localhost-device"]
    assert line["nodes"] == dict.fromkeys(labels, 0)
    for label in labels:
        assert (launched.logs / f"{label}.log").stat().st_size > 0
    assert (launched.logs / "job.sh").is_file() and (launched.logs / f"job-{line['job_id']}.out").is_file()
    assert Path(line["results"]).parent == tmp_path / "runs"
    assert _summary(line)["status"] == "completed"
    assert line["first_round_s"] > 0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_scancel_interrupts_with_a_checkpoint_and_a_resumed_job_completes(
    tmp_path: Path, cluster: Cluster, launcher: Callable[..., Launch]
) -> None:
    rounds = 12
    topology = _topology(tmp_path, rounds=rounds, steps=6)
    first = launcher(topology, "logs-1")
    job = first.job_id()
    _after_a_checkpoint(first)
    cancelled = cluster.run("scancel", job)
    assert cancelled.returncode == 0, cancelled.stderr
    code, line = first.finish()
    assert (code, line["status"], line["job_state"]) == (130, "interrupted", "CANCELLED"), (
        first.progress.text()
    )
    # The coordinator stopped on Slurm's SIGTERM; the others left on its SHUTDOWN (exit 0), or
    # on their own polite stop (130), never killed.
    assert line["nodes"]["localhost-coordinator"] == 130 and set(line["nodes"].values()) <= {0, 130}, line
    summary = _summary(line)
    assert summary["status"] == "interrupted" and len(summary["rounds"]) < rounds
    checkpoint = summary["checkpoint"]
    assert checkpoint["round"] >= 1 and Path(checkpoint["path"], "checkpoint.json").is_file()

    again = launcher(topology, "logs-2", "--resume", line["results"])
    code, done = again.finish()
    assert (code, done["status"], done["results"]) == (0, "completed", line["results"]), again.progress.text()
    finished = _summary(done)
    assert finished["resumed_from"] == checkpoint["round"]
    assert [r["round"] for r in finished["rounds"]][-1] == rounds


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_auto_hosts_find_each_other_through_the_rendezvous_with_curve(
    tmp_path: Path, launcher: Callable[..., Launch]
) -> None:
    launched = launcher(_topology(tmp_path, rounds=2, auto=True), "logs", "--nodes", "1")
    code, line = launched.finish()
    assert (code, line["status"]) == (0, "completed"), launched.progress.text()
    assert line["nodes"] == {"edge-coordinator": 0, "edge-server": 0, "board-device": 0}
    published = launched.logs / f"rendezvous-{line['job_id']}"
    assert sorted(p.name for p in published.iterdir()) == ["board.address", "edge.address"]
    # what this machine advertises: its FQDN, or its outward address when that name is loopback
    assert (published / "edge.address").read_text().strip() == advertised_address()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_one_ctrl_c_to_the_launcher_stops_the_job_politely(
    tmp_path: Path, launcher: Callable[..., Launch]
) -> None:
    launched = launcher(_topology(tmp_path, rounds=10_000, steps=6), "logs")
    _after_a_checkpoint(launched)
    launched.proc.send_signal(signal.SIGINT)
    code, line = launched.finish()
    assert (code, line["status"]) == (0, "interrupted"), launched.progress.text()
    assert line["nodes"]["localhost-coordinator"] == 130 and set(line["nodes"].values()) <= {0, 130}, line
    assert "stopping job" in launched.progress.text()
    assert _summary(line)["status"] == "interrupted"


def test_a_logs_directory_holding_another_launch_is_refused(tmp_path: Path) -> None:
    """The launch is judged from its nodes' logs: old ones would pass for this job's."""
    from sft_actors.launch.slurm import _fresh_logs

    plan = plan_slurm(SlurmOptions(topology=ROOT / "topologies/tiny.toml", logs=tmp_path / "l"))
    _fresh_logs(plan)  # a new directory is fine
    (tmp_path / "l").mkdir()
    plan.log_path(plan.job.steps[0].node.label).write_text('{"event": "run_ended"}\n')
    with pytest.raises(LaunchConfigError, match="already holds the logs of a launch"):
        _fresh_logs(plan)
