"""``sft launch --backend slurm``: the whole run as one Slurm job.

:func:`plan_slurm` decides everything (the components, one ``srun`` step per node, the batch
script: see :mod:`.slurm_script`); :func:`launch_slurm` writes the script into ``LOGS``,
submits it with ``sbatch --parsable`` and, unless told not to wait, follows the job until it
has ended: the coordinator's events as progress lines, ``squeue`` for the job's state. Then
it judges the launch from the nodes' logs (:mod:`.slurm_watch`).

Nothing is copied: on a cluster the working directory, the checkout, the topology, the key
directory and ``LOGS`` are on storage every node sees, and every node runs in the directory
the launch was made from. Keys stay where they are (only their owner reads the secrets).

Stopping: the launcher's first Ctrl-C/SIGTERM asks the coordinator to stop politely (through
the batch script: its node gets SIGINT, writes a checkpoint and sends the others SHUTDOWN); a
second sends every node SIGINT (forced); a third cancels the job. A job still pending is simply
cancelled. ``scancel JOBID`` from anywhere is a polite stop too (only the coordinator's node acts
on Slurm's SIGTERM: see :mod:`.slurm_script`): ``interrupted``, exit 130, a checkpoint; a new
launch with ``--resume RUN_DIR`` continues the run.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sft_actors.launch import slurm_script as sj
from sft_actors.launch.launcher import STOP_MARGIN_S, Echo, LaunchReport
from sft_actors.launch.outcome import LaunchOutcome, lost
from sft_actors.launch.placement import placement
from sft_actors.launch.procs import (
    Completed,
    Interrupted,
    LaunchConfigError,
    LaunchError,
    Signals,
    run_command,
)
from sft_actors.launch.slurm_watch import (
    GONE,
    NodeLog,
    job_ended,
    job_state,
    judge_job,
    node_ends,
    read_steps,
)
from sft_actors.topology import Topology, load_topology

#: Seconds between two looks at the job (``squeue``) and at the coordinator's log.
POLL_S = 0.5
#: How long ``squeue`` may keep failing (slurmctld restarting) before the launch gives up.
LOST_AFTER_S = 120.0
COMMAND_TIMEOUT_S = 60.0


@dataclass(frozen=True, kw_only=True, slots=True)
class SlurmOptions:
    topology: Path
    logs: Path
    partition: str | None = None
    #: With it, a heterogeneous job: coordinator/server hosts here, one GPU per node.
    gpu_partition: str | None = None
    #: ``--time`` of the job (Slurm's formats: ``MM``, ``HH:MM:SS``, ``D-HH``, …).
    time: str | None = None
    #: At most this many Slurm nodes per component (hosts share nodes when fewer than hosts).
    nodes: int | None = None
    #: CPUs per Slurm node (default: one per actor there, capped by the partition's smallest node).
    cpus_per_node: int | None = None
    resume: Path | None = None
    wait: bool = True
    python: str | None = None
    threads: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class SlurmPlan:
    topo: Topology
    options: SlurmOptions
    job: sj.Job

    @property
    def script_path(self) -> Path:
        return self.job.logs / "job.sh"

    def log_path(self, label: str) -> Path:
        return self.job.logs / f"{label}.log"


def plan_slurm(options: SlurmOptions, *, cpus: dict[str | None, int] | None = None) -> SlurmPlan:
    """Load the topology and decide the job (nothing runs). ``cpus``: the partitions' smallest
    node CPU counts (:func:`~sft_actors.launch.slurm_script.parse_sinfo`), when known.
    Raises :class:`~sft_actors.errors.TopologyError`, :class:`LaunchConfigError`, or
    :class:`~sft_actors.errors.KeyFileError` for a missing or unprotected key file."""
    cwd = Path.cwd().resolve()
    topo = load_topology(options.topology, roles=(), log_warnings=False, model_config=lambda _spec: None)
    python = options.python or sys.executable
    nodes = placement(
        topo,
        topology=str((cwd / options.topology).resolve()),
        remote_python=python,
        local_python=python,
        threads=options.threads,
    )
    if topo.run.security.mode == "curve":
        from sft_actors.security.keys import load_keyring  # zmq: only when there are keys to check

        load_keyring(topo, [a.name for a in topo.actors], cwd / topo.run.security.keys)
    node_args: tuple[str, ...] = ()
    if options.resume is not None:
        resume = (cwd / options.resume).resolve()
        if not resume.is_dir():
            raise LaunchConfigError(f"--resume {options.resume}: no such run directory")
        node_args = ("--resume", str(resume))
    if options.nodes is not None and options.nodes < 1:
        raise LaunchConfigError(f"--nodes {options.nodes}: give at least 1")
    components = sj.plan_components(
        nodes,
        partition=options.partition,
        gpu_partition=options.gpu_partition,
        max_nodes=options.nodes,
        cpus=cpus,
        cpus_per_node=options.cpus_per_node,
    )
    job = sj.Job(
        name=sj.job_name(topo.run.name),
        components=components,
        steps=sj.plan_steps(nodes, components),
        logs=(cwd / options.logs).resolve(),
        cwd=cwd,
        grace_s=topo.run.runtime.drain_timeout_s + STOP_MARGIN_S,
        time=options.time,
        node_args=node_args,
    )
    sj.batch_script(job)  # refuses values sbatch could not read
    return SlurmPlan(topo=topo, options=options, job=job)


def describe_slurm(plan: SlurmPlan) -> list[str]:
    """``--dry-run``: the submit command, then the batch script."""
    lines = [f"# {' '.join(sj.sbatch_argv(plan.script_path))}  (the script below, written to that path)"]
    return lines + sj.batch_script(plan.job).splitlines()


async def partition_cpus(signals: Signals) -> dict[str | None, int]:
    """``sinfo``'s smallest node per partition; empty when sinfo cannot say."""
    try:
        done = await run_command(sj.sinfo_argv(), signals=signals, timeout_s=COMMAND_TIMEOUT_S)
    except LaunchError:
        return {}
    return sj.parse_sinfo(done.stdout.decode(errors="replace")) if done.returncode == 0 else {}


