"""The topology as a cluster runs it: one host per node, each addressed at its Service.

``sft launch --backend k8s`` runs every node — one per (host, role), as :mod:`.placement`
places them — in a pod of its own. A Kubernetes Service routes all of its ports to the same
pods, so two nodes of one topology host (say the coordinator and the server of ``edge``) in
two pods cannot share that host's address. The topology the pods read (the ConfigMap's)
therefore gives each node its own host, named ``<host>-<role>``:

- a node with addressed actors (coordinator, servers) is at its Service's DNS name (``<svc>``,
  or ``<svc>.<namespace>.svc`` when a namespace is named), where it binds every interface;
- a node of devices only is ``address = "auto"``: nothing dials it.

Every ``[[actors]]`` table names its node's host; everything else is the user's file, value
for value (re-emitted as TOML: comments do not survive). Host names, ports and addresses are
not part of the schema hash the HELLO handshake compares, so a cluster run and a run of the
original file agree on everything that matters to the wire and to ``--resume``.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sft_actors.launch.placement import placement
from sft_actors.launch.procs import LaunchConfigError
from sft_actors.topology import ADDRESSED_ROLES, Topology
from sft_actors.topology.schema import AUTO_ADDRESS

#: DNS-1035 label: Service names (and every other name here, for uniformity).
_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_MAX_LABEL = 63
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
#: Keys of ConfigMap and Secret data (file names in the mounted volume).
_DATA_KEY = re.compile(r"[-._a-zA-Z0-9]+")


def dns_label(*parts: str) -> str:
    """``parts`` joined with ``-`` as a DNS-1035 label (lowercase, at most 63 characters,
    starting with a letter): invalid characters become ``-``; a name too long keeps a hash of
    the whole so two long names stay apart."""
    raw = "-".join(parts)
    name = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]", "-", raw.lower())).strip("-")
    if not name or not name[0].isalpha():
        name = f"sft-{name}".rstrip("-")
    if len(name) > _MAX_LABEL:
        digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
        name = f"{name[: _MAX_LABEL - 9].rstrip('-')}-{digest}"
    assert _DNS_LABEL.fullmatch(name), name
    return name


def data_key(name: str) -> str:
    """``name`` as a ConfigMap/Secret key, or :class:`LaunchConfigError` (actor names may hold
    letters Kubernetes refuses there)."""
    if not _DATA_KEY.fullmatch(name):
        raise LaunchConfigError(
            f"{name!r} cannot name a file in a Kubernetes Secret or ConfigMap; use ASCII letters, "
            "digits, '-', '_' or '.'"
        )
    return name


@dataclass(frozen=True, kw_only=True, slots=True)
class ClusterNode:
    """One node (host, role) as a pod: its names in the cluster and in the ConfigMap's topology."""

    host: str
    role: str
    actors: tuple[str, ...]
    #: TCP ports its addressed actors bind (empty for devices).
    ports: tuple[int, ...]
    #: The Job's, the Service's and the pod label's name (a DNS-1035 label).
    name: str
    #: Its host in the ConfigMap's topology: ``<host>-<role>``.
    cluster_host: str
    #: That host's address: the Service's DNS name, or ``auto`` for devices.
    address: str

    @property
    def label(self) -> str:
        """``<host>-<role>``, as :class:`~sft_actors.launch.placement.NodeSpec` names it."""
        return f"{self.host}-{self.role}"

    @property
    def addressed(self) -> bool:
        return self.role in ADDRESSED_ROLES


def cluster_nodes(topo: Topology, *, namespace: str | None) -> list[ClusterNode]:
    """The nodes of ``topo`` in start order, named for the cluster.

    Raises :class:`LaunchConfigError` for an addressed actor without a fixed port, and when
    two nodes' names collide once made DNS labels.
    """
    run = topo.run.name
    nodes: list[ClusterNode] = []
    for spec in placement(topo, topology="-", local_python="python"):
        ports: list[int] = []
        for actor in (topo.actor(a) for a in spec.actors):
            if actor.addressed and not actor.port:
                raise LaunchConfigError(
                    f"[[actors]] {actor.name!r}: a Service needs a fixed port; set port = 1..65535"
                )
            if actor.port:
                ports.append(actor.port)
        name = dns_label(run, spec.host.name, spec.role)
        addressed = spec.role in ADDRESSED_ROLES
        address = (name if namespace is None else f"{name}.{namespace}.svc") if addressed else AUTO_ADDRESS
        nodes.append(
            ClusterNode(
                host=spec.host.name,
                role=spec.role,
                actors=spec.actors,
                ports=tuple(ports) if addressed else (),
                name=name,
                cluster_host=spec.label,
                address=address,
            )
        )
    seen: dict[str, str] = {}
    for n in nodes:
        if n.name in seen:
            raise LaunchConfigError(
                f"nodes {seen[n.name]!r} and {n.label!r} both become {n.name!r} in Kubernetes; "
                "rename one of the hosts"
            )
        seen[n.name] = n.label
    return nodes


def cluster_topology(
    data: Mapping[str, Any], topo: Topology, nodes: list[ClusterNode], *, allow_insecure: bool = False
) -> dict[str, Any]:
    """The parsed TOML document ``data`` (of ``topo``) with one ``[[hosts]]`` table per node and
    each actor on its node's host; ``allow_insecure`` sets ``[run.security] allow_insecure``."""
    doc = copy.deepcopy(dict(data))
    doc["hosts"] = [{"name": n.cluster_host, "address": n.address} for n in nodes]
    where = {(n.host, n.role): n.cluster_host for n in nodes}
    actors = doc.get("actors", [])
    for table, actor in zip(actors, topo.actors, strict=True):
        table["host"] = where[(actor.host, actor.role)]
    if allow_insecure:
        doc.setdefault("run", {}).setdefault("security", {})["allow_insecure"] = True
    return doc


# --- TOML out ------------------------------------------------------------------------------


def dumps_toml(doc: Mapping[str, Any], *, header: str = "") -> str:
    """``doc`` (what :func:`tomllib.loads` returns for a topology) as TOML text that loads back
    to an equal document: tables as ``[a.b]``, arrays of tables as ``[[a]]``, the tables inside
    those inline. ``header`` lines become comments at the top."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    _table(lines, (), doc)
    text = "\n".join(lines).strip("\n") + "\n"
    if tomllib.loads(text) != doc:  # pragma: no cover - a bug here, never the user's file
        raise AssertionError("TOML writer: the text does not load back to the same document")
    return text


def _table(lines: list[str], path: tuple[str, ...], table: Mapping[str, Any]) -> None:
    subtables, arrays = [], []
    for key, value in table.items():
        if _is_table(value):
            subtables.append(key)
        elif _is_table_array(value):
            arrays.append(key)
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    for key in subtables:
        sub = table[key]
        # A table holding only tables needs no header of its own ([run.codec] for [run.codec.up]).
        if any(not _is_table(v) and not _is_table_array(v) for v in sub.values()):
            lines += ["", f"[{'.'.join(_key(k) for k in (*path, key))}]"]
        _table(lines, (*path, key), sub)
    for key in arrays:
        for element in table[key]:
            lines += ["", f"[[{'.'.join(_key(k) for k in (*path, key))}]]"]
            lines += [f"{_key(k)} = {_value(v)}" for k, v in element.items()]


def _is_table(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):  # the loader refuses them; say so rather than write nan
            raise ValueError(f"cannot write {value!r} to a topology")
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(f"a topology holds no {type(value).__name__} values: {value!r}")


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


__all__ = ["ClusterNode", "cluster_nodes", "cluster_topology", "data_key", "dns_label", "dumps_toml"]
