"""``sft run F``: a whole topology in one process (inproc) or as local processes (ipc/tcp).

Either way the last line on stdout, and the only one, is one JSON object:

    {"ok": true, "elapsed_s": 12.3, "result": {...the coordinator's result...}}
    {"ok": false, "type": "ActorFailed", "error": "run failed: ...", "failures": {"dev0": "..."}}

``type`` is the error's class name; ``failures`` maps each failed actor (``<run>`` for the run
itself, e.g. its timeout) to why, and is empty when the run never started. Exit code: 0 on
success; 1 when an actor or the run failed (or on an unexpected error); 2 for a configuration
error (topology, role factory); 130 when a second signal forced the stop. Logs and per-actor
messages go to stderr. Bad option values are usage errors, reported by the option parser
before anything runs.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sft_actors.actors.roles import parse_role_overrides
from sft_actors.cli.options import LogFormatOption, LogLevelOption, RoleFactoryOption, setup_logging
from sft_actors.errors import ActorFailed, SftError
from sft_actors.log import get_logger
from sft_actors.transport.endpoints import TRANSPORTS, Transport

if TYPE_CHECKING:
    from sft_actors.runtime import RunResult

log = get_logger(component="cli")


def run_command(
    path: Annotated[Path, typer.Argument(help="topology TOML file")],
    processes: Annotated[bool, typer.Option("--processes", help="one local process per actor")] = False,
    transport: Annotated[
        str | None, typer.Option(help="inproc (default), or ipc/tcp (default ipc with --processes)")
    ] = None,
    role_factory: RoleFactoryOption = None,
    timeout_s: Annotated[float | None, typer.Option(help="stop the run after this many seconds")] = None,
    log_format: LogFormatOption = "console",
    log_level: LogLevelOption = "info",
) -> None:
    """Run every actor of a topology on this machine and print the outcome as one JSON line."""
    fmt = setup_logging(log_format, log_level)
    chosen = transport or ("ipc" if processes else "inproc")
    if chosen not in TRANSPORTS:
        raise typer.BadParameter(f"transport must be one of {', '.join(TRANSPORTS)}")
    tp: Transport = "inproc" if chosen == "inproc" else "ipc" if chosen == "ipc" else "tcp"
    code, line = _run(path, processes, tp, role_factory or [], timeout_s, fmt, log_level)
    typer.echo(json.dumps(line, default=str))
    if code:
        raise typer.Exit(code)


def _run(
    path: Path,
    processes: bool,
    transport: Transport,
    refs: list[str],
    timeout_s: float | None,
    log_format: str,
    log_level: str,
) -> tuple[int, dict[str, Any]]:
    """Run the topology; (exit code, the JSON line). Never raises for a failed run."""
    from sft_actors.processes import run_processes  # zmq, torch: loaded only when a run starts
    from sft_actors.runtime import run_topology
    from sft_actors.topology import load_topology

    try:
        topo = load_topology(path)
        roles = parse_role_overrides(refs)
        if processes:
            runner = run_processes(
                path,
                topo,
                transport=transport,
                role_factories=refs,
                log_format=log_format,
                log_level=log_level,
                timeout_s=timeout_s,
            )
        else:
            runner = run_topology(
                topo,
                transport=transport,
                roles=roles,
                timeout_s=timeout_s,
                handle_signals=True,
            )
        result = asyncio.run(runner)
    except SftError as exc:
        typer.echo(f"sft run: {exc}", err=True)
        return 2, _failure(type(exc).__name__, str(exc))
    except (asyncio.CancelledError, KeyboardInterrupt) as exc:  # a second signal forced the stop
        typer.echo("sft run: forced stop", err=True)
        return 130, _failure(type(exc).__name__, "forced stop")
    except Exception as exc:  # a bug, not a usage error: keep the promise of one JSON line
        log.exception("run_crashed")
        return 1, _failure(type(exc).__name__, str(exc))
    return _outcome(result)


def _outcome(result: RunResult) -> tuple[int, dict[str, Any]]:
    if result.ok:
        return 0, {"ok": True, "elapsed_s": round(result.elapsed_s, 3), "result": result.result}
    failures = result.failures
    for who, why in failures.items():
        typer.echo(f"sft run: {who}: {why}", err=True)
    detail = "; ".join(f"{who}: {why}" for who, why in failures.items())
    return 1, _failure(ActorFailed.__name__, f"run failed: {detail}", failures)


def _failure(kind: str, message: str, failures: dict[str, str] | None = None) -> dict[str, Any]:
    return {"ok": False, "type": kind, "error": message, "failures": failures or {}}
