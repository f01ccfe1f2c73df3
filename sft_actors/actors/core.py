"""The wiring under every actor: state, links to peers, the inbound path and liveness.

:class:`ActorCore` owns what arrives on the sockets: a ROUTER peer's HELLO is checked and
answered (WELCOME, or ERROR naming the mismatch), replies resolve pending calls directly
(never through the mailbox, so a handler awaiting a call cannot deadlock its own actor),
heartbeats refresh liveness, SHUTDOWN/BYE drive the lifecycle, and everything else goes
through the bounded mailbox to the typed handlers. Garbage never stops the actor; who may
speak, as whom, how much, and who hears ERROR back is :class:`~.guard.InboundGuard`'s call.
Receive loops yield after a bounded batch (a flood cannot starve heartbeats). Liveness and
pacing run on ``env.clock``. :class:`~.base.Actor` adds the lifecycle and the public API.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import secrets
from collections.abc import Mapping
from typing import Any, ClassVar

import zmq
import zmq.asyncio

from sft_actors.actors.env import ActorEnv
from sft_actors.actors.guard import InboundGuard
from sft_actors.actors.handlers import HandlerSpec, MsgContext
from sft_actors.actors.peers import LinkState, Pacers, PeerLink
from sft_actors.errors import (
    NotWelcomed,
    PeerLost,
    ProtocolError,
    ProtocolViolation,
    SftError,
    UnknownPeer,
    VersionMismatch,
)
from sft_actors.log import get_logger
from sft_actors.topology import ActorSpec
from sft_actors.wire.envelope import Envelope, decode, encode, encode_error
from sft_actors.wire.kinds import MsgKind
from sft_actors.wire.message import Message, Request
from sft_actors.wire.messages import Error, Hello, Shutdown, Welcome
from sft_actors.wire.schema import check_schema

#: Messages one receive loop takes before it yields: pyzmq returns queued messages without
#: awaiting anything, so without this a flood would keep heartbeats and handlers from running.
FAIR_BATCH = 16


class ActorState(enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class ActorCore:
    """State, links and the inbound path of an actor (subclass :class:`Actor`, not this)."""

    _handlers: ClassVar[Mapping[MsgKind, HandlerSpec]] = {}
    #: Handlers running at once. 1 keeps each peer's messages handled in arrival order.
    handler_concurrency: ClassVar[int] = 1

    def __init__(self, spec: ActorSpec, env: ActorEnv) -> None:
        self.spec = spec
        self.env = env
        self.name = spec.name
        self.topology = env.topology
        self.settings = env.topology.run.runtime
        #: Time source of heartbeats, the watchdog, ``last_seen`` and link pacing (seconds).
        self.clock = env.clock
        self.log = get_logger(actor=spec.name, role=spec.role)
        self.state = ActorState.CREATED
        self.error: BaseException | None = None
        #: What a coordinator's run produced (``stop_run(result)`` or ``run()``'s return value).
        self.result: Any = None
        #: How the run ended, as the coordinator's SHUTDOWN said ({"status", "reason"}).
        self.run_verdict: dict[str, str] | None = None
        self._links: dict[str, PeerLink] = {}
        self._router: zmq.asyncio.Socket | None = None
        self._dealers: list[zmq.asyncio.Socket] = []
        self._pending: dict[int, tuple[str, asyncio.Future[Envelope]]] = {}
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task[Any]] = []
        self._tg: asyncio.TaskGroup | None = None
        self._mailbox: asyncio.Queue[tuple[Envelope, MsgContext]] = asyncio.Queue(self.settings.mailbox_size)
        self._started = asyncio.Event()  # set once ready, or once start-up failed
        self._peer_change = asyncio.Event()
        self._stop = asyncio.Event()
        self._stop_reason = ""
        self._finishing_run = False
        self.ready_reached = False  # became READY once: a later failure is no start failure
        self._closing = False
        self._pacers = Pacers(env.topology, spec.name, env.clock)
        #: This process's session of the actor: peers tell a restart from a re-dial by it.
        self.session_id = secrets.token_hex(8)
        self._sock_opts = env.sockets
        secure, window = env.auth is not None, self.settings.link_window
        self._guard = InboundGuard(
            spec.name, env.topology, secure=secure, window=window, now=self.clock.now, log=self.log
        )

    @property
    def refused(self) -> list[tuple[str, SftError]]:
        """The last refused handshakes (peer, error), oldest first."""
        return list(self._guard.refused)

    # --- liveness hooks (overridden by actors) ----------------------------------------------
    async def on_peer_joined(self, peer: str) -> None:
        """A peer completed the handshake (either direction)."""

    async def on_peer_left(self, peer: str) -> None:
        """``peer`` said BYE."""

    async def on_handshake_refused(self, peer: str, exc: SftError) -> None:
        """A peer's HELLO was refused (already logged and recorded in ``self.refused``)."""

    # --- links and sending ------------------------------------------------------------------
    @property
    def peers(self) -> list[str]:
        """Peers with an established (or, until detected lost, live) link."""
        return [p for p, link in self._links.items() if link.state is LinkState.ESTABLISHED]

    def link(self, peer: str) -> PeerLink:
        try:
            return self._links[peer]
        except KeyError:
            known = ", ".join(self._links) or "none"
            raise UnknownPeer(f"{self.name} has no link to {peer!r} (linked: {known})") from None

    async def send(self, peer: str, msg: Message, *, reply_to: int = 0) -> int:
        """Fire and forget; returns the msg_id. Waits only for the link (pacing, HWM)."""
        msg_id = next(self._ids)
        await self.link(peer).send(encode(msg, sender=self.name, msg_id=msg_id, reply_to=reply_to))
        return msg_id

    def stop(self, reason: str = "") -> None:
        """Begin the staged shutdown (idempotent)."""
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()

    def _hello(self) -> Hello:
        return Hello(
            node=self.name, role=self.spec.role, schema_hash=self.env.schema_hash, session=self.session_id
        )

    def _established(self, link: PeerLink) -> None:
        link.state = LinkState.ESTABLISHED
        link.last_seen = self.clock.now()
        self._peer_change.set()
        self.log.debug("peer_joined", peer=link.peer, dialled=link.dialled)
        self._spawn(self.on_peer_joined(link.peer))

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        assert self._tg is not None, "tasks belong to the actor's TaskGroup; call serve() first"
        task = self._tg.create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Task[Any]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)

    async def _request(self, link: PeerLink, msg: Message) -> Envelope:
        msg_id = next(self._ids)
        fut: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = (link.peer, fut)
        try:
            await link.send(encode(msg, sender=self.name, msg_id=msg_id))
            return await fut
        finally:
            self._pending.pop(msg_id, None)

    def _fail_pending(self, peer: str, why: str) -> None:
        """Every request pending on ``peer`` fails now with :class:`PeerLost` (no reply will come)."""
        for owner, fut in list(self._pending.values()):
            if owner == peer and not fut.done():
                fut.set_exception(PeerLost(why))

    # --- inbound path -----------------------------------------------------------------------
    async def _recv_loop(self, sock: zmq.asyncio.Socket, link: PeerLink | None) -> None:
        """Read one socket forever. ``link`` is None for the ROUTER (route from the first frame)."""
        taken = 0
        while True:
            frames = await sock.recv_multipart(copy=False)
            taken += 1
            if taken >= FAIR_BATCH:
                taken = 0
                await asyncio.sleep(0)
            try:
                if link is None:
                    identity, frames = frames[0].bytes, frames[1:]
                    await self._on_router_frames(identity, frames)
                else:
                    await self._on_frames(link, frames)
            except (SftError, zmq.ZMQError) as exc:
                # E.g. a WELCOME to a peer that vanished meanwhile: that peer's problem, not
                # a reason to stop reading everyone else's messages.
                self._guard.note("inbound_failed", link.peer if link else "", f"{type(exc).__name__}: {exc}")

    async def _on_router_frames(self, identity: bytes, frames: list[zmq.Frame]) -> None:
        peer = self._guard.peer_of(identity, frames)
        if peer is None:
            return
        try:
            env = decode([f.buffer for f in frames], self.env.limits)
        except ProtocolError as exc:
            # Garbage: tell a peer that may dial us why (strangers hear nothing), keep serving.
            if isinstance(exc, VersionMismatch) and peer not in self._links:
                self._guard.refuse_handshake(peer, exc)
            else:
                self._guard.unreadable(peer, exc)
            if self._guard.may_answer(peer):
                await self._reject(identity, exc, None)
            return
        link = self._links.get(peer)
        if env.kind is MsgKind.HELLO:
            await self._on_hello(identity, peer, env)
        elif link is None or link.dialled or link.state is LinkState.GONE or link.route != [identity]:
            # (Under CURVE a connection other than the one that said HELLO — a reconnect, or a
            # stale process of the same actor — must say HELLO first: its session decides.)
            self._guard.rejected += 1
            if self._guard.may_answer(peer):
                refusal = NotWelcomed(f"{self.name}: send HELLO before {env.kind.name}")
                await self._reject(identity, refusal, env)
        else:
            await self._on_frames(link, frames, env)

    def _decode(self, peer: str, frames: list[zmq.Frame]) -> Envelope | None:
        try:
            return decode([f.buffer for f in frames], self.env.limits)
        except ProtocolError as exc:
            self._guard.unreadable(peer, exc)
            return None

    async def _reject(self, identity: bytes, exc: SftError, env: Envelope | None) -> None:
        """Answer a ROUTER peer with ERROR (it may not have a link yet)."""
        assert self._router is not None
        reply_to = env.msg_id if env is not None else 0
        frames = encode_error(exc, sender=self.name, msg_id=next(self._ids), reply_to=reply_to)
        with contextlib.suppress(zmq.ZMQError):
            await self._router.send_multipart([identity, *frames], copy=False)

    async def _on_hello(self, identity: bytes, peer: str, env: Envelope) -> None:
        hello = env.msg
        assert isinstance(hello, Hello)
        try:
            self._guard.check_hello(peer, env.sender, hello)
            existing = self._links.get(peer)
            if existing is not None and existing.dialled:
                raise ProtocolError(f"{self.name} already dialled {peer!r}; one link per pair of actors")
            check_schema(self.env.schema_hash, hello.schema_hash, peer=peer)
        except SftError as exc:
            self._guard.refuse_handshake(peer, exc)
            if self._guard.may_answer(peer):
                await self._reject(identity, exc, env)
                self._spawn(self.on_handshake_refused(peer, exc))
            return
        assert self._router is not None
        old = self._links.get(peer)
        if old is not None and old.session and old.session == hello.session:
            old.route = [identity]
            await self._rewelcome(old, env)  # the same process re-dialling (after a pause)
            return
        link = PeerLink(
            peer=peer,
            socket=self._router,
            route=[identity],
            dialled=False,
            window=self.settings.link_window,
            pacer=self._pacers.for_peer(peer),
            clock=self.clock,
            max_frame=self._sock_opts.max_msg_bytes,
        )
        link.session = hello.session
        self._links[peer] = link
        if old is not None:
            # The peer restarted (or re-dialled after a pause): nothing pending on the old
            # session will be answered by this one.
            self._fail_pending(peer, f"{peer} reconnected as a new session")
        if link.paced is not None:
            self._spawn(link.paced.run())
        await self._send_welcome(link, env)
        if old is not None:
            self.log.info("peer_rejoined", peer=peer, was=old.state.value)
        self._established(link)

    async def _send_welcome(self, link: PeerLink, hello: Envelope) -> None:
        welcome = Welcome(
            node=self.name,
            schema_hash=self.env.schema_hash,
            heartbeat_interval_s=self.settings.heartbeat_interval_s,
            credits=self.settings.link_window,
        )
        frames = encode(welcome, sender=self.name, msg_id=next(self._ids), reply_to=hello.msg_id)
        await link.send(frames, paced=False)

    async def _rewelcome(self, link: PeerLink, hello: Envelope) -> None:
        """A HELLO from the session we know: answer it; the link is what it was (a lost one
        recovers, as on any traffic)."""
        link.seen(0)
        if link.state in (LinkState.LOST, LinkState.GONE):
            link.state = LinkState.ESTABLISHED
            self.log.info("peer_recovered", peer=link.peer)
            self._spawn(self.on_peer_joined(link.peer))
        await self._send_welcome(link, hello)

    async def _on_frames(self, link: PeerLink, frames: list[zmq.Frame], env: Envelope | None = None) -> None:
        nbytes = sum(len(f) for f in frames)
        if env is None:
            env = self._decode(link.peer, frames)
            if env is None:
                return
        link.seen(nbytes)
        kind = env.kind
        # A peer this actor dialled that answers "send HELLO first" restarted and forgot it: its
        # traffic is no sign of life of the old link, and it must hear HELLO again.
        forgot = kind is MsgKind.ERROR and link.dialled and _code(env) == NotWelcomed.__name__
        if forgot and link.state is LinkState.ESTABLISHED:
            self._peer_forgot_us(link)
        elif not forgot and link.state is LinkState.LOST:
            link.state = LinkState.ESTABLISHED
            self.log.info("peer_recovered", peer=link.peer)
            self._spawn(self.on_peer_joined(link.peer))
        if env.reply_to:
            pending = self._pending.get(env.reply_to)
            if pending is not None and pending[0] == link.peer and not pending[1].done():
                pending[1].set_result(env)
            else:
                self.log.debug("late_reply_dropped", peer=link.peer, kind=kind.name, reply_to=env.reply_to)
            return
        if kind is MsgKind.HEARTBEAT:
            return
        if kind is MsgKind.ERROR:
            self._on_error(link, env)
            return
        if kind is MsgKind.SHUTDOWN:
            if link.peer == self.topology.coordinator.name:
                assert isinstance(env.msg, Shutdown)
                if env.msg.status:  # this node ends the way the run did
                    self.run_verdict = {"status": env.msg.status, "reason": env.msg.reason}
                self.stop(f"shutdown from {link.peer}")
            return
        if kind is MsgKind.BYE:
            link.state = LinkState.GONE
            self._peer_change.set()
            self._fail_pending(link.peer, f"{link.peer} left (BYE)")
            self.log.debug("peer_left", peer=link.peer)
            self._spawn(self.on_peer_left(link.peer))
            return
        if self._closing:
            self.log.debug("message_dropped_closing", peer=link.peer, kind=kind.name)
            return
        if not self._guard.admit(link.peer):
            if isinstance(env.msg, Request):
                over = ProtocolViolation(f"{link.peer} has more than {self._guard.limit} messages queued")
                await self._send_error(link, over, env.msg_id)
            return
        ctx = MsgContext(
            peer=link.peer,
            msg_id=env.msg_id,
            reply_to=env.reply_to,
            kind=kind,
            nbytes=nbytes,
            received_at=self.clock.now(),
        )
        await self._mailbox.put((env, ctx))

    def _on_error(self, link: PeerLink, env: Envelope) -> None:
        """An ERROR that answers nothing pending (those resolve their call)."""
        assert isinstance(env.msg, Error)
        if link.state is LinkState.CONNECTING:
            # A refusal before WELCOME (e.g. our header was unreadable): fail the HELLO.
            for peer, fut in self._pending.values():
                if peer == link.peer and not fut.done():
                    fut.set_result(env)
        self.log.warning("remote_error", peer=link.peer, code=env.msg.code, error=env.msg.message)

    def _peer_forgot_us(self, link: PeerLink) -> None:
        """A peer this actor dialled answers as if it never heard of it (it restarted before it
        was found silent). The liveness layer treats that as a lost link (and re-dials)."""

    async def _send_error(self, link: PeerLink, exc: Exception, reply_to: int) -> None:
        """Answer one message of ``link``'s peer with ERROR (best effort: it may be gone)."""
        frames = encode_error(exc, sender=self.name, msg_id=next(self._ids), reply_to=reply_to)
        with contextlib.suppress(UnknownPeer, zmq.ZMQError):
            await link.send(frames, paced=False)


def _code(env: Envelope) -> str:
    return env.msg.code if isinstance(env.msg, Error) else ""


__all__ = ["ActorCore", "ActorState", "MsgContext"]
