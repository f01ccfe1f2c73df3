"""``sft run F``: a whole topology in one process (inproc) or as local processes (ipc/tcp)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer

from sft_actors.actors.roles import parse_role_overrides
from sft_actors.cli.options import LogFormatOption, LogLevelOption, RoleFactoryOption, setup_logging
from sft_actors.errors import SftError
from sft_actors.transport.endpoints import TRANSPORTS, Transport


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
    """Run every actor of a topology on this machine and print the coordinator's result."""
    from sft_actors.runtime import run_processes, run_topology
    from sft_actors.topology import load_topology

    fmt = setup_logging(log_format, log_level)
    chosen = transport or ("ipc" if processes else "inproc")
    if chosen not in TRANSPORTS:
        raise typer.BadParameter(f"transport must be one of {', '.join(TRANSPORTS)}")
    tp: Transport = "inproc" if chosen == "inproc" else "ipc" if chosen == "ipc" else "tcp"
    refs = role_factory or []
    try:
        topo = load_topology(path)
        if processes:
            code = asyncio.run(
                run_processes(
                    path,
                    topo,
                    transport=tp,
                    role_factories=refs,
                    log_format=fmt,
                    log_level=log_level,
                    timeout_s=timeout_s,
                )
            )
            raise typer.Exit(code)
        result = asyncio.run(
            run_topology(
                topo, transport=tp, roles=parse_role_overrides(refs), timeout_s=timeout_s, handle_signals=True
            )
        )
    except SftError as exc:
        typer.echo(f"sft run: {exc}", err=True)
        raise typer.Exit(2) from exc
    except (asyncio.CancelledError, KeyboardInterrupt) as exc:  # a second signal forced the stop
        typer.echo("sft run: forced stop", err=True)
        raise typer.Exit(130) from exc
    typer.echo(
        json.dumps(
            {"ok": result.ok, "elapsed_s": round(result.elapsed_s, 3), "result": result.result}, default=str
        )
    )
    if not result.ok:
        for who, why in result.failures.items():
            typer.echo(f"sft run: {who}: {why}", err=True)
        raise typer.Exit(1)
