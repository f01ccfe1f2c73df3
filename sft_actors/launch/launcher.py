"""One launch, start to end: load, ship, start, watch, stop, collect, judge.

:func:`plan_launch` is everything decided before a byte moves (``--dry-run`` prints it);
:func:`launch` carries it out. Progress goes to the ``echo`` callback, one line per step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import sft_actors
from sft_actors.launch import remote, transfer
from sft_actors.launch.nodes import Running, Supervisor, node_command
from sft_actors.launch.outcome import LaunchOutcome, NodeEnd, judge, lost
from sft_actors.launch.placement import DEFAULT_REMOTE_PYTHON, NodeSpec, placement, topology_destination
from sft_actors.launch.procs import Interrupted, LaunchConfigError, LaunchError, Signals, run_command
from sft_actors.launch.shipping import Shipment, local_dir, plan_shipments, shippable
from sft_actors.topology import Topology, load_topology

Ship = Literal["none", "checkout"]
Echo = Callable[[str], None]
#: Past the nodes' own ``drain_timeout_s``: what a polite stop may take over ssh (seconds).
STOP_MARGIN_S = 10.0
GIT_TIMEOUT_S = 60.0
#: One signal before any node started: nothing to stop, nothing ran.
_NOTHING_STARTED = LaunchOutcome(status="interrupted", reason="stopped before any node started", exit_code=0)


@dataclass(frozen=True, kw_only=True, slots=True)
class LaunchOptions:
    topology: Path
    logs: Path
    ship: Ship = "none"
    #: The nodes' interpreter (relative paths from the workdir); None: ``.venv/bin/python``
    #: on ssh hosts, this launcher's interpreter on local ones.
    python: str | None = None
    collect: bool = True
    #: ``ssh -F FILE``: host aliases, ports, identities.
    ssh_config: str | None = None
    #: ``--threads`` for every node (torch intra-op threads); None: torch's default.
    threads: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class LaunchPlan:
    topo: Topology
    options: LaunchOptions
    cwd: Path
    checkout: Path
    code: tuple[str, ...]
    shipments: tuple[Shipment, ...]
    nodes: tuple[NodeSpec, ...]
    ssh: remote.Ssh

    @property
    def grace_s(self) -> float:
        return self.topo.run.runtime.drain_timeout_s + STOP_MARGIN_S

    @property
    def coordinator(self) -> NodeSpec:
        return next(n for n in self.nodes if n.role == "coordinator")


@dataclass(frozen=True, kw_only=True, slots=True)
class LaunchReport:
    outcome: LaunchOutcome
    logs: Path
    results: Path | None = None
    nodes: dict[str, int | None] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)

    def line(self) -> dict[str, Any]:
        """The one JSON line ``sft launch`` prints."""
        o = self.outcome
        return {
            "ok": o.ok,
            "status": o.status,
            "reason": o.reason,
            "exit_code": o.exit_code,
            "logs": str(self.logs),
            "results": None if self.results is None else str(self.results),
            "nodes": self.nodes,
            "lost": self.lost,
        }


def checkout_root() -> Path:
    """The checkout this launcher runs from (the one ``--ship checkout`` copies)."""
    return Path(sft_actors.__file__).resolve().parent.parent


def decide(options: LaunchOptions) -> LaunchPlan:
    """Load the topology (:class:`~sft_actors.errors.TopologyError` when it is bad) and decide
    every copy and command, in the current directory; the checkout's file list is left to
    :func:`plan_launch`. Model files are checked where the nodes run, not here."""
    cwd = Path.cwd().resolve()
    topo = load_topology(options.topology, roles=(), log_warnings=False, model_config=lambda _spec: None)
    topology_path = (cwd / options.topology).resolve()
    dest = topology_destination(str(topology_path), str(cwd))
    checkout = checkout_root()
    shipments = plan_shipments(
        topo,
        topology_path=topology_path,
        topology_dest=dest,
        ship_code=options.ship == "checkout",
        checkout=checkout,
        cwd=cwd,
    )
    nodes = placement(
        topo,
        topology=dest,
        remote_python=options.python or DEFAULT_REMOTE_PYTHON,
        local_python=options.python or sys.executable,
        threads=options.threads,
    )
    return LaunchPlan(
        topo=topo,
        options=options,
        cwd=cwd,
        checkout=checkout,
        code=(),
        shipments=tuple(shipments),
        nodes=tuple(nodes),
        ssh=remote.Ssh(config=options.ssh_config),
    )


async def plan_launch(options: LaunchOptions, *, signals: Signals) -> LaunchPlan:
    """:func:`decide`, with the checkout's files when a destination takes them."""
    plan = decide(options)
    if any(s.code for s in plan.shipments):
        code = await tracked_files(plan.checkout, plan.topo, signals=signals)
        plan = dataclasses.replace(plan, code=tuple(code))
    return plan


