"""``sft-node``: run the actor(s) of one role on this machine, as the topology places them.

    sft-node --role device --topology topologies/lab.toml            # every device of this host
    sft-node --role server --topology topologies/lab.toml --name server

    sft-node --role coordinator --topology topologies/lab.toml --resume runs/lab-20250101-120000

Prints one JSON line on stdout, the shape ``sft run`` prints: ``ok``, ``status`` (completed,
interrupted or failed), the coordinator's ``result`` (null on a node without one), ``lost``;
and ``type``/``error``/``failures`` when it did not complete. Exits 0 when the run completed,
1 when it failed, 2 on a configuration error and 130 when a signal interrupted it (one
signal: polite staged stop; a second: forced). ``--resume RUN_DIR`` matters to the
coordinator, which continues the run from RUN_DIR's last checkpoint; a server or device is
restarted as it was started (``--resume`` is accepted and not needed): the coordinator sends
it its checkpointed state. The work is :func:`sft_actors.node_process.run_node_process` (also what
``run_processes`` starts); this module only parses the flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sft_actors.cli.options import LogFormatOption, LogLevelOption, RoleFactoryOption, setup_logging

# No rich markup: it would read the TOML table names in the help ([[hosts]]) as style tags.
app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None)


@app.command()
def node(
    role: Annotated[str, typer.Option(help="coordinator, server or device")],
    topology: Annotated[Path, typer.Option(help="topology TOML file")],
    name: Annotated[
        str | None,
        typer.Option(help="run only this [[actors]] entry (default: all of ROLE on this host)"),
    ] = None,
    host: Annotated[str | None, typer.Option(help="which [[hosts]] entry this machine is")] = None,
    transport: Annotated[str, typer.Option(help="tcp (across hosts) or ipc (local processes)")] = "tcp",
    ipc_dir: Annotated[
        Path | None, typer.Option(help="socket directory shared by local processes (ipc)")
    ] = None,
    role_factory: RoleFactoryOption = None,
    threads: Annotated[int | None, typer.Option(help="torch intra-op threads for this process")] = None,
    timeout_s: Annotated[float | None, typer.Option(help="stop the node after this many seconds")] = None,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint"),
    ] = None,
    rendezvous: Annotated[
        Path | None, typer.Option(help="shared directory where auto-addressed hosts publish")
    ] = None,
    address: Annotated[list[str] | None, typer.Option(help="HOST=ADDR for an address = auto host")] = None,
    advertise: Annotated[
        str | None, typer.Option(help="the address this node publishes for its auto host (default: FQDN)")
    ] = None,
    log_format: LogFormatOption = "console",
    log_level: LogLevelOption = "info",
) -> None:
    """Run the actor(s) of one role from a topology file."""
    from sft_actors.errors import ConfigError
    from sft_actors.node_process import NodeOptions, parse_addresses, run_node_process  # zmq, torch

    setup_logging(log_format, log_level)
    if transport not in ("tcp", "ipc"):
        raise typer.BadParameter("use tcp or ipc (inproc only works inside one process: sft run)")
    try:
        addresses = parse_addresses(address or [])
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--address") from None
    opts = NodeOptions(
        role=role,
        topology=topology,
        name=name,
        host=host,
        transport="tcp" if transport == "tcp" else "ipc",
        ipc_dir=ipc_dir,
        role_factories=role_factory or [],
        threads=threads,
        timeout_s=timeout_s,
        resume_dir=resume,
        rendezvous=rendezvous,
        addresses=addresses,
        advertise=advertise,
    )
    code = run_node_process(opts, prog="sft-node")
    if code:
        raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
