"""One node as an OS process: the entry point ``sft-node`` and ``run_processes`` share.

    python -m sft_actors.node_process --role server --topology topologies/tiny.toml \\
        --name server --transport ipc --ipc-dir /tmp/sft-x

It sits beside the runtime, not in ``cli/``, so that :mod:`sft_actors.processes` can start it
without depending on the CLI (the CLI imports the runtime, never the reverse). ``sft-node``
(``cli/node.py``) parses the same flags with typer and calls :func:`run_node_process`;
:func:`main` parses them with argparse and adds ``--outcome-file``, through which
``run_processes`` collects each node's result and failures.

Without ``--outcome-file`` the node prints one JSON line on stdout, the shape ``sft run``
prints (see :mod:`sft_actors.cli.run`): ``{"ok": true, "status": "completed", "elapsed_s",
"result", "lost"}`` or ``{"ok": false, "status": "interrupted"|"failed", "type", "error",
"failures", "result", "lost"}``; ``result`` is the coordinator's (null on a node without one).

Exit codes: 0 the run completed (a node without a coordinator: every actor stopped cleanly
and no signal stopped it), 1 it failed, 2 a configuration or usage error, 130 interrupted (a
signal began the polite stop, or a second one forced it).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, cast

from sft_actors import log
from sft_actors.actors.env import topology_schema_hash
from sft_actors.actors.roles import parse_role_overrides
from sft_actors.errors import ConfigError, SftError
from sft_actors.rendezvous import auto_hosts, resolve
from sft_actors.runtime import RunResult, RunStatus, check_resume_dir, failure_line, run_node, select_actors
from sft_actors.topology import Topology, check_hosts, check_placement, load_topology

EXIT_OK: Final[int] = 0
EXIT_FAILED: Final[int] = 1
EXIT_CONFIG: Final[int] = 2
EXIT_INTERRUPTED: Final[int] = 130
EXIT_FORCED: Final[int] = EXIT_INTERRUPTED  # a forced stop is an interrupted run too
EXIT_CODES: Final[dict[RunStatus, int]] = {
    "completed": EXIT_OK,
    "interrupted": EXIT_INTERRUPTED,
    "failed": EXIT_FAILED,
}

NodeTransport = Literal["tcp", "ipc"]


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeOptions:
    """What one node runs; the fields are ``sft-node``'s flags (see ``--help`` there)."""

    role: str
    topology: Path
    name: str | None = None
    host: str | None = None
    transport: NodeTransport = "tcp"
    ipc_dir: Path | None = None
    role_factories: Sequence[str] = ()
    threads: int | None = None
    timeout_s: float | None = None
    #: Where to write the outcome as JSON (for ``run_processes``) instead of printing the result.
    outcome_file: Path | None = None
    #: ``--resume RUN_DIR``: continue that run from its last checkpoint.
    resume_dir: Path | None = None
    #: ``address = "auto"`` hosts: where nodes publish and find them (shared storage) ...
    rendezvous: Path | None = None
    #: ... or ``--address HOST=ADDR`` given by a launcher that knows the allocation ...
    addresses: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: ... and what this node publishes for its own auto host (default: its FQDN).
    advertise: str | None = None


def _resolve(topo: Topology, opts: NodeOptions) -> Topology:
    """``topo`` with the ``address = "auto"`` hosts this node runs on or dials made concrete."""
    if not auto_hosts(topo) and not opts.addresses:
        return topo
    mine = select_actors(topo, opts.role, opts.name, opts.host)
    dials = {topo.actor(p).host for a in mine for p in topo.connections(a.name)}
    return resolve(
        topo,
        mine={a.host for a in mine},
        dials=dials,
        rendezvous=opts.rendezvous,
        addresses=opts.addresses,
        advertise=opts.advertise,
        timeout_s=topo.run.runtime.connect_timeout_s,
    )


def parse_addresses(items: Sequence[str]) -> dict[str, str]:
    """``["edge=node01", …]`` → ``{"edge": "node01"}``; :class:`ConfigError` for a malformed item."""
    out: dict[str, str] = {}
    for item in items:
        host, sep, address = item.partition("=")
        if not sep or not host or not address:
            raise ConfigError(f"--address {item!r}: write HOST=ADDRESS, e.g. edge=node01.cluster")
        out[host] = address
    return out


def _hosts_used(topo: Topology, opts: NodeOptions) -> set[str]:
    """Hosts whose addresses this node binds or dials over tcp: its own actors' hosts and those
    of every addressed actor (a node may dial any of them)."""
    mine = select_actors(topo, opts.role, opts.name, opts.host)
    return {a.host for a in mine} | {a.host for a in topo.actors if a.addressed}


