"""How a launch ended, from how its nodes ended: status, reason, exit code. Pure.

The coordinator's node decides, as it decides for the run: ``completed`` (exit 0) when it
says so — a device lost on the way does not fail a run the coordinator completed; an
operator's stop (one SIGINT/SIGTERM to the launcher) that every node obeyed in time is
``interrupted`` (exit 0); a second signal forces the stop (``interrupted``, exit 130).
Anything else is ``failed``: exit 2 when a node refused its configuration (it exited 2), else 1.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_FORCED = 130

#: A node's exit code → its status, when it printed no line: a stop signal that came before
#: the node handled signals ends it with 128 + the signal (the shell's code; -N locally).
_BY_CODE = {0: "completed", 129: "interrupted", 130: "interrupted", 143: "interrupted"}
_BY_CODE |= {-signo: "interrupted" for signo in (1, 2, 15)}


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeEnd:
    label: str
    role: str
    returncode: int | None
    #: The ``status`` of the node's JSON line (None: it printed none).
    status: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class LaunchOutcome:
    status: str
    reason: str
    exit_code: int

    @property
    def ok(self) -> bool:
        return self.exit_code == EXIT_OK


def node_status(end: NodeEnd) -> str:
    if end.status is not None:
        return end.status
    return _BY_CODE.get(end.returncode, "failed") if end.returncode is not None else "failed"


def judge(
    ends: Sequence[NodeEnd],
    *,
    signals: int,
    overdue: Sequence[str] = (),
    error: str | None = None,
) -> LaunchOutcome:
    """The launch's outcome. ``signals``: how many stop signals the launcher got; ``overdue``:
    nodes killed because they outlived the stop's grace; ``error``: the launcher's own."""
    coordinator = next((e for e in ends if e.role == "coordinator"), None)
    said = None if coordinator is None else node_status(coordinator)
    if error is not None:
        return LaunchOutcome(status="failed", reason=error, exit_code=_failed_code(ends))
    if signals >= 2:
        return LaunchOutcome(
            status="interrupted", reason="forced stop (second signal)", exit_code=EXIT_FORCED
        )
    if said == "completed":
        return LaunchOutcome(status="completed", reason="completed", exit_code=EXIT_OK)
    if signals == 1 and said in (None, "interrupted"):
        if overdue:
            why = f"interrupted, but {', '.join(overdue)} did not stop in time and were killed"
            return LaunchOutcome(status="interrupted", reason=why, exit_code=EXIT_FAILED)
        return LaunchOutcome(status="interrupted", reason="stopped by the operator", exit_code=EXIT_OK)
    if coordinator is None:
        return LaunchOutcome(
            status="failed", reason="the coordinator's node did not start", exit_code=EXIT_FAILED
        )
    why = f"the coordinator's node ended {said} (exit code {coordinator.returncode})"
    return LaunchOutcome(status="failed", reason=why, exit_code=_failed_code(ends))


def _failed_code(ends: Sequence[NodeEnd]) -> int:
    return EXIT_CONFIG if any(e.returncode == EXIT_CONFIG for e in ends) else EXIT_FAILED


def lost(ends: Sequence[NodeEnd]) -> list[str]:
    """Nodes other than the coordinator's that did not end cleanly (0, or 130 on a stop)."""
    return [
        f"{e.label} (exit code {e.returncode})"
        for e in ends
        if e.role != "coordinator" and node_status(e) not in ("completed", "interrupted")
    ]


def node_log_entry(raw: bytes) -> tuple[dict[str, Any] | None, str | None, bool]:
    """One line a node wrote: (the JSON object or None, the run dir its outcome names, whether
    it is the node's outcome line — ``ok`` and ``status`` — rather than a log event)."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return None, None, False
    if not isinstance(obj, dict):
        return None, None, False
    if "ok" in obj and "status" in obj:
        result = obj.get("result")
        run_dir = result.get("run_dir") if isinstance(result, dict) else None
        return obj, run_dir if isinstance(run_dir, str) else None, True
    return obj, None, False


__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_FORCED",
    "EXIT_OK",
    "LaunchOutcome",
    "NodeEnd",
    "judge",
    "lost",
]