@dataclass
class _Watch:
    plan: SlurmPlan
    job_id: str
    logs: dict[str, NodeLog]
    submitted: datetime
    state: str | None = None


async def launch_slurm(options: SlurmOptions, *, echo: Echo) -> SlurmReport:
    """Plan, write the script, submit, follow the job to its end (see the module doc)."""
    signals = Signals()
    signals.install()
    try:
        try:
            plan = plan_slurm(options, cpus=await partition_cpus(signals))
        except Interrupted:
            return SlurmReport(outcome=_nothing("stopped before the job was submitted"), logs=options.logs)
        logs = plan.job.logs
        _fresh_logs(plan)
        logs.mkdir(parents=True, exist_ok=True)
        plan.script_path.write_text(sj.batch_script(plan.job), encoding="utf-8")
        submitted = datetime.now(UTC)
        try:
            done = await run_command(
                sj.sbatch_argv(plan.script_path), signals=signals, timeout_s=COMMAND_TIMEOUT_S
            )
        except Interrupted:
            return SlurmReport(outcome=_nothing("stopped before the job was submitted"), logs=logs)
        if done.returncode != 0:
            raise LaunchConfigError(f"sbatch refused {plan.script_path}: {done.why()}")
        job_id = done.stdout.decode().strip().split(";")[0]
        echo(f"[launch] submitted job {job_id}: {plan.script_path}; logs in {logs}")
        watch = _Watch(
            plan=plan,
            job_id=job_id,
            logs={
                s.node.label: NodeLog(path=plan.log_path(s.node.label), role=s.node.role)
                for s in plan.job.steps
            },
            submitted=submitted,
        )
        if not options.wait:
            outcome = LaunchOutcome(status="submitted", reason=f"job {job_id} submitted", exit_code=0)
            return SlurmReport(outcome=outcome, logs=logs, job_id=job_id, submitted_at=submitted)
        started = time.monotonic()
        error = await _follow(watch, signals=signals, echo=echo)
        report = _report(watch, signals=signals.count, error=error)
        o = report.outcome
        echo(f"[launch] {o.status} in {time.monotonic() - started:.0f}s: {o.reason}; logs in {logs}")
        return report
    finally:
        signals.remove()


async def _follow(w: _Watch, *, signals: Signals, echo: Echo) -> str | None:
    """Until the job has ended; stop it on the launcher's signals. An error in words, or None."""
    coordinator = next(log for log in w.logs.values() if log.role == "coordinator")
    handled, failing_since = 0, None
    while True:
        coordinator.read(echo)
        if signals.count > handled:
            handled = signals.count
            await _stop(w, handled, echo=echo)
        done: Completed | None = None
        try:
            done = await run_command(sj.squeue_argv(w.job_id), signals=signals, timeout_s=COMMAND_TIMEOUT_S)
            why = done.why()
        except Interrupted:
            continue
        except LaunchError as exc:
            why = str(exc)
        if done is not None and (done.returncode == 0 or GONE in done.stderr.decode(errors="replace")):
            failing_since = None
            states = done.stdout.decode().split() if done.returncode == 0 else []
            state = job_state(states) or w.state
            if state != w.state:
                echo(f"[launch] job {w.job_id}: {state}")
                w.state = state
            if job_ended(states):
                coordinator.read(echo)
                return None
        else:
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since > LOST_AFTER_S:
                return f"lost track of job {w.job_id} (squeue: {why}); it may still run: squeue -j {w.job_id}"
        changed = asyncio.ensure_future(signals.wait_beyond(handled))
        try:
            await asyncio.wait({changed}, timeout=POLL_S)
        finally:
            changed.cancel()


