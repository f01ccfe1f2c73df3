"""What the runtime hands every actor: topology, zmq context, endpoints, offload pool, clock."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import zmq.asyncio

from sft_actors.clock import SYSTEM_CLOCK, Clock
from sft_actors.topology import ActorSpec, Topology
from sft_actors.transport.auth import CurveAuth
from sft_actors.transport.endpoints import Endpoints
from sft_actors.transport.sockets import SocketOptions
from sft_actors.wire.envelope import WireLimits
from sft_actors.wire.schema import schema_hash

if TYPE_CHECKING:
    from sft_actors.actors.base import Actor


@dataclass(kw_only=True, frozen=True, slots=True)
class ActorEnv:
    topology: Topology
    ctx: zmq.asyncio.Context
    endpoints: Endpoints
    #: Bounded thread pool for CPU-heavy work (codec, tensor copies): ``Actor.offload``.
    executor: Executor
    limits: WireLimits
    schema_hash: str
    #: Time source of heartbeats, the liveness watchdog and link pacing. Tests pass a
    #: ``ManualClock`` (``dataclasses.replace(env, clock=...)``) to drive time themselves.
    clock: Clock = SYSTEM_CLOCK
    #: ``--resume RUN_DIR``: continue the run from RUN_DIR's last complete checkpoint (the
    #: coordinator reads it); None starts a new run. The runtime checks it holds ``checkpoints``.
    resume_dir: Path | None = None
    #: MAXMSGSIZE and high-water marks of every socket (``actors.budget``).
    sockets: SocketOptions = field(default_factory=SocketOptions)
    #: CURVE (``[run.security] mode = "curve"`` over tcp/ipc): ZAP handler and keys; None = none.
    auth: CurveAuth | None = None


#: Builds the actor for one ``[[actors]]`` entry. An ``Actor`` subclass is itself a factory.
ActorFactory = Callable[[ActorSpec, ActorEnv], "Actor"]


def topology_schema_hash(topology: Topology) -> str:
    """The HELLO schema hash every actor of ``topology`` presents."""
    return schema_hash(**topology.schema_parts())


def wire_limits(topology: Topology) -> WireLimits:
    return WireLimits(max_message_bytes=int(topology.run.runtime.max_message_mb * 2**20))
