"""The Slurm job of a launch: its components, its batch script, the commands that submit,
watch and stop it. Pure: nothing here runs a command.

One job per launch. Its nodes are those of :func:`~sft_actors.launch.placement.placement` —
one ``sft-node`` per (host, role) — each started as one ``srun`` step in the background, its
output in ``LOGS/<host>-<role>.log``. A topology host is placed on a Slurm node of the job: the
hosts of a component are spread over its nodes in order (host ``i`` on node ``i mod nodes``),
so several hosts may share a node when ``--nodes`` asks for fewer nodes than hosts. Every node
gets ``--host H`` and ``--rendezvous LOGS/rendezvous-$SLURM_JOB_ID``: hosts with
``address = "auto"`` publish and find each other there (``LOGS`` must be on storage every node
sees, as the working directory must).

Components: one, or with a GPU partition a heterogeneous job of two — the hosts running the
coordinator or a server on the GPU partition with one GPU per node (``--gres=gpu:1``), the
device-only hosts on the CPU partition. Slurm places the components of a heterogeneous job on
distinct nodes (on a one-node cluster such a job never starts: Slurm 22.05 plans the second
component for after the first has ended), so without a GPU partition the job has a single
component.

Stopping. Slurm signals every step of a job at once, in no particular order (``scancel``,
the time limit, a preemption: SIGTERM, then SIGKILL ``KillWait`` seconds later). The stop must
start at the coordinator: a server that leaves on its own signal in the middle of a round makes
the coordinator abort the round and wait ``rejoin_timeout_s`` for it (the run then ends
``failed``, or is killed after ``KillWait``). So only the coordinator's node acts on SIGTERM:
servers and devices run with SIGTERM blocked (a signal mask survives ``exec``; see
:data:`BLOCK_TERM`) and leave on the coordinator's SHUTDOWN, as at the end of a run; SIGINT
still stops them. The batch script ignores SIGTERM and stays to record how every step ended
(``LOGS/steps-<job>.txt``). On SIGUSR1 (``scancel --batch --signal=USR1``: the launcher's
polite stop) it sends SIGINT to the coordinator's ``srun``, which forwards it once to the node
(``--disable-status``). When the coordinator's node has exited, the others have ``grace_s`` to
leave on its SHUTDOWN; then each gets SIGINT (its polite stop), ``grace_s`` later a second one
(forced), and :data:`KILL_AFTER_S` later SIGTERM to its ``srun``, which kills the step.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sft_actors.launch.placement import NodeSpec
from sft_actors.launch.procs import LaunchConfigError
from sft_actors.topology import ADDRESSED_ROLES

#: After the second SIGINT to a node left behind, seconds before its step is killed.
KILL_AFTER_S = 10
#: Runs a server's or device's node with SIGTERM blocked: ``python -c BLOCK_TERM NODE-ARGV…``.
BLOCK_TERM = (
    "import os, signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM]); "
    "os.execvp(sys.argv[1], sys.argv[1:])"
)
#: What a ``#SBATCH`` value may hold: sbatch reads those lines itself, without a shell.
_SAFE = re.compile(r"[A-Za-z0-9_.:,+=@%/-]+")
_JOB_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True, kw_only=True, slots=True)
class Component:
    """One component of the job: the topology hosts it runs, on how many Slurm nodes."""

    index: int
    hosts: tuple[str, ...]
    nodes: int
    cpus_per_node: int
    partition: str | None = None
    gres: str | None = None

    def node_of(self, host: str) -> int:
        """The relative index of the Slurm node that runs ``host`` within this component."""
        return self.hosts.index(host) % self.nodes


@dataclass(frozen=True, kw_only=True, slots=True)
class Step:
    """One node process as an ``srun`` step."""

    node: NodeSpec
    component: int
    relative: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Job:
    """Everything the batch script says: components, steps, where logs go, how long to wait."""

    name: str
    components: tuple[Component, ...]
    steps: tuple[Step, ...]
    logs: Path
    cwd: Path
    grace_s: float
    time: str | None = None
    #: Extra words for every node (``--resume RUN_DIR``).
    node_args: tuple[str, ...] = ()

    @property
    def heterogeneous(self) -> bool:
        return len(self.components) > 1


def plan_components(
    nodes: Sequence[NodeSpec],
    *,
    partition: str | None,
    gpu_partition: str | None,
    max_nodes: int | None,
    cpus: dict[str | None, int] | None = None,
    cpus_per_node: int | None = None,
) -> tuple[Component, ...]:
    """The job's components (see the module doc). ``cpus`` caps the default CPU count per
    partition (None: the default partition) — the smallest node there, when known."""
    hosts = list(dict.fromkeys(n.host.name for n in nodes))
    groups: list[tuple[list[str], str | None, str | None]]
    if gpu_partition is None:
        groups = [(hosts, partition, None)]
    else:
        edge = {n.host.name for n in nodes if n.role in ADDRESSED_ROLES}
        groups = [([h for h in hosts if h in edge], gpu_partition, "gpu:1")]
        rest = [h for h in hosts if h not in edge]
        if rest:
            groups.append((rest, partition, None))
    out = []
    for index, (group, part, gres) in enumerate(groups):
        count = len(group) if max_nodes is None else max(1, min(max_nodes, len(group)))
        want = cpus_per_node or _busiest(nodes, group, count)
        cap = (cpus or {}).get(part)
        if cpus_per_node is None and cap is not None:
            want = max(1, min(want, cap))
        out.append(
            Component(
                index=index, hosts=tuple(group), nodes=count, cpus_per_node=want, partition=part, gres=gres
            )
        )
    return tuple(out)


def _busiest(nodes: Sequence[NodeSpec], group: Sequence[str], count: int) -> int:
    """One CPU per actor on the Slurm node that runs the most of them."""
    per = [0] * count
    for n in nodes:
        if n.host.name in group:
            per[group.index(n.host.name) % count] += len(n.actors)
    return max(per) or 1


def plan_steps(nodes: Sequence[NodeSpec], components: Sequence[Component]) -> tuple[Step, ...]:
    steps = []
    for node in nodes:
        c = next(c for c in components if node.host.name in c.hosts)
        steps.append(Step(node=node, component=c.index, relative=c.node_of(node.host.name)))
    return tuple(steps)


def job_name(run_name: str) -> str:
    """``sft-<run>`` with only letters, digits, ``_.-`` (a ``#SBATCH`` value)."""
    return "sft-" + (_JOB_NAME.sub("-", run_name).strip("-") or "run")


def check_value(option: str, value: str) -> str:
    """``value`` when sbatch can read it on a ``#SBATCH`` line; else :class:`LaunchConfigError`."""
    if not _SAFE.fullmatch(value):
        raise LaunchConfigError(
            f"{option} {value!r}: Slurm names and times are letters, digits and _.:,+=@%/- only"
        )
    return value


def _sbatch_lines(job: Job) -> list[str]:
    lines = [f"#SBATCH --job-name={job.name}", "#SBATCH --output=/dev/null", "#SBATCH --no-requeue"]
    for c in job.components:
        if c.index > 0:
            lines.append("#SBATCH hetjob")
        words = [f"--nodes={c.nodes}", "--ntasks-per-node=1", f"--cpus-per-task={c.cpus_per_node}"]
        if c.partition is not None:
            words.append(f"--partition={check_value('--partition', c.partition)}")
        if c.gres is not None:
            words.append(f"--gres={c.gres}")
        if job.time is not None:
            words.append(f"--time={check_value('--time', job.time)}")
        lines += [f"#SBATCH {w}" for w in words]
    return lines


def srun_words(job: Job, step: Step) -> list[str]:
    """The ``srun`` options of one step (its output file is added by the script, quoted)."""
    words = ["srun"]
    if job.heterogeneous:
        words.append(f"--het-group={step.component}")
    words += ["--nodes=1", "--ntasks=1", f"--relative={step.relative}", "--overlap", "--disable-status"]
    words += [f"--job-name={step.node.label}"]
    return words


def batch_script(job: Job) -> str:
    """The batch script (bash): every value from the topology or the command line is quoted."""
    q = shlex.quote
    out = ["#!/bin/bash", f"# Written by `sft launch --backend slurm`: {len(job.steps)} node(s)."]
    if job.heterogeneous:
        out.append("# A heterogeneous job: GPU component for the coordinator/server hosts, CPU for devices.")
    else:
        out.append("# One component (a heterogeneous job only with --gpu-partition: see deploy/README.md).")
    out += _sbatch_lines(job)
    out += [
        "",
        "set -u",
        "# scancel signals the steps itself; this script stays to record how each ended.",
        "trap '' TERM",
        "PIDS=()",
        "LABELS=()",
        'alive() { jobs -pr | grep -qx -- "$1"; }',
        "stop_politely() {  # SIGUSR1 from `sft launch`: SIGINT to the coordinator's node only",
        '    if [[ ${#PIDS[@]} -eq 0 ]]; then echo "[sft] stopped before any node started"; exit 0; fi',
        '    echo "[sft] polite stop: SIGINT to the coordinator\'s node"',
        '    if alive "${PIDS[0]}"; then kill -s INT "${PIDS[0]}"; fi',
        "}",
        "trap stop_politely USR1",
        f"LOGS={q(str(job.logs))}",
        'exec >>"$LOGS/job-$SLURM_JOB_ID.out" 2>&1',
        f"cd -- {q(str(job.cwd))} || exit 1",
        'RDV="$LOGS/rendezvous-$SLURM_JOB_ID"',
        'STEPS="$LOGS/steps-$SLURM_JOB_ID.txt"',
        f"GRACE_S={int(job.grace_s)}",
        f"KILL_AFTER_S={KILL_AFTER_S}",
        ': >"$STEPS"',
        'echo "[sft] job $SLURM_JOB_ID on ${SLURM_JOB_NODELIST:-?} at $(date -u +%FT%TZ)"',
        "",
    ]
    extra = " ".join(q(w) for w in job.node_args)
    for step in job.steps:
        node = step.node
        log = f'"$LOGS"/{q(node.label + ".log")}'
        line = f"{shlex.join(srun_words(job, step))} --output={log} -- {shlex.join(step_argv(node))}"
        line += ' --rendezvous "$RDV"' + (f" {extra}" if extra else "") + " &"
        out += [f"# {node.role} on host {node.host.name}: {', '.join(node.actors)}", line]
        out.append(f"PIDS+=($!); LABELS+=({q(node.label)})")
    out += _tail()
    return "\n".join(out) + "\n"


def _tail() -> list[str]:
    return [
        "",
        'reap() { while alive "$1"; do wait "$1"; done; wait "$1"; }  # a trap interrupts wait',
        'left() { local p n=0; for p in "${PIDS[@]}"; do alive "$p" && n=$((n + 1)); done; echo $n; }',
        "settle() {  # settle SECONDS: until every step has ended, at most SECONDS",
        "    local end=$((SECONDS + $1))",
        "    while [[ $(left) -gt 0 && $SECONDS -lt $end ]]; do sleep 0.2; done",
        "}",
        "signal_left() {  # signal_left SIG: every srun whose step still runs",
        '    local p; for p in "${PIDS[@]}"; do alive "$p" && kill -s "$1" "$p" 2>/dev/null; done; return 0',
        "}",
        "",
        "# The coordinator's node first: when it has ended, the run has.",
        'reap "${PIDS[0]}"',
        'settle "$GRACE_S"',
        "if [[ $(left) -gt 0 ]]; then",
        '    echo "[sft] $(left) node(s) still running ${GRACE_S}s after the coordinator: stopping them"',
        '    signal_left INT; settle "$GRACE_S"',
        '    signal_left INT; settle "$KILL_AFTER_S"',
        "    signal_left TERM",
        "fi",
        'for i in "${!PIDS[@]}"; do',
        '    reap "${PIDS[$i]}"; echo "${LABELS[$i]} $?" >>"$STEPS"',
        "done",
        'echo "[sft] done at $(date -u +%FT%TZ)"',
    ]


def step_argv(node: NodeSpec) -> list[str]:
    """What a step runs: the node's argv; a server's or device's with SIGTERM blocked."""
    if node.role == "coordinator":
        return list(node.argv)
    return [node.argv[0], "-c", BLOCK_TERM, *node.argv]


def sbatch_argv(script: Path) -> list[str]:
    """Submit ``script``; ``--parsable`` prints ``JOBID`` (``JOBID;CLUSTER`` on a federation)."""
    return ["sbatch", "--parsable", "--", str(script)]


def squeue_argv(job_id: str) -> list[str]:
    """The job's state, one line per component, while slurmctld remembers it (``MinJobAge``)."""
    return ["squeue", "--noheader", "--states=all", f"--jobs={job_id}", "--format=%T"]


def scancel_argv(job_id: str, signal: str | None = None, *, batch: bool = False) -> list[str]:
    """``--signal=SIG`` signals the steps (``batch``: only the batch script); without it the
    job is cancelled (SIGTERM to every step and the script, SIGKILL ``KillWait`` seconds later)."""
    argv = ["scancel"]
    if batch:
        argv.append("--batch")
    if signal is not None:
        argv.append(f"--signal={signal}")
    return [*argv, job_id]


def sinfo_argv() -> list[str]:
    """Partitions (the default one starred) and their smallest node's CPU count."""
    return ["sinfo", "--noheader", "--format=%P %c"]


def parse_sinfo(text: str) -> dict[str | None, int]:
    """``sinfo_argv``'s output → {partition: fewest CPUs of its nodes}; None: the default."""
    out: dict[str | None, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        name, cpus = parts
        digits = re.match(r"\d+", cpus)
        if digits is None:
            continue
        count = int(digits.group())
        keys: list[str | None] = [name.rstrip("*")]
        if name.endswith("*"):
            keys.append(None)
        for key in keys:
            out[key] = min(count, out.get(key, count))
    return out


__all__ = [
    "BLOCK_TERM",
    "KILL_AFTER_S",
    "Component",
    "Job",
    "Step",
    "batch_script",
    "check_value",
    "job_name",
    "parse_sinfo",
    "plan_components",
    "plan_steps",
    "sbatch_argv",
    "scancel_argv",
    "sinfo_argv",
    "squeue_argv",
    "srun_words",
    "step_argv",
]