def run_node_process(opts: NodeOptions, *, prog: str = "sft-node") -> int:
    """Run the node's actors until they stop and return the exit code (see the module doc).

    Logging must be configured by the caller. Without ``outcome_file`` the outcome is printed
    on stdout as one JSON line (the shape ``sft run`` prints, see the module doc); problems go
    to stderr, each line prefixed with ``prog``. With it, :func:`write_outcome` records the
    outcome there instead.
    """
    if opts.threads is not None:
        import torch  # only a process that runs actors pays for importing torch here

        torch.set_num_threads(opts.threads)
    try:
        # Only this node's role needs its files here (an edge host holds no dataset).
        topo = _resolve(load_topology(opts.topology, roles=(opts.role,)), opts)
        if opts.resume_dir is not None and opts.role == "coordinator":
            check_resume_dir(opts.resume_dir, topology_schema_hash(topo))
        if opts.transport == "tcp":
            check_hosts(topo, hosts=_hosts_used(topo, opts))
        # The devices of the actors this node starts, before it starts any of them.
        check_placement(topo, actors=[a.name for a in select_actors(topo, opts.role, opts.name, opts.host)])
        result = asyncio.run(
            run_node(
                topo,
                opts.role,
                opts.name,
                host=opts.host,
                transport=opts.transport,
                roles=parse_role_overrides(list(opts.role_factories)),
                ipc_dir=opts.ipc_dir,
                timeout_s=opts.timeout_s,
                resume_dir=opts.resume_dir,
            )
        )
    except SftError as exc:
        _record(opts, RunResult(result=None, error=f"{type(exc).__name__}: {exc}"))
        _print_line(opts, failure_line(type(exc).__name__, str(exc)))
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (asyncio.CancelledError, KeyboardInterrupt) as exc:  # a second signal forced the stop
        _record(opts, RunResult(result=None, error="forced stop", signalled=True))
        _print_line(opts, failure_line(type(exc).__name__, "forced stop", status="interrupted"))
        print(f"{prog}: forced stop", file=sys.stderr)
        return EXIT_INTERRUPTED
    _record(opts, result)
    _print_line(opts, result.line())
    if not result.ok:
        print(f"{prog}: run {result.status}: {result.reason}", file=sys.stderr)
        for who, why in result.failures.items():
            print(f"{prog}: {who}: {why}", file=sys.stderr)
    for who, why in result.lost.items() if result.ok else ():
        print(f"{prog}: lost {who}: {why}", file=sys.stderr)
    return EXIT_CODES[result.status]


def _record(opts: NodeOptions, result: RunResult) -> None:
    if opts.outcome_file is not None:
        write_outcome(opts.outcome_file, result)


def _print_line(opts: NodeOptions, line: dict[str, object]) -> None:
    if opts.outcome_file is None:
        print(json.dumps(line, default=str), flush=True)


def write_outcome(path: Path, result: RunResult) -> None:
    """Write ``result`` as JSON (values JSON cannot hold are stringified)."""
    path.write_text(json.dumps(result.to_dict(), default=str), encoding="utf-8")


def read_outcome(path: Path) -> RunResult | None:
    """The outcome a node wrote to ``path``; None when it wrote none or a partial one (killed)."""
    try:
        return RunResult.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):  # json.JSONDecodeError is a ValueError
        return None


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``sft-node`` (cli/node.py; a test keeps the two equal) and ``--outcome-file``."""
    p = argparse.ArgumentParser(
        prog="python -m sft_actors.node_process",
        description="Run the actor(s) of one role from a topology file (the flags of sft-node).",
    )
    p.add_argument("--role", required=True, help="coordinator, server or device")
    p.add_argument("--topology", required=True, type=Path, help="topology TOML file")
    p.add_argument("--name", help="run only this [[actors]] entry (default: all of ROLE on this host)")
    p.add_argument("--host", help="which [[hosts]] entry this machine is")
    p.add_argument("--transport", choices=("tcp", "ipc"), default="tcp")
    p.add_argument("--ipc-dir", type=Path, help="socket directory shared by local processes (ipc)")
    p.add_argument("--role-factory", action="append", default=[], help="ROLE=package.module:Class")
    p.add_argument("--threads", type=int, help="torch intra-op threads for this process")
    p.add_argument("--timeout-s", type=float, help="stop the node after this many seconds")
    p.add_argument(
        "--resume", type=Path, metavar="RUN_DIR", help="continue this run from its last checkpoint"
    )
    p.add_argument("--rendezvous", type=Path, help="shared directory where auto-addressed hosts publish")
    p.add_argument("--address", action="append", default=[], help="HOST=ADDR for an address = auto host")
    p.add_argument("--advertise", help="the address this node publishes for its auto host (default: FQDN)")
    p.add_argument("--log-format", default="console", help="console or json")
    p.add_argument("--log-level", default="info", help="debug, info, warning or error")
    p.add_argument("--outcome-file", type=Path, help="write the outcome here as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the node, return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        log.configure(cast(log.LogFormat, args.log_format), args.log_level)
    except ValueError as exc:
        parser.error(str(exc))  # exits 2, like any other usage error
    opts = NodeOptions(
        role=args.role,
        topology=args.topology,
        name=args.name,
        host=args.host,
        transport=args.transport,
        ipc_dir=args.ipc_dir,
        role_factories=args.role_factory,
        threads=args.threads,
        timeout_s=args.timeout_s,
        outcome_file=args.outcome_file,
        resume_dir=args.resume,
        rendezvous=args.rendezvous,
        addresses=parse_addresses(args.address),
        advertise=args.advertise,
    )
    return run_node_process(opts, prog="sft-node")


if __name__ == "__main__":
    sys.exit(main())
