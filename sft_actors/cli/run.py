"""``sft run F``: a whole topology in one process (inproc) or as local processes (ipc/tcp).

Either way the last line on stdout, and the only one, is one JSON object that always has
``ok`` and ``status``:

    {"ok": true, "status": "completed", "elapsed_s": 12.3, "result": {...}, "lost": {}}
    {"ok": false, "status": "interrupted", "type": "Interrupted", "error": "run interrupted: ...",
     "failures": {}, "result": {...} or null, "lost": {}}
    {"ok": false, "status": "failed", "type": "ActorFailed", "error": "run failed: ...",
     "failures": {"coordinator": "..."}, "result": null, "lost": {"dev0": "..."}}

``result`` is the coordinator's result (its ``status``/``reason`` keys, when it gives them,
decide ``status``). ``type`` is the error's class name (``Interrupted`` for a run a signal
stopped). ``failures`` maps every actor that did not stop cleanly (``<run>`` for the run
itself, e.g. its timeout) to why, and is empty when the run never started. ``lost`` holds the
devices and servers that failed or died while the coordinator went on without them: a run
whose coordinator completed is ``completed`` even with a lost device.

Exit code: 0 only when the run completed; 130 when it was interrupted (SIGINT/SIGTERM/SIGHUP:
a polite staged stop, or a second signal that forced it); 1 when it failed (or on an
unexpected error); 2 for a configuration error (topology, role factory, ``--resume`` without
checkpoints). Under ``--processes`` the nodes run in their own session and this process
forwards a signal to them, so one Ctrl-C is one polite stop. ``--resume RUN_DIR`` continues a
run from its last checkpoint (``sft status RUN_DIR`` shows what is there). Logs and per-actor
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
from sft_actors.errors import SftError
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
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume", metavar="RUN_DIR", help="continue this run (its run_dir) from its last checkpoint"
        ),
    ] = None,
    log_format: LogFormatOption = "console",
    log_level: LogLevelOption = "info",
) -> None:
    """Run every actor of a topology on this machine and print the outcome as one JSON line."""
    fmt = setup_logging(log_format, log_level)
    chosen = transport or ("ipc" if processes else "inproc")
    if chosen not in TRANSPORTS:
        raise typer.BadParameter(f"transport must be one of {', '.join(TRANSPORTS)}")
    tp: Transport = "inproc" if chosen == "inproc" else "ipc" if chosen == "ipc" else "tcp"
    code, line = _run(path, processes, tp, role_factory or [], timeout_s, fmt, log_level, resume)
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
    resume: Path | None = None,
) -> tuple[int, dict[str, Any]]:
    """Run the topology; (exit code, the JSON line). Never raises for a failed run."""
    from sft_actors.actors.env import topology_schema_hash
    from sft_actors.node_process import EXIT_CONFIG, EXIT_FAILED, EXIT_INTERRUPTED
    from sft_actors.processes import run_processes  # zmq, torch: loaded only when a run starts
    from sft_actors.runtime import check_resume_dir, failure_line, run_topology
    from sft_actors.topology import check_placement, load_topology

    try:
        topo = load_topology(path)
        check_placement(topo, actors=[a.name for a in topo.actors])  # every actor starts here
        if resume is not None:
            check_resume_dir(resume, topology_schema_hash(topo))
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
                resume_dir=resume,
            )
        else:
            runner = run_topology(
                topo,
                transport=transport,
                roles=roles,
                timeout_s=timeout_s,
                handle_signals=True,
                resume_dir=resume,
            )
        result = asyncio.run(runner)
    except SftError as exc:
        typer.echo(f"sft run: {exc}", err=True)
        return EXIT_CONFIG, failure_line(type(exc).__name__, str(exc))
    except (asyncio.CancelledError, KeyboardInterrupt) as exc:  # a second signal forced the stop
        typer.echo("sft run: forced stop", err=True)
        return EXIT_INTERRUPTED, failure_line(type(exc).__name__, "forced stop", status="interrupted")
    except Exception as exc:  # a bug, not a usage error: keep the promise of one JSON line
        log.exception("run_crashed")
        return EXIT_FAILED, failure_line(type(exc).__name__, str(exc))
    return _outcome(result)


def _outcome(result: RunResult) -> tuple[int, dict[str, Any]]:
    from sft_actors.node_process import EXIT_CODES

    if not result.ok:
        typer.echo(f"sft run: run {result.status}: {result.reason}", err=True)
        for who, why in result.failures.items():
            typer.echo(f"sft run: {who}: {why}", err=True)
    else:
        for who, why in result.lost.items():
            typer.echo(f"sft run: lost {who}: {why}", err=True)
    return EXIT_CODES[result.status], result.line()
