"""``sft-node``: run the actor(s) of one role on this machine, as the topology places them.

    sft-node --role device --topology topologies/lab.toml            # every device of this host
    sft-node --role server --topology topologies/lab.toml --name server

Exits 0 when every actor stopped cleanly, 1 otherwise. A coordinator's result is printed
as one JSON line on stdout.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer

from sft_actors.actors.roles import parse_role_overrides
from sft_actors.cli.options import LogFormatOption, LogLevelOption, RoleFactoryOption, setup_logging
from sft_actors.errors import SftError
from sft_actors.topology import load_topology
from sft_actors.transport.endpoints import Transport

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def node(
    role: Annotated[str, typer.Option(help="coordinator, server or device")],
    topology: Annotated[Path, typer.Option(help="topology TOML file")],
    name: Annotated[
        str | None, typer.Option(help="run only this actor (default: all of ROLE on this host)")
    ] = None,
    host: Annotated[str | None, typer.Option(help="which [[hosts]] entry this machine is")] = None,
    transport: Annotated[str, typer.Option(help="tcp (across hosts) or ipc (local processes)")] = "tcp",
    ipc_dir: Annotated[
        Path | None, typer.Option(help="socket directory shared by local processes (ipc)")
    ] = None,
    role_factory: RoleFactoryOption = None,
    threads: Annotated[int | None, typer.Option(help="torch intra-op threads for this process")] = None,
    timeout_s: Annotated[float | None, typer.Option(help="stop the node after this many seconds")] = None,
    log_format: LogFormatOption = "console",
    log_level: LogLevelOption = "info",
) -> None:
    """Run the actor(s) of one role from a topology file."""
    from sft_actors.runtime import run_node

    setup_logging(log_format, log_level)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if transport not in ("tcp", "ipc"):
        raise typer.BadParameter("use tcp or ipc (inproc only works inside one process: sft run)")
    tp: Transport = "tcp" if transport == "tcp" else "ipc"
    try:
        topo = load_topology(topology)
        result = asyncio.run(
            run_node(
                topo,
                role,
                name,
                host=host,
                transport=tp,
                roles=parse_role_overrides(role_factory or []),
                ipc_dir=ipc_dir,
                timeout_s=timeout_s,
            )
        )
    except SftError as exc:
        typer.echo(f"sft-node: {exc}", err=True)
        raise typer.Exit(2) from exc
    except (asyncio.CancelledError, KeyboardInterrupt) as exc:  # a second signal forced the stop
        typer.echo("sft-node: forced stop", err=True)
        raise typer.Exit(130) from exc
    if result.result is not None:
        typer.echo(json.dumps({"result": result.result}, default=str))
    if not result.ok:
        for who, why in result.failures.items():
            typer.echo(f"sft-node: {who}: {why}", err=True)
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