def git_argv(checkout: Path) -> list[str]:
    return ["git", "-C", str(checkout), "ls-files", "-z"]


async def tracked_files(checkout: Path, topo: Topology, *, signals: Signals) -> list[str]:
    """The checkout's tracked files that exist and are worth shipping (see ``shippable``)."""
    done = await run_command(git_argv(checkout), signals=signals, timeout_s=GIT_TIMEOUT_S)
    if done.returncode != 0:
        raise LaunchConfigError(f"--ship checkout needs a git checkout at {checkout}: {done.why()}")
    names = [n for n in done.stdout.decode().split("\0") if n]
    skip = (topo.run.security.keys, topo.run.output.dir)
    return [n for n in shippable(names, also_excluded=skip) if _is_file(checkout / n)]


def _is_file(path: Path) -> bool:
    return path.is_symlink() or path.is_file()


def describe(plan: LaunchPlan) -> list[str]:
    """What a launch would do, one command a line (``--dry-run``)."""
    lines = [f"# topology {plan.topo.source}: {len(plan.nodes)} node(s), logs in {plan.options.logs}"]
    if plan.code:
        lines.append(shlex.join(git_argv(plan.checkout)))
    for s in plan.shipments:
        lines.append(f"# ship to {s.where} (hosts {', '.join(s.hosts)})")
        if s.local:
            lines += [f"# local copy: {what}" for what in _local_copies(s)]
        else:
            lines += [t.describe() for t in transfer.transfers(s, plan.ssh, plan.checkout, plan.code)]
    lines.append("# start, in this order")
    for node in plan.nodes:
        argv, cwd = node_command(node, plan.ssh, plan.cwd)
        where = f"cwd {cwd}, " if cwd is not None else ""
        lines.append(f"{shlex.join(argv)}  # {where}output to {plan.options.logs / (node.label + '.log')}")
    if plan.options.collect:
        run_dir = str(PurePosixPath(plan.topo.run.output.dir) / "RUN")
        host = plan.coordinator.host
        lines.append(f"# collect (RUN: the run directory the coordinator names) into {_results(plan)}/RUN")
        if host.ssh:
            lines.append(shlex.join(transfer.collect_argv(plan.ssh, host.ssh, host.workdir, run_dir)))
        else:
            lines.append(f"# local copy: {local_dir(host.workdir, plan.cwd) / run_dir}")
    return lines


def _local_copies(s: Shipment) -> list[str]:
    out = ["tracked files of the checkout"] if s.code else []
    if s.topology is not None:
        out.append(f"{s.topology.source} as {s.topology.dest}")
    out += [f"{k.source} into {s.key_dir} (mode {k.mode:o})" for k in s.keys]
    return out or ["nothing (the files are already there)"]


def _results(plan: LaunchPlan) -> Path:
    return plan.options.logs / "results"


async def launch(options: LaunchOptions, *, echo: Echo) -> LaunchReport:
    """Ship, start, watch, stop and collect (see the package doc). A bad topology raises
    :class:`~sft_actors.errors.TopologyError` and a bad request :class:`LaunchConfigError`,
    before anything is copied or started; everything after is in the report."""
    signals = Signals()
    signals.install()
    try:
        try:
            plan = await plan_launch(options, signals=signals)
        except Interrupted:
            return LaunchReport(outcome=_NOTHING_STARTED, logs=options.logs)
        options.logs.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        report = await _carry_out(plan, signals=signals, echo=echo)
        o = report.outcome
        echo(f"[launch] {o.status} in {time.monotonic() - started:.0f}s: {o.reason}; logs in {report.logs}")
        return report
    finally:
        signals.remove()


