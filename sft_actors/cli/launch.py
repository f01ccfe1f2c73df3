"""``sft launch``: run a topology on its hosts over ssh (see :mod:`sft_actors.launch`).

Progress goes to stderr, one line per step; stdout gets one JSON line at the end (``ok``,
``status``, ``reason``, ``exit_code``, ``logs``, ``results``, ``nodes``, ``lost``), or the
commands with ``--dry-run``. Exit code: 0 the run completed, or the operator stopped it (one
Ctrl-C/SIGTERM) and every node stopped politely; 1 it failed; 2 a configuration error (a bad
topology, a missing key file, a node that refused its configuration); 130 a second Ctrl-C
forced the stop.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from sft_actors.errors import SftError


def launch_command(
    topology: Annotated[Path, typer.Argument(help="topology TOML file")],
    backend: Annotated[str, typer.Option(help="how to reach the hosts (ssh)")] = "ssh",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print every command; run nothing")] = False,
    logs: Annotated[
        Path | None,
        typer.Option(help="log directory: <host>-<role>.log, results/ (default runs/launch-<time>)"),
    ] = None,
    ship: Annotated[
        str,
        typer.Option(
            help="none (a checkout is at every workdir) or checkout (copy this one's tracked files)"
        ),
    ] = "none",
    python: Annotated[
        str | None,
        typer.Option(
            help="nodes' interpreter, relative to the workdir (default .venv/bin/python; local: this one)"
        ),
    ] = None,
    collect: Annotated[
        bool, typer.Option("--collect/--no-collect", help="copy the run directory back into LOGS/results")
    ] = True,
    ssh_config: Annotated[
        Path | None, typer.Option("--ssh-config", help="ssh config file (ssh -F): aliases, ports, identities")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads per node (sft-node --threads)")] = None,
) -> None:
    """Ship the topology (and the checkout, and each host's keys), start one sft-node per host
    and role, stop them on Ctrl-C, and collect the run directory."""
    from sft_actors.launch import EXIT_CONFIG, LaunchOptions, run_launch
    from sft_actors.launch import dry_run as plan_only

    if backend != "ssh":
        raise typer.BadParameter(f"unknown backend {backend!r}; use ssh", param_hint="--backend")
    if ship not in ("none", "checkout"):
        raise typer.BadParameter(f"use none or checkout, not {ship!r}", param_hint="--ship")
    options = LaunchOptions(
        topology=topology,
        logs=logs or Path("runs") / f"launch-{time.strftime('%Y%m%d-%H%M%S')}",
        ship="checkout" if ship == "checkout" else "none",
        python=python,
        collect=collect,
        ssh_config=None if ssh_config is None else str(ssh_config),
        threads=threads,
    )
    try:
        if dry_run:
            for line in plan_only(options):
                typer.echo(line)
            return
        report = run_launch(options, echo=lambda line: typer.echo(line, err=True))
    except SftError as exc:  # before anything was copied or started
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from exc
    typer.echo(json.dumps(report.line()))
    if report.outcome.exit_code:
        raise typer.Exit(report.outcome.exit_code)
