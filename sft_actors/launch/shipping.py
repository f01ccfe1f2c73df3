"""What each host receives before anything starts: the checkout, the topology, the keys.

Hosts that share an ssh target and a workdir are one destination and receive one copy. A
destination gets:

- the checkout (``--ship checkout``): the git checkout's tracked files, without ``.venv``,
  ``runs/``, ``keys/``, the key directory or the output directory;
- the topology file, always, at the path its nodes are given (see
  :func:`~sft_actors.launch.placement.topology_destination`);
- with ``[run.security] mode = "curve"``: every actor's public ``<actor>.key`` and only the
  ``<actor>.key_secret`` files of the actors its hosts run (mode 0600, in a 0700 directory).

A local destination (empty ``ssh``) whose workdir is where a file already is gets no copy of
it. Pure apart from checking that the source files exist.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sft_actors.launch.procs import LaunchConfigError
from sft_actors.security import PUBLIC_SUFFIX, SECRET_SUFFIX
from sft_actors.topology import HostSpec, Topology

#: Never shipped from the checkout (top-level names): environments, outputs, keys.
EXCLUDED_TOP = frozenset({".venv", "runs", "keys", ".git"})
PUBLIC_MODE = 0o644
SECRET_MODE = 0o600


@dataclass(frozen=True, kw_only=True, slots=True)
class FileCopy:
    source: Path
    #: Relative to the destination's workdir (the topology) or key directory (keys).
    dest: str
    mode: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Shipment:
    """What one destination (an ssh target and a workdir, shared by ``hosts``) receives."""

    target: str
    workdir: str
    hosts: tuple[str, ...]
    code: bool
    topology: FileCopy | None
    key_dir: str | None
    keys: tuple[FileCopy, ...]

    @property
    def local(self) -> bool:
        return not self.target

    @property
    def where(self) -> str:
        return f"{self.target}:{self.workdir}" if self.target else f"{self.workdir} (local)"


def local_dir(workdir: str, cwd: Path) -> Path:
    """A local host's workdir as an absolute path (``~`` expanded, relative to ``cwd``)."""
    return (cwd / os.path.expanduser(workdir)).resolve()


def plan_shipments(
    topo: Topology,
    *,
    topology_path: Path,
    topology_dest: str,
    ship_code: bool,
    checkout: Path,
    cwd: Path,
) -> list[Shipment]:
    """One :class:`Shipment` per destination, in the order the topology lists its hosts.

    Raises :class:`LaunchConfigError` when a key file the run needs is missing here.
    """
    groups: dict[tuple[str, str], list[HostSpec]] = {}
    for host in topo.hosts:
        if any(a.host == host.name for a in topo.actors):
            where = host.workdir if host.ssh else str(local_dir(host.workdir, cwd))
            groups.setdefault((host.ssh, where), []).append(host)
    out = []
    for (target, _), specs in groups.items():
        workdir, hosts = specs[0].workdir, [h.name for h in specs]
        here = None if target else local_dir(workdir, cwd)
        topology: FileCopy | None = FileCopy(source=topology_path, dest=topology_dest, mode=PUBLIC_MODE)
        if here is not None and _same(here / topology_dest, topology_path):
            topology = None
        key_dir, keys = _keys(topo, hosts, cwd=cwd, here=here)
        code = ship_code and not (here is not None and here == checkout.resolve())
        out.append(
            Shipment(
                target=target,
                workdir=workdir,
                hosts=tuple(hosts),
                code=code,
                topology=topology,
                key_dir=key_dir,
                keys=keys,
            )
        )
    return out


def _keys(
    topo: Topology, hosts: Iterable[str], *, cwd: Path, here: Path | None
) -> tuple[str | None, tuple[FileCopy, ...]]:
    """The key directory and files a destination needs (none without CURVE)."""
    security = topo.run.security
    if security.mode != "curve":
        return None, ()
    source_dir = cwd / security.keys
    mine = {a.name for a in topo.actors if a.host in set(hosts)}
    files = [(a.name + PUBLIC_SUFFIX, PUBLIC_MODE) for a in topo.actors]
    files += [(a.name + SECRET_SUFFIX, SECRET_MODE) for a in topo.actors if a.name in mine]
    missing = [name for name, _ in files if not (source_dir / name).is_file()]
    if missing:
        raise LaunchConfigError(
            f"missing key file {source_dir / missing[0]} ([run.security] keys = {security.keys!r}, "
            f"relative to {cwd}); run: sft keys generate {topo.source} --out {security.keys}"
        )
    copies = tuple(FileCopy(source=source_dir / name, dest=name, mode=mode) for name, mode in files)
    if here is not None and _same(here / security.keys, source_dir):
        return security.keys, ()
    return security.keys, copies


def _same(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def shippable(paths: Iterable[str], *, also_excluded: Iterable[str] = ()) -> list[str]:
    """The checkout files worth shipping: ``paths`` (relative, from ``git ls-files``) without
    those under :data:`EXCLUDED_TOP` or under any of ``also_excluded`` (relative directories,
    e.g. the key and output directories)."""
    extra = [PurePosixPath(p).parts for p in also_excluded if p and not PurePosixPath(p).is_absolute()]
    extra = [parts for parts in extra if parts and ".." not in parts]
    keep = []
    for path in paths:
        parts = PurePosixPath(path).parts
        if not parts or parts[0] in EXCLUDED_TOP:
            continue
        if any(parts[: len(e)] == e for e in extra):
            continue
        keep.append(path)
    return keep


__all__ = [
    "EXCLUDED_TOP",
    "PUBLIC_MODE",
    "SECRET_MODE",
    "FileCopy",
    "Shipment",
    "local_dir",
    "plan_shipments",
    "shippable",
]
