"""Where each node runs and the command that starts it: a pure function of the topology.

One node process per (host, role) pair — ``python -m sft_actors.node_process --role R --host H``
(the flags of ``sft-node``) runs every actor of that role placed on that host. Addressed roles
(coordinator, then servers) come first so that devices find them listening; devices last.
Within a role, hosts keep the order in which the topology's actors first name them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from sft_actors.topology import ADDRESSED_ROLES, ROLES, HostSpec, Topology

#: The module every node runs (the entry point of ``sft-node``, without typer).
NODE_MODULE = "sft_actors.node_process"
#: Where a topology from outside the launching directory goes in each workdir.
OUTSIDE_DIR = ".sft"
#: Interpreter on an ssh host, relative to its workdir (``bin/_setup.sh`` creates it).
DEFAULT_REMOTE_PYTHON = ".venv/bin/python"


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeSpec:
    """One node process: which host runs it, which actors it holds, its argv (run in workdir)."""

    host: HostSpec
    role: str
    actors: tuple[str, ...]
    argv: tuple[str, ...]

    @property
    def label(self) -> str:
        """``<host>-<role>``: the node's log file is ``LOGS/<label>.log``."""
        return f"{self.host.name}-{self.role}"

    @property
    def local(self) -> bool:
        """An empty ``ssh`` target runs the node on the launching machine."""
        return not self.host.ssh

    @property
    def where(self) -> str:
        """``edge (ssh sft@edge)`` or ``edge (local, /srv/sft)`` for progress lines."""
        how = f"local, {self.host.workdir}" if self.local else f"ssh {self.host.ssh}"
        return f"{self.host.name} ({how})"


def node_argv(
    python: str,
    topology: str,
    role: str,
    host: str,
    *,
    threads: int | None = None,
) -> list[str]:
    """The command of one node: every actor of ``role`` on ``host``, tcp, JSON logs."""
    argv = [python, "-m", NODE_MODULE, "--role", role, "--topology", topology, "--host", host]
    argv += ["--transport", "tcp", "--log-format", "json"]
    if threads is not None:
        argv += ["--threads", str(threads)]
    return argv


def placement(
    topo: Topology,
    *,
    topology: str,
    remote_python: str = DEFAULT_REMOTE_PYTHON,
    local_python: str,
    threads: int | None = None,
) -> list[NodeSpec]:
    """The node processes of ``topo`` in start order (coordinator, servers, then devices).

    ``topology`` is the topology file's path as the nodes see it (relative to their workdir);
    ``remote_python`` runs on ssh hosts, ``local_python`` on hosts with an empty ``ssh``.
    """
    nodes: list[NodeSpec] = []
    for role in sorted(ROLES, key=lambda r: r not in ADDRESSED_ROLES):  # stable: coordinator, server
        hosts: dict[str, list[str]] = {}
        for actor in topo.by_role(role):
            hosts.setdefault(actor.host, []).append(actor.name)
        for host_name, actors in hosts.items():
            host = topo.host(host_name)
            python = local_python if not host.ssh else remote_python
            argv = node_argv(python, topology, role, host_name, threads=threads)
            nodes.append(NodeSpec(host=host, role=role, actors=tuple(actors), argv=tuple(argv)))
    return nodes


def topology_destination(path: str, cwd: str) -> str:
    """Where the nodes find the topology, relative to their workdir: the same relative path
    as here when ``path`` lies under ``cwd`` (e.g. ``topologies/lab.toml``), else its file
    name under ``.sft/`` in the workdir (never over a file of the checkout, such as a topology
    that happens to be called ``pyproject.toml``). Paths are POSIX (the hosts are)."""
    p = PurePosixPath(path)
    if p.is_absolute():
        try:
            p = p.relative_to(PurePosixPath(cwd))
        except ValueError:
            return f"{OUTSIDE_DIR}/{p.name}"
    parts = [part for part in p.parts if part not in ("", ".")]
    if not parts or ".." in parts:
        return f"{OUTSIDE_DIR}/{PurePosixPath(path).name}"
    return str(PurePosixPath(*parts))


__all__ = [
    "DEFAULT_REMOTE_PYTHON",
    "NODE_MODULE",
    "NodeSpec",
    "node_argv",
    "placement",
    "topology_destination",
]
