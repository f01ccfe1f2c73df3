"""How a run ended: each actor's fate, the run's status, and the one JSON line that says so.

:class:`RunResult` is what :func:`~sft_actors.runtime.run_topology`, ``run_node`` and
``run_processes`` return; ``sft run`` and ``sft-node`` print :meth:`RunResult.line` (or
:func:`failure_line`) and exit with the status's code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from sft_actors.actors.core import ActorState
from sft_actors.errors import ActorFailed, CheckpointError, ConfigError
from sft_actors.train.checkpoint import latest_manifest
from sft_actors.train.files import json_safe


@dataclass(kw_only=True, slots=True, frozen=True)
class ActorOutcome:
    name: str
    role: str
    state: str
    error: str | None = None


RunStatus = Literal["completed", "interrupted", "failed"]
RUN_STATUSES: tuple[RunStatus, ...] = ("completed", "interrupted", "failed")


@dataclass(kw_only=True, slots=True, frozen=True)
class RunResult:
    """What a run produced: the coordinator's result (if it ran here) and each actor's fate.

    :attr:`status` is how the run ended: ``failed`` when the run itself erred (its timeout ran
    out); else the coordinator's own word when its result is a dict
    with a ``"status"`` key (and ``"reason"``); otherwise ``interrupted`` when a signal began
    the stop (``signalled``), ``completed`` when the coordinator (or, on a node without one,
    every actor) stopped cleanly and the run had no error, else ``failed``. ``ok`` is
    ``status == "completed"``: a device lost on the way (see :attr:`lost`) does not fail a run
    whose coordinator completed it.
    """

    result: Any
    outcomes: Mapping[str, ActorOutcome] = field(default_factory=dict)
    elapsed_s: float = 0.0
    error: str | None = None
    #: A signal (SIGINT/SIGTERM/SIGHUP) began the stop.
    signalled: bool = False

    @property
    def status(self) -> RunStatus:
        if self.error is not None and not self.signalled:  # e.g. --timeout-s ran out: a failure
            return "failed"
        said = self._coordinator_says("status")
        if said in RUN_STATUSES:
            return cast(RunStatus, said)
        if self.signalled:
            return "interrupted"
        return "completed" if self._clean else "failed"

    @property
    def reason(self) -> str:
        """Why the run ended, in words (the coordinator's ``"reason"`` when it gave one)."""
        said = self._coordinator_says("reason")
        if self.error is not None and not self.signalled:
            return self.error
        if said is not None and self._coordinator_says("status") in RUN_STATUSES:
            return str(said)
        status = self.status
        if status == "interrupted":
            return "stopped by a signal"
        if status == "completed":
            return "completed"
        return "; ".join(f"{who}: {why}" for who, why in self.failures.items()) or "failed"

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    @property
    def _clean(self) -> bool:
        if self.error is not None:
            return False
        coordinators = [o for o in self.outcomes.values() if o.role == "coordinator"]
        judged = coordinators or list(self.outcomes.values())
        return all(o.state == ActorState.STOPPED.value for o in judged)

    def _coordinator_says(self, key: str) -> Any:
        return self.result.get(key) if isinstance(self.result, Mapping) else None

    @property
    def failures(self) -> dict[str, str]:
        """Every actor that did not stop cleanly (``<run>`` for the run itself, e.g. its timeout)."""
        out = {n: o.error or o.state for n, o in self.outcomes.items() if o.state != ActorState.STOPPED.value}
        if self.error:
            out["<run>"] = self.error
        return out

    @property
    def lost(self) -> dict[str, str]:
        """Devices and servers of this process that failed or died (a subset of :attr:`failures`):
        the coordinator decided whether the run could go on without them, so a run that went on
        is ``completed`` and says here who it lost (a device node whose key was refused, say)."""
        return {
            n: o.error or o.state
            for n, o in self.outcomes.items()
            if o.role != "coordinator" and o.state != ActorState.STOPPED.value
        }

    def line(self) -> dict[str, Any]:
        """The one JSON line ``sft run`` and ``sft-node`` print (see :mod:`sft_actors.cli.run`);
        strict JSON: a non-finite number (a diverged loss) is ``null``."""
        line: dict[str, Any] = json_safe(self._line())
        return line

    def _line(self) -> dict[str, Any]:
        if self.ok:
            return {
                "ok": True,
                "status": self.status,
                "elapsed_s": round(self.elapsed_s, 3),
                "result": self.result,
                "lost": self.lost,
            }
        status = self.status
        if status == "interrupted":
            kind, message = "Interrupted", f"run interrupted: {self.reason}"
        else:
            kind, message = ActorFailed.__name__, f"run failed: {self.reason}"
        return failure_line(
            kind, message, status=status, failures=self.failures, result=self.result, lost=self.lost
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``result`` must be JSON-able, or is stringified by the caller's encoder).

        ``status`` and ``reason`` are there for readers; :meth:`from_dict` derives them again.
        """
        return {
            "result": self.result,
            "outcomes": {
                n: {"role": o.role, "state": o.state, "error": o.error} for n, o in self.outcomes.items()
            },
            "elapsed_s": self.elapsed_s,
            "error": self.error,
            "signalled": self.signalled,
            "status": self.status,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunResult:
        """Inverse of :meth:`to_dict`; :class:`ValueError` when ``data`` does not have its shape."""
        try:
            outcomes = {
                str(n): ActorOutcome(
                    name=str(n), role=str(o["role"]), state=str(o["state"]), error=o["error"]
                )
                for n, o in data["outcomes"].items()
            }
            return cls(
                result=data["result"],
                outcomes=outcomes,
                elapsed_s=float(data["elapsed_s"]),
                error=data["error"],
                signalled=bool(data.get("signalled", False)),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a run result: {exc!r}") from exc

    def raise_for_failures(self) -> RunResult:
        if not self.ok:
            detail = "; ".join(f"{name}: {why}" for name, why in self.failures.items())
            raise ActorFailed(f"run {self.status}: {detail or self.reason}")
        return self


def failure_line(
    kind: str,
    message: str,
    *,
    status: RunStatus = "failed",
    failures: Mapping[str, str] | None = None,
    result: Any = None,
    lost: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The JSON line of a run that did not complete (``kind``: the error's class name)."""
    return {
        "ok": False,
        "status": status,
        "type": kind,
        "error": message,
        "failures": dict(failures or {}),
        "result": result,
        "lost": dict(lost or {}),
    }


def check_resume_dir(run_dir: str | Path, schema_hash: str | None = None) -> Path:
    """``run_dir`` if it can be resumed, checked before anything starts; else ConfigError.

    It must hold ``checkpoints`` with a complete checkpoint, and — given the topology's
    ``schema_hash`` — one written by the same topology (model, cuts, LoRA, codec)."""
    path = Path(run_dir)
    if not (path / "checkpoints").is_dir():
        raise ConfigError(
            f"cannot resume: {path / 'checkpoints'} does not exist; pass the run directory a "
            "previous `sft run` printed (its run_dir)"
        )
    try:
        where, manifest = latest_manifest(path)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from exc
    meta = manifest.get("meta")
    written_by = meta.get("schema_hash") if isinstance(meta, dict) else None
    if schema_hash is not None and written_by != schema_hash:
        raise ConfigError(
            f"cannot resume: {where} was written by a different topology (schema {written_by}, "
            f"this file's {schema_hash}); model, cuts, LoRA and codec must be the ones it ran with"
        )
    return path


__all__ = ["RUN_STATUSES", "ActorOutcome", "RunResult", "RunStatus", "check_resume_dir", "failure_line"]
