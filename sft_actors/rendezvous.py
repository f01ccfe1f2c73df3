"""Addresses found when a run starts, not written down: ``address = "auto"`` hosts.

Under a scheduler (Slurm) a host is known only once the job is allocated. A topology may then
say ``address = "auto"`` for a host, and its nodes find each other through a **rendezvous
directory** on storage every node sees (a cluster's shared file system): a node publishes the
address of each auto host it runs on (``DIR/<host>.address``, written atomically: its own name
as the other nodes can dial it), and a node that dials an actor on an auto host waits, bounded,
for that file. An explicit ``--address HOST=ADDR`` (a launcher that knows the allocation) needs
no directory. Only explicit, dial-able addresses: never multicast discovery.

Resolution happens once, before the node's actors start: the node then runs the topology with
concrete addresses, so the rest of the runtime never sees ``auto``. Use a fresh directory per
launch: a file left by an earlier job would name where that job ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

from sft_actors.errors import ConfigError, PeerTimeout
from sft_actors.log import get_logger
from sft_actors.topology import Topology
from sft_actors.topology.schema import AUTO_ADDRESS
from sft_actors.topology.validate import is_loopback

AUTO = AUTO_ADDRESS
_POLL_S = 0.2
log = get_logger(component="rendezvous")


def auto_hosts(topo: Topology) -> frozenset[str]:
    """Names of the hosts whose address is found at start (``address = "auto"``)."""
    return frozenset(h.name for h in topo.hosts if h.address == AUTO)


def address_file(directory: Path, host: str) -> Path:
    return directory / f"{host}.address"


def advertised_address() -> str:
    """This machine's name as other machines dial it: its fully qualified host name, or, when
    that resolves only to loopback (a common /etc/hosts entry), the address of the interface
    that would route outward (no packet is sent: a UDP socket's connect only picks a route)."""
    name = socket.getfqdn()
    if not is_loopback(name) and not _resolves_to_loopback(name):
        return name
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: routable-looking, never reached
        return str(s.getsockname()[0])
    return name


def _resolves_to_loopback(name: str) -> bool:
    try:
        return all(is_loopback(str(info[4][0])) for info in socket.getaddrinfo(name, None))
    except OSError:
        return False


def publish(directory: Path, host: str, address: str) -> Path:
    """Record that ``host`` is reachable at ``address`` (atomic: readers never see half a file)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = address_file(directory, host)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(address + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def resolve(
    topo: Topology,
    *,
    mine: Collection[str],
    dials: Collection[str],
    rendezvous: Path | None = None,
    addresses: Mapping[str, str] | None = None,
    advertise: str | None = None,
    timeout_s: float,
    now: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Topology:
    """``topo`` with every auto host this node needs made concrete.

    ``mine``: the hosts this node's actors run on (published when auto, as ``advertise`` or
    this machine's name); ``dials``: the hosts of the actors it dials (read from ``addresses``,
    else waited for in ``rendezvous`` up to ``timeout_s`` seconds). Raises :class:`ConfigError`
    when an auto host has neither, :class:`PeerTimeout` when its file does not appear in time.
    """
    auto = auto_hosts(topo)
    given = dict(addresses or {})
    unknown = sorted(set(given) - {h.name for h in topo.hosts})
    if unknown:
        raise ConfigError(f"--address names hosts {unknown} that {topo.source} does not define")
    found: dict[str, str] = {h: a for h, a in given.items() if h in auto}
    for host in sorted(auto & set(mine)):
        address = found.setdefault(host, advertise or advertised_address())
        if rendezvous is not None and is_loopback(address) and not advertise:
            # /etc/hosts often maps a machine's own name to 127.0.x.1: nobody else could dial it.
            log.warning(
                "address_is_loopback",
                host=host,
                address=address,
                detail="other machines cannot dial it; pass --advertise ADDR (a name or IP they reach)",
            )
        if rendezvous is not None:
            log.info(
                "address_published", host=host, address=address, path=str(publish(rendezvous, host, address))
            )
    for host in sorted((auto & set(dials)) - set(found)):
        if rendezvous is None:
            raise ConfigError(
                f'host {host!r} has address = "auto": give this node --rendezvous DIR (shared storage '
                f"the node on {host!r} publishes to) or --address {host}=ADDR"
            )
        found[host] = _wait_for(rendezvous, host, timeout_s, now, sleep)
    if not found:
        return topo
    hosts = tuple(dataclasses.replace(h, address=found[h.name]) if h.name in found else h for h in topo.hosts)
    return dataclasses.replace(topo, hosts=hosts)


def on_this_machine(topo: Topology) -> Topology:
    """``topo`` with every auto host on loopback (a whole topology run on one machine)."""
    auto = auto_hosts(topo)
    return resolve(topo, mine=auto, dials=(), addresses=dict.fromkeys(auto, "127.0.0.1"), timeout_s=0.0)


def _wait_for(
    directory: Path, host: str, timeout_s: float, now: Callable[[], float], sleep: Callable[[float], None]
) -> str:
    path = address_file(directory, host)
    deadline = now() + timeout_s
    while True:
        try:
            address = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            address = ""
        if address:
            log.info("address_found", host=host, address=address)
            return address
        if now() >= deadline:
            raise PeerTimeout(
                f"no address for host {host!r} in {directory} after {timeout_s:g}s; did its node start "
                "with the same --rendezvous directory?"
            )
        sleep(_POLL_S)


__all__ = [
    "AUTO",
    "address_file",
    "advertised_address",
    "auto_hosts",
    "on_this_machine",
    "publish",
    "resolve",
]