async def _stop(w: _Watch, count: int, *, echo: Echo) -> None:
    """The launcher's signals: the first asks the coordinator to stop (the batch script sends
    its node SIGINT; the others leave on its SHUTDOWN), the second sends every node SIGINT
    (the coordinator's forced stop), a third cancels the job. A pending job is cancelled."""
    if w.state == "PENDING" or count >= 3:
        echo(f"[launch] cancelling job {w.job_id}")
        argv = sj.scancel_argv(w.job_id)
    elif count == 1:
        echo(f"[launch] stopping job {w.job_id} politely: SIGINT to the coordinator (Ctrl-C again to force)")
        argv = sj.scancel_argv(w.job_id, "USR1", batch=True)
    else:
        echo(f"[launch] forcing job {w.job_id}: SIGINT to every node (Ctrl-C again to cancel the job)")
        argv = sj.scancel_argv(w.job_id, "INT")
    try:
        done = await run_command(argv, signals=Signals(), timeout_s=COMMAND_TIMEOUT_S)
    except LaunchError as exc:
        echo(f"[launch] {exc}")
        return
    if done.returncode != 0:
        echo(f"[launch] scancel: {done.why()}")


def _report(w: _Watch, *, signals: int, error: str | None) -> SlurmReport:
    steps = read_steps(w.plan.job.logs / f"steps-{w.job_id}.txt")
    for log in w.logs.values():
        log.read()
    ends = node_ends(w.logs.items(), steps)
    started = bool(steps) or any(log.path.exists() for log in w.logs.values())
    if error is not None:
        outcome = LaunchOutcome(status="failed", reason=error, exit_code=1)
    else:
        outcome = judge_job(ends, signals=signals, state=w.state, started=started)
    coordinator = next(log for log in w.logs.values() if log.role == "coordinator")
    results = None
    if coordinator.run_dir is not None:
        results = (w.plan.job.cwd / coordinator.run_dir).resolve()
    first_round_s = None
    if coordinator.first_round_at is not None:
        first_round_s = (coordinator.first_round_at - w.submitted).total_seconds()
    return SlurmReport(
        outcome=outcome,
        logs=w.plan.job.logs,
        results=results,
        nodes={e.label: e.returncode for e in ends},
        lost=lost(ends),
        job_id=w.job_id,
        job_state=w.state,
        submitted_at=w.submitted,
        first_round_s=first_round_s,
    )


def _nothing(reason: str) -> LaunchOutcome:
    return LaunchOutcome(status="interrupted", reason=reason, exit_code=0)


@dataclass(frozen=True, kw_only=True, slots=True)
class SlurmReport:
    """:class:`~sft_actors.launch.launcher.LaunchReport`'s line, and the job's."""

    outcome: LaunchOutcome
    logs: Path
    results: Path | None = None
    nodes: dict[str, int | None] | None = None
    lost: list[str] | None = None
    job_id: str | None = None
    job_state: str | None = None
    submitted_at: datetime | None = None
    #: From submission to the coordinator's first ``round_done`` (its clock), seconds.
    first_round_s: float | None = None

    def line(self) -> dict[str, Any]:
        base = LaunchReport(
            outcome=self.outcome,
            logs=self.logs,
            results=self.results,
            nodes=self.nodes or {},
            lost=self.lost or [],
        ).line()
        return base | {
            "backend": "slurm",
            "job_id": self.job_id,
            "job_state": self.job_state,
            "submitted_at": None if self.submitted_at is None else self.submitted_at.isoformat(),
            "first_round_s": None if self.first_round_s is None else round(self.first_round_s, 3),
        }


def _fresh_logs(plan: SlurmPlan) -> None:
    """The launch is judged from its nodes' logs: another launch's logs in the same directory
    would be read as this one's (:class:`LaunchConfigError`: pick a new ``--logs``)."""
    old = [plan.log_path(s.node.label) for s in plan.job.steps if plan.log_path(s.node.label).exists()]
    if old:
        raise LaunchConfigError(
            f"{plan.job.logs} already holds the logs of a launch ({old[0].name}); give a new --logs "
            "directory (the default is a fresh runs/launch-<time>)"
        )


def run_slurm_launch(options: SlurmOptions, *, echo: Echo) -> SlurmReport:
    """:func:`launch_slurm` in a fresh event loop (what the CLI calls)."""
    return asyncio.run(launch_slurm(options, echo=echo))


def dry_run_slurm(options: SlurmOptions) -> list[str]:
    """:func:`describe_slurm` (partition sizes unknown: the CPU counts are not capped)."""
    return describe_slurm(plan_slurm(options))


__all__ = [
    "SlurmOptions",
    "SlurmPlan",
    "SlurmReport",
    "describe_slurm",
    "dry_run_slurm",
    "launch_slurm",
    "plan_slurm",
    "run_slurm_launch",
]