async def _carry_out(plan: LaunchPlan, *, signals: Signals, echo: Echo) -> LaunchReport:
    logs = plan.options.logs
    try:
        await _ship(plan, signals=signals, echo=echo)
    except Interrupted:
        return LaunchReport(outcome=_NOTHING_STARTED, logs=logs)
    except LaunchError as exc:
        outcome = judge([], signals=0, error=str(exc))
        return LaunchReport(outcome=outcome, logs=logs)
    supervisor = Supervisor(
        ssh=plan.ssh, logs=logs, cwd=plan.cwd, signals=signals, echo=echo, grace_s=plan.grace_s
    )
    error = None
    try:
        running = await supervisor.run(plan.nodes)
    except LaunchError as exc:
        error, running = str(exc), supervisor.running
    ends = [_end(r) for r in running]
    outcome = judge(ends, signals=signals.count, overdue=supervisor.overdue, error=error)
    results = None
    if plan.options.collect and signals.count < 2:
        results = await _collect(plan, running, signals=signals, echo=echo)
    return LaunchReport(
        outcome=outcome,
        logs=logs,
        results=results,
        nodes={e.label: e.returncode for e in ends},
        lost=lost(ends),
    )


def _end(r: Running) -> NodeEnd:
    status = None if r.line is None else r.line.get("status")
    return NodeEnd(
        label=r.node.label,
        role=r.node.role,
        returncode=r.proc.returncode,
        status=status if isinstance(status, str) else None,
    )


async def _ship(plan: LaunchPlan, *, signals: Signals, echo: Echo) -> None:
    for s in plan.shipments:
        if signals.count:
            raise Interrupted
        if s.local:
            try:
                done = transfer.copy_local(s, checkout=plan.checkout, code=plan.code, cwd=plan.cwd)
            except OSError as exc:
                raise LaunchError(f"copying to {s.where} failed: {exc}") from None
            for line in done:
                echo(f"[launch] {line}")
            continue
        for t in transfer.transfers(s, plan.ssh, plan.checkout, plan.code):
            echo(f"[launch] shipping to {s.where}: {t.what}")
            await transfer.send(t, signals=signals)


async def _collect(plan: LaunchPlan, running: list[Running], *, signals: Signals, echo: Echo) -> Path | None:
    """Copy the run directory from the coordinator's host into ``LOGS/results/<run>``."""
    coordinator = next((r for r in running if r.node.role == "coordinator"), None)
    if coordinator is None or coordinator.run_dir is None:
        echo("[launch] nothing to collect: the coordinator named no run directory")
        return None
    host = coordinator.node.host
    dest = _results(plan) / PurePosixPath(coordinator.run_dir).name
    try:
        if host.ssh:
            argv = transfer.collect_argv(plan.ssh, host.ssh, host.workdir, coordinator.run_dir)
            count = await transfer.collect_remote(argv, dest, signals=signals)
        else:
            count = transfer.collect_local(local_dir(host.workdir, plan.cwd) / coordinator.run_dir, dest)
    except Interrupted:
        echo("[launch] collecting stopped by a signal")
        return None
    except (LaunchError, OSError) as exc:
        echo(f"[launch] could not collect {coordinator.run_dir} from {host.name}: {exc}")
        return None
    echo(f"[launch] collected {count} file(s) of {coordinator.run_dir} from {host.name} into {dest}")
    return dest


def run_launch(options: LaunchOptions, *, echo: Echo) -> LaunchReport:
    """:func:`launch` in a fresh event loop (what the CLI calls)."""
    return asyncio.run(launch(options, echo=echo))


def dry_run(options: LaunchOptions) -> list[str]:
    """:func:`describe` of the plan for ``options``; nothing is copied or started."""

    async def plan() -> LaunchPlan:
        return await plan_launch(options, signals=Signals())

    return describe(asyncio.run(plan()))


__all__ = [
    "LaunchOptions",
    "LaunchPlan",
    "LaunchReport",
    "checkout_root",
    "decide",
    "describe",
    "dry_run",
    "launch",
    "plan_launch",
    "run_launch",
    "tracked_files",
]
