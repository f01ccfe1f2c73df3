"""What a Slurm launch reads back: the job's state, the nodes' logs, how the job ended. Pure
but for reading files.

The nodes' output lands in ``LOGS/<host>-<role>.log`` (``srun --output``), written on the nodes
and read here as it grows: the coordinator's events become progress lines, and each node's
last JSON line (``ok``, ``status``, …) says how it ended. The batch script records each step's
exit code in ``LOGS/steps-<job>.txt``.

How the launch ended: as over ssh when the operator stopped it through this launcher (one
Ctrl-C: ``interrupted``, exit 0; a second: exit 130); otherwise from the coordinator's node —
``completed`` (0); ``interrupted`` when a signal from Slurm stopped it politely (``scancel``, the
time limit, a preemption: exit 130, a checkpoint in the run directory); anything else
``failed`` (2 when a node refused its configuration, else 1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sft_actors.launch.outcome import (
    EXIT_FAILED,
    EXIT_FORCED,
    EXIT_OK,
    LaunchOutcome,
    NodeEnd,
    judge,
    node_log_entry,
    node_status,
)

#: ``squeue --format=%T`` states after which nothing of the job runs any more.
TERMINAL_STATES = frozenset(
    {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
     "PREEMPTED", "REVOKED", "TIMEOUT"}
)  # fmt: skip
#: squeue's answer for a job slurmctld no longer remembers (ended more than MinJobAge ago).
GONE = "Invalid job id"

Echo = Callable[[str], None]


def job_ended(states: Sequence[str]) -> bool:
    """Every component of the job has ended (an empty answer: slurmctld forgot it)."""
    return all(s in TERMINAL_STATES for s in states)


def job_state(states: Sequence[str]) -> str | None:
    """One word for the job: the first component's state that is not COMPLETED, else COMPLETED."""
    return next((s for s in states if s != "COMPLETED"), states[0] if states else None)


@dataclass
class NodeLog:
    """One node's log file, read as it grows (complete lines only)."""

    path: Path
    role: str
    #: The node's JSON line (``ok``, ``status``, ``result``, …), once printed.
    line: dict[str, Any] | None = None
    run_dir: str | None = None
    #: The first ``round_done`` (round 1, or the first after a resume): its timestamp (the
    #: coordinator's clock, UTC).
    first_round_at: datetime | None = None
    _offset: int = field(default=0, repr=False)
    _partial: bytes = field(default=b"", repr=False)

    def read(self, echo: Echo | None = None) -> None:
        """Read what was appended since the last call; progress lines go to ``echo``."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            if raw.startswith(b"{"):
                self._note(raw, echo)

    def _note(self, raw: bytes, echo: Echo | None) -> None:
        obj, run_dir, outcome = node_log_entry(raw)
        if obj is None:
            return
        if outcome:
            self.line = obj
            self.run_dir = run_dir or self.run_dir
        elif self.role == "coordinator":
            self._progress(obj, echo)

    def _progress(self, event: dict[str, Any], echo: Echo | None) -> None:
        name = event.get("event")
        say = echo or (lambda _line: None)
        if name == "run_started":
            self.run_dir = str(event.get("run_dir"))
            say(f"[launch] run started: {event.get('devices')} devices, run_dir {self.run_dir}")
        elif name == "round_done":
            if self.first_round_at is None:
                self.first_round_at = _timestamp(event.get("timestamp"))
            say(f"[launch] round {event.get('round')} done: loss {event.get('loss')}")
        elif name == "run_ended":
            say(f"[launch] run ended: {event.get('status')} ({event.get('reason')})")


def _timestamp(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def read_steps(path: Path) -> dict[str, int]:
    """``LOGS/steps-<job>.txt``: label → the exit code of its ``srun`` (missing: the batch
    script did not get to record it, e.g. killed after ``KillWait``)."""
    out: dict[str, int] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return out
    for line in text.splitlines():
        label, _, code = line.rpartition(" ")
        if label and code.lstrip("-").isdigit():
            out[label] = int(code)
    return out


def node_ends(logs: Iterable[tuple[str, NodeLog]], steps: dict[str, int]) -> list[NodeEnd]:
    ends = []
    for label, log in logs:
        status = None if log.line is None else log.line.get("status")
        ends.append(
            NodeEnd(
                label=label,
                role=log.role,
                returncode=steps.get(label),
                status=status if isinstance(status, str) else None,
            )
        )
    return ends


def judge_job(ends: Sequence[NodeEnd], *, signals: int, state: str | None, started: bool) -> LaunchOutcome:
    """The launch's outcome (see the module doc). ``signals``: stop signals this launcher got;
    ``state``: the job's last Slurm state; ``started``: whether any node ran."""
    where = f"the job ended {state}" if state else "the job ended"
    if not started and signals == 1:
        return LaunchOutcome(status="interrupted", reason=f"{where} before any node ran", exit_code=EXIT_OK)
    if signals:
        return judge(ends, signals=signals)
    if not started:
        if state in ("CANCELLED", "DEADLINE", "PREEMPTED", "TIMEOUT"):
            return LaunchOutcome(
                status="interrupted", reason=f"{where} before any node ran", exit_code=EXIT_FORCED
            )
        return LaunchOutcome(status="failed", reason=f"{where} before any node ran", exit_code=EXIT_FAILED)
    coordinator = next((e for e in ends if e.role == "coordinator"), None)
    said = None if coordinator is None else node_status(coordinator)
    if said == "interrupted" and coordinator is not None and coordinator.status == "interrupted":
        why = f"{where}: a signal from Slurm (scancel, time limit or preemption) stopped the run politely"
        return LaunchOutcome(status="interrupted", reason=why, exit_code=EXIT_FORCED)
    outcome = judge(ends, signals=0)
    if outcome.status == "failed" and state not in (None, "COMPLETED"):
        return LaunchOutcome(
            status="failed", reason=f"{outcome.reason}; {where}", exit_code=outcome.exit_code
        )
    return outcome


__all__ = [
    "GONE",
    "TERMINAL_STATES",
    "NodeLog",
    "job_ended",
    "job_state",
    "judge_job",
    "node_ends",
    "read_steps",
]
