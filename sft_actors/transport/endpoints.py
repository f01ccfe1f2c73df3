"""Where each addressed actor listens, per transport.

``inproc://`` needs one shared zmq Context (one process), ``ipc://`` a directory every local
process agrees on, ``tcp://`` the host address and port from the topology. Port 0 binds an
ephemeral port; the actual endpoint is published here so that peers in the same process can
resolve it once it is known.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Literal

from sft_actors.errors import ConfigError, UnknownPeer
from sft_actors.topology import Topology
from sft_actors.topology.validate import is_loopback

Transport = Literal["inproc", "ipc", "tcp"]
TRANSPORTS: tuple[Transport, ...] = ("inproc", "ipc", "tcp")
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_IPC_PATH = 107


class Endpoints:
    """Bind and connect addresses of a topology's addressed actors for one transport."""

    def __init__(
        self, topology: Topology, transport: Transport, *, ipc_dir: str | Path | None = None, tag: str = ""
    ) -> None:
        if transport not in TRANSPORTS:
            raise ConfigError(f"unknown transport {transport!r}; use one of {', '.join(TRANSPORTS)}")
        if transport == "ipc" and ipc_dir is None:
            raise ConfigError("the ipc transport needs ipc_dir (a directory all local processes share)")
        self.topology = topology
        self.transport = transport
        self.ipc_dir = Path(ipc_dir) if ipc_dir is not None else None
        # inproc names are global to a Context; a tag keeps two runs sharing one apart.
        self.tag = tag or secrets.token_hex(4)
        self._bound: dict[str, str] = {}
        self._ready: dict[str, asyncio.Event] = {}

    def bind_address(self, name: str) -> str:
        spec = self.topology.actor(name)
        if not spec.addressed:
            raise UnknownPeer(f"{name!r} is a {spec.role}; only coordinators and servers listen")
        if self.transport == "inproc":
            return f"inproc://sft-{self.tag}-{name}"
        if self.transport == "ipc":
            assert self.ipc_dir is not None
            path = str(self.ipc_dir / f"{name}.sock")
            if len(path) > _MAX_IPC_PATH:
                raise ConfigError(
                    f"ipc path {path!r} is longer than {_MAX_IPC_PATH} bytes; use a shorter ipc_dir"
                )
            return f"ipc://{path}"
        address = self.topology.host(spec.host).address
        # A loopback host listens on loopback only; any other address on every interface (the
        # address peers dial may be a NAT's or a name that resolves elsewhere).
        interface = "127.0.0.1" if is_loopback(address) else "*"
        return f"tcp://{interface}:{spec.port or '*'}"

    def static_connect_address(self, name: str) -> str | None:
        """The address to dial, when it does not depend on an ephemeral port."""
        spec = self.topology.actor(name)
        if self.transport != "tcp":
            return self.bind_address(name)
        if not spec.port:
            return None
        address = self.topology.host(spec.host).address
        return f"tcp://{'127.0.0.1' if is_loopback(address) else address}:{spec.port}"

    def publish(self, name: str, endpoint: str) -> None:
        """Record where ``name`` actually listens (``LAST_ENDPOINT`` after bind)."""
        if endpoint.startswith("tcp://0.0.0.0:"):
            endpoint = "tcp://127.0.0.1:" + endpoint.rsplit(":", 1)[1]
        self._bound[name] = endpoint
        self._event(name).set()

    async def resolve(self, name: str) -> str:
        """Where to connect to ``name``; waits for an ephemeral port to be bound in this process."""
        static = self.static_connect_address(name)
        if static is not None:
            return static
        await self._event(name).wait()
        return self._bound[name]

    def _event(self, name: str) -> asyncio.Event:
        if name not in self._ready:
            self._ready[name] = asyncio.Event()
        return self._ready[name]
