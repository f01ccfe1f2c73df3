"""Liveness on top of the wiring: heartbeats, the watchdog, lost peers, re-dial and return.

Every ``heartbeat_interval_s`` an actor beats on each link; a peer silent for
``heartbeat_timeout_s`` (or whose connection the ROUTER reports gone) is *lost*: what was
pending on it fails at once (:class:`~sft_actors.errors.PeerLost`), a link this actor dialled
is re-dialled (HELLO until WELCOME, for ``rejoin_timeout_s``), and ``on_peer_lost`` runs. By
default losing the coordinator or a server means waiting, bounded, for it to come back
(restarted or resumed after a pause); the coordinator overrides the hook to manage devices.
All of it runs on ``env.clock``, so tests drive it with a ManualClock.
"""

from __future__ import annotations

import asyncio
import time

import zmq

from sft_actors.actors.core import ActorCore
from sft_actors.actors.env import ActorEnv
from sft_actors.actors.peers import LinkState, PeerLink
from sft_actors.actors.tasks import first_completed
from sft_actors.errors import PeerTimeout, UnknownPeer
from sft_actors.topology import ActorSpec
from sft_actors.wire.envelope import encode
from sft_actors.wire.messages import Heartbeat, Welcome


class LiveActor(ActorCore):
    """An :class:`ActorCore` whose links are watched (subclass :class:`Actor`, not this)."""

    def __init__(self, spec: ActorSpec, env: ActorEnv) -> None:
        super().__init__(spec, env)
        self._redials: dict[str, asyncio.Task[None]] = {}  # peer -> its re-dial, one at a time

    async def on_peer_lost(self, peer: str) -> None:
        """``peer`` went silent for ``heartbeat_timeout_s`` or its connection dropped.

        A lost coordinator or server may come back (restarted, or resumed after a pause): wait
        up to ``rejoin_timeout_s`` for it (links this actor dialled are re-dialled meanwhile),
        then fail the actor. Losing a device is the coordinator's business (it overrides this)."""
        if peer != self.name and self.topology.actor(peer).addressed:
            await self.await_return(peer)

    async def await_return(self, peer: str) -> None:
        """Wait until ``peer``'s link is established again; :class:`PeerTimeout` after
        ``rejoin_timeout_s`` on the actor's clock."""
        budget = self.settings.rejoin_timeout_s
        deadline = self.clock.now() + budget
        while self._links[peer].state is not LinkState.ESTABLISHED:
            if self.clock.now() >= deadline:
                raise PeerTimeout(
                    f"{peer} was lost and did not come back within rejoin_timeout_s = {budget}s; "
                    f"check that it is running and reachable (restart a coordinator with "
                    f"--resume RUN_DIR to continue the run)"
                )
            self._peer_change.clear()
            await first_completed(self._peer_change.wait(), self.clock.sleep_until(deadline))
        self.log.info("peer_returned", peer=peer)

    # --- liveness ---------------------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        seq = 0
        while True:
            seq += 1
            beat = Heartbeat(node=self.name, seq=seq, sent_at_ns=time.time_ns())
            for link in list(self._links.values()):
                if link.state in (LinkState.ESTABLISHED, LinkState.LOST):
                    was_established = link.state is LinkState.ESTABLISHED
                    # Heartbeats bypass link emulation: they model the control channel, and a
                    # 40 MB activation on a slow link must not look like a dead peer.
                    try:
                        await link.send(encode(beat, sender=self.name, msg_id=next(self._ids)), paced=False)
                    except UnknownPeer:
                        # The ROUTER says the peer's connection is gone (e.g. its process was
                        # killed): that is a lost peer too, known before the silence timeout.
                        if was_established:
                            self._lost(link, reason="disconnected")
                    except zmq.ZMQError:
                        pass
            await self.clock.sleep(self.settings.heartbeat_interval_s)

    async def _watchdog_loop(self) -> None:
        timeout = self.settings.heartbeat_timeout_s
        while True:
            await self.clock.sleep(min(self.settings.heartbeat_interval_s, timeout / 4))
            now = self.clock.now()
            for link in list(self._links.values()):
                if link.state is LinkState.ESTABLISHED and now - link.last_seen > timeout:
                    self._lost(link, reason="silent")

    def _peer_forgot_us(self, link: PeerLink) -> None:
        self._lost(link, reason="restarted")

    def _lost(self, link: PeerLink, *, reason: str) -> None:
        """Mark ``link`` lost, log it once, fail what is pending on it, re-dial it when this
        actor dialled it, and tell the subclass (``on_peer_lost``)."""
        link.state = LinkState.LOST
        self._peer_change.set()
        if self._closing:  # stopping anyway: nothing to wait for or to re-dial
            self._fail_pending(link.peer, f"{link.peer} was lost ({reason}) while {self.name} stopped")
            return
        silent_s = round(self.clock.now() - link.last_seen, 3)
        self.log.warning("peer_lost", peer=link.peer, reason=reason, silent_s=silent_s)
        self._fail_pending(link.peer, f"{link.peer} was lost ({reason}, silent for {silent_s}s)")
        self._start_redial(link)
        self._spawn(self.on_peer_lost(link.peer))

    async def on_peer_left(self, peer: str) -> None:
        """``peer`` said BYE. A coordinator or server that leaves may be restarted (a server
        stopped by hand, say): re-dial it and wait for it as for a lost one."""
        if peer != self.name and self.topology.actor(peer).addressed and not self._closing:
            self._start_redial(self._links[peer])
            await self.await_return(peer)

    def _start_redial(self, link: PeerLink) -> None:
        """Re-dial ``link`` when this actor dialled it (one re-dial per link at a time)."""
        redial = self._redials.get(link.peer)
        if link.dialled and not self._closing and (redial is None or redial.done()):
            self._redials[link.peer] = self._spawn(self._redial(link))

    async def _redial(self, link: PeerLink) -> None:
        """HELLO again, every ``heartbeat_interval_s``, until the peer (a restarted process or
        the same one after a pause) answers WELCOME; gives up after ``rejoin_timeout_s``.

        Traffic alone is not enough: a restarted process rejects everything before HELLO."""
        hello = self._hello()
        interval = self.settings.heartbeat_interval_s
        deadline = self.clock.now() + self.settings.rejoin_timeout_s
        while self.clock.now() < deadline and not self._closing and self._links.get(link.peer) is link:
            attempt = asyncio.ensure_future(self._request(link, hello))
            pause = asyncio.ensure_future(self.clock.sleep(interval))
            try:
                await asyncio.wait({attempt, pause}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for fut in (attempt, pause):
                    if not fut.done():
                        fut.cancel()
                await asyncio.gather(attempt, pause, return_exceptions=True)  # lost again: retry
            if not attempt.cancelled() and attempt.exception() is None:
                env = attempt.result()
                if isinstance(env.msg, Welcome) and env.msg.schema_hash == self.env.schema_hash:
                    link.set_window(max(1, min(self.settings.link_window, env.msg.credits)))
                    if link.state is not LinkState.ESTABLISHED:
                        self._established(link)
                    self.log.info("peer_redialled", peer=link.peer)
                    return
                await self.clock.sleep(interval)  # refused (say, still starting): try again
