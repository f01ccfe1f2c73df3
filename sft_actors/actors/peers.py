"""One link to a named peer: its socket route, credit window, pacing and liveness.

An actor reaches a peer either through its own DEALER to the peer's ROUTER (it dialled),
or through its ROUTER back to the peer's DEALER (the peer dialled; the route is the peer's
routing id). Either way sends go through :meth:`PeerLink.send`, which applies the emulated
link (when the topology gives one) and turns ROUTER_MANDATORY's EHOSTUNREACH into
:class:`UnknownPeer`. ``last_seen`` is read from the link's :class:`~sft_actors.clock.Clock`,
the same clock the actor's liveness watchdog compares it with.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Sequence
from typing import Any

import zmq
import zmq.asyncio

from sft_actors.clock import SYSTEM_CLOCK, Clock
from sft_actors.errors import FrameTooLarge, UnknownPeer
from sft_actors.topology import Topology
from sft_actors.transport.link import LinkRate, PacedSender, Pacer


class LinkState(enum.Enum):
    CONNECTING = "connecting"  # dialled, HELLO sent, no WELCOME yet
    ESTABLISHED = "established"
    LOST = "lost"  # no traffic for heartbeat_timeout_s
    GONE = "gone"  # said BYE, or its socket closed


class PeerLink:
    def __init__(
        self,
        *,
        peer: str,
        socket: zmq.asyncio.Socket,
        route: Sequence[bytes] = (),
        dialled: bool,
        window: int,
        pacer: Pacer | None = None,
        clock: Clock = SYSTEM_CLOCK,
        max_frame: int = 0,
    ) -> None:
        self.peer = peer
        #: The run's frame budget (bytes, 0 = none): the peer's socket drops a connection that
        #: sends more, so a frame over it fails here, loudly, instead of as a silent reconnect.
        self.max_frame = max_frame
        self.socket = socket
        self.route = list(route)
        self.dialled = dialled
        self.state = LinkState.CONNECTING
        self.credits = asyncio.Semaphore(window)
        self.window = window
        self.clock = clock
        #: When traffic last arrived from the peer (seconds on ``clock``).
        self.last_seen = clock.now()
        self.bytes_out = 0
        self.bytes_in = 0
        self.messages_in = 0
        self.paced: PacedSender | None = None
        #: The peer's process session (its HELLO's ``session``); "" until known.
        self.session = ""
        if pacer is not None:
            self.paced = PacedSender(pacer.rate, self._send_now, pacer=pacer)

    @property
    def alive(self) -> bool:
        return self.state in (LinkState.ESTABLISHED, LinkState.CONNECTING)

    def set_window(self, window: int) -> None:
        """Shrink or grow the credit window (only before any request is in flight)."""
        self.credits = asyncio.Semaphore(window)
        self.window = window

    def seen(self, nbytes: int) -> None:
        self.last_seen = self.clock.now()
        self.bytes_in += nbytes
        self.messages_in += 1

    async def send(self, frames: Sequence[Any], *, paced: bool = True) -> None:
        """Send one message; waits for the emulated link's transmission time when paced."""
        if self.paced is not None and paced:
            await self.paced.send(frames)
        else:
            await self._send_now(frames)

    async def _send_now(self, frames: Sequence[Any]) -> None:
        if self.max_frame:
            biggest = max(memoryview(f).nbytes for f in frames)
            if biggest > self.max_frame:
                raise FrameTooLarge(
                    f"a {biggest}-byte frame to {self.peer} exceeds the run's frame budget of "
                    f"{self.max_frame} bytes (from the model and plan; [run.runtime] max_message_mb caps it)"
                )
        try:
            await self.socket.send_multipart([*self.route, *frames], copy=False)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                self.state = LinkState.GONE
                raise UnknownPeer(
                    f"peer {self.peer!r} is not connected (it left or never said HELLO)"
                ) from exc
            raise
        self.bytes_out += sum(memoryview(f).nbytes for f in frames)


def link_rate(topology: Topology, me: str, peer: str) -> LinkRate | None:
    """The emulated direction me → peer: a device's uplink, or the downlink to a device."""
    mine, theirs = topology.actor(me), topology.actor(peer)
    if mine.role == "device":
        profile, rate = mine.link, mine.link.uplink_mbps
    elif theirs.role == "device":
        profile, rate = theirs.link, theirs.link.downlink_mbps
    else:
        return None
    lr = LinkRate(rate_mbps=rate, latency_s=profile.rtt_ms / 2000.0)
    return lr if lr.is_paced else None


class Pacers:
    """The emulated links of one actor: a pacer per peer, or None where the link is not paced.

    A device has one radio: its uplink's rate is shared by all of its links (one pacer)."""

    def __init__(self, topology: Topology, me: str, clock: Clock) -> None:
        self._topology = topology
        self._me = me
        self._clock = clock
        self._is_device = topology.actor(me).role == "device"
        self._uplink: Pacer | None = None

    def for_peer(self, peer: str) -> Pacer | None:
        rate = link_rate(self._topology, self._me, peer)
        if rate is None:
            return None
        if not self._is_device:
            return Pacer(rate, self._clock)
        if self._uplink is None:
            self._uplink = Pacer(rate, self._clock)
        return self._uplink
