"""The base actor: lifecycle (start → ready → run → staged shutdown) and the public API.

Lifecycle: ``serve()`` binds the ROUTER (addressed roles), dials the addressed actors the
topology names (HELLO → WELCOME, schema hash checked on both sides), runs ``on_start`` and
only then reports ready; it then serves messages until stopped. Shutdown is staged and each
stage bounded: polite (the coordinator sends SHUTDOWN; everyone drains its mailbox within
``drain_timeout_s`` and says BYE) → cancel every task of the actor's TaskGroup → close the
sockets with a small LINGER and run ``cleanup(exc)`` under its own timeout.

Hooks: ``on_start``, ``run``, ``on_peer_joined``/``_lost``/``_left``, ``on_handshake_refused``,
``cleanup``; handlers ``async def on_x(self, msg, ctx) -> Reply | None`` (``handlers``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

import zmq
import zmq.asyncio

from sft_actors.actors.core import ActorState, MsgContext
from sft_actors.actors.handlers import build_handler_table
from sft_actors.actors.liveness import LiveActor
from sft_actors.actors.peers import LinkState, PeerLink
from sft_actors.errors import (
    ActorFailed,
    PeerTimeout,
    ProtocolError,
    ProtocolViolation,
    SchemaMismatch,
    SftError,
    UnexpectedReply,
    UnknownMessageKind,
    UnknownPeer,
    VersionMismatch,
)
from sft_actors.transport.auth import HandshakeWatch, unless_refused
from sft_actors.transport.sockets import bind_router, connect_dealer
from sft_actors.wire.envelope import Envelope, encode, remote_error
from sft_actors.wire.message import Message, R, Request
from sft_actors.wire.messages import Bye, Error, Shutdown, Welcome
from sft_actors.wire.schema import check_schema

T = TypeVar("T")
_CLEANUP_TIMEOUT_S = 10.0


class Actor(LiveActor):
    """Base class of every actor; construct with ``(spec, env)`` and ``await serve()``."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._handlers = build_handler_table(cls, cls._handlers)

    # --- hooks for subclasses ------------------------------------------------------------
    async def on_start(self) -> None:
        """Sockets are bound and peers connected; set up state before ``ready``."""

    async def run(self) -> Any:
        """Optional main coroutine, started once ready. A coordinator's return value ends the run.

        Only an override is started (``serve`` checks ``type(self).run``): an actor that just
        answers messages has no main coroutine, and this body never runs.
        """
        return None

    async def cleanup(self, exc: BaseException | None) -> None:
        """Release resources; ``exc`` is why the actor stopped (None = normal stop)."""

    # --- public API ----------------------------------------------------------------------
    async def ready(self) -> None:
        """Wait until the actor serves; raises :class:`ActorFailed` if start-up failed."""
        await self._started.wait()
        if self.state is ActorState.FAILED:
            raise ActorFailed(f"{self.name} failed to start: {type(self.error).__name__}: {self.error}")
        if self.state is ActorState.STOPPED and not self.ready_reached:
            raise ActorFailed(f"{self.name} stopped before it was ready")

    async def call(self, peer: str, msg: Request[R], *, timeout_s: float | None = None) -> R:
        """Request/reply: the peer's reply, of the type the request declares (``msg.REPLY``).

        Raises :class:`RemoteError` if the peer answered ERROR, :class:`PeerTimeout` if nothing
        came back in ``timeout_s`` (default ``request_timeout_s``), :class:`UnexpectedReply` if
        it answered with another message kind. At most ``link_window`` calls per peer are in
        flight; more wait for a credit.
        """
        link = self.link(peer)
        timeout = self.settings.request_timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(timeout), link.credits:
                env = await self._request(link, cast(Message, msg))
        except TimeoutError:
            raise PeerTimeout(f"{peer} did not reply to {type(msg).__name__} within {timeout}s") from None
        if isinstance(env.msg, Error):
            raise remote_error(env.msg, peer=peer)
        if not isinstance(env.msg, msg.REPLY):
            raise UnexpectedReply(
                f"{peer} answered {type(env.msg).__name__} to {type(msg).__name__}; "
                f"expected {msg.REPLY.__name__}"
            )
        return cast(R, env.msg)

    def require_coordinator(self, ctx: MsgContext) -> None:
        """Refuse (ProtocolViolation, sent back as ERROR) a message only the run's coordinator
        may send — a plan, a round, an evaluation, adapters — that came from another peer."""
        coordinator = self.topology.coordinator.name
        if ctx.peer != coordinator:
            raise ProtocolViolation(
                f"{ctx.kind.name} is the coordinator's to send; {ctx.peer!r} is not {coordinator!r}"
            )

    async def broadcast(self, msg: Message, peers: Iterable[str] | None = None) -> None:
        """Send ``msg`` to each peer (default: every established peer), links in parallel."""
        targets = list(self.peers if peers is None else peers)
        async with asyncio.TaskGroup() as tg:
            for peer in targets:
                tg.create_task(self.send(peer, msg))

    async def offload(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run CPU-heavy ``fn`` in the runtime's bounded thread pool; the event loop (and
        heartbeats) keep running meanwhile. Cancelling the caller waits for ``fn`` to end."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.env.executor, functools.partial(fn, *args, **kwargs))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            # A thread cannot be interrupted: let the work finish before the caller unwinds, so
            # nothing it mutates (a forward in flight, an optimizer step) lands after cleanup.
            with contextlib.suppress(BaseException):
                await fut
            raise

    async def connect(self, peer: str) -> None:
        """Dial an addressed actor by name and complete the handshake (idempotent)."""
        if peer in self._links and self._links[peer].alive:
            return
        await self._dial(peer)

    async def wait_for_peers(self, peers: Iterable[str], timeout_s: float | None = None) -> None:
        """Wait until every named peer has an established link (handshake done)."""
        wanted = set(peers)
        timeout = self.settings.connect_timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(timeout):
                while not wanted <= set(self.peers):
                    await self._peer_change.wait()
                    self._peer_change.clear()
        except TimeoutError:
            missing = sorted(wanted - set(self.peers))
            raise PeerTimeout(f"{self.name}: peers {missing} did not connect within {timeout}s") from None

    def stop_run(self, result: Any = None) -> None:
        """Coordinator: the run is over. SHUTDOWN goes to every peer, then this actor stops."""
        self.result = result
        self._finishing_run = True
        self.stop("run finished")

    # --- handlers --------------------------------------------------------------------------
    async def _dispatch_loop(self) -> None:
        while True:
            env, ctx = await self._mailbox.get()
            try:
                await self._dispatch(env, ctx)
            finally:
                self._guard.release(ctx.peer)
                self._mailbox.task_done()

    async def _dispatch(self, env: Envelope, ctx: MsgContext) -> None:
        spec = self._handlers.get(env.kind)
        try:
            if spec is None:
                raise UnknownMessageKind(
                    f"{self.name} ({type(self).__name__}) has no handler for {env.kind.name}"
                )
            reply = await getattr(self, spec.method)(env.msg, ctx)
            if reply is not None:
                await self.send(ctx.peer, reply, reply_to=env.msg_id)
        except Exception as exc:
            if (task := asyncio.current_task()) is not None and task.cancelling():
                # A child's error while this handler was being cancelled (3.11's TaskGroup then
                # drops the cancellation) must not keep the dispatch loop alive.
                raise asyncio.CancelledError from exc
            # A peer's bad message must never kill the receiver: answer ERROR, keep serving.
            # The caller owns (and logs) the error; a non-SftError is a bug here, so log it too.
            if not isinstance(exc, SftError):
                self.log.error("handler_failed", peer=ctx.peer, kind=env.kind.name, error=repr(exc))
            else:
                self.log.debug("handler_refused", peer=ctx.peer, kind=env.kind.name, error=repr(exc))
            with contextlib.suppress(UnknownPeer):
                await self._send_error(self.link(ctx.peer), exc, env.msg_id)

    # --- lifecycle -----------------------------------------------------------------------
    async def serve(self) -> None:
        """Run the actor to completion. Raises :class:`ActorFailed` if it failed."""
        self.state = ActorState.STARTING
        exc: BaseException | None = None
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                # A stop during start-up (say, a peer that never answers HELLO) must not wait
                # for connect_timeout_s: race the start against the stop request.
                starting = self._spawn(self._start())
                stopping = self._spawn(self._stop.wait())
                await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not starting.done():
                    starting.cancel()
                    self._closing = True
                    raise _StoppedBeforeReady(self._stop_reason)
                starting.result()  # re-raise a start-up failure here
                self.state = ActorState.READY
                self.ready_reached = True
                self._started.set()
                self.log.debug("actor_ready", peers=self.peers)
                self._spawn(self._heartbeat_loop())
                self._spawn(self._watchdog_loop())
                for _ in range(self.handler_concurrency):
                    self._spawn(self._dispatch_loop())
                if type(self).run is not Actor.run:
                    self._spawn(self._run_main())
                await self._stop.wait()
                self.state = ActorState.STOPPING
                await self._polite_stop()
                for task in self._tasks:
                    task.cancel()
        except BaseException as raised:
            exc = _unwrap(raised)
            if isinstance(exc, _StoppedBeforeReady):
                exc = None
        finally:
            await self._close(exc)
        if exc is not None and not isinstance(exc, asyncio.CancelledError):
            raise ActorFailed(f"{self.name} failed: {type(exc).__name__}: {exc}") from exc
        if isinstance(exc, asyncio.CancelledError):
            raise exc

    async def _start(self) -> None:
        if self.spec.addressed:
            auth = self.env.auth
            self._router, bound = bind_router(
                self.env.ctx,
                self.env.endpoints.bind_address(self.name),
                self._sock_opts,
                secure=None if auth is None else lambda sock: auth.server(sock, self.name),
            )
            self.env.endpoints.publish(self.name, bound)
            self._spawn(self._recv_loop(self._router, None))
            self.log.debug("router_bound", endpoint=bound)
        async with asyncio.TaskGroup() as dials:
            for peer in self.topology.connections(self.name):
                dials.create_task(self._dial(peer))
        await self.on_start()

    async def _dial(self, peer: str) -> None:
        endpoint = await self.env.endpoints.resolve(peer)
        watch: list[HandshakeWatch] = []
        auth = self.env.auth

        def secure(sock: zmq.asyncio.Socket) -> None:
            if auth is not None:
                auth.client(sock, self.name, peer)
                watch.append(HandshakeWatch(sock))

        # Under CURVE the ROUTER names the connection and the key names the actor.
        identity = self.name if auth is None else None
        sock = connect_dealer(self.env.ctx, endpoint, identity, self._sock_opts, secure=secure)
        self._dealers.append(sock)
        try:
            await self._hello_to(peer, sock, endpoint, watch[0] if watch else None)
        finally:
            if watch:
                watch[0].close()

    async def _hello_to(
        self, peer: str, sock: zmq.asyncio.Socket, endpoint: str, watch: HandshakeWatch | None
    ) -> None:
        link = PeerLink(
            peer=peer,
            socket=sock,
            dialled=True,
            window=self.settings.link_window,
            pacer=self._pacers.for_peer(peer),
            clock=self.clock,
            max_frame=self._sock_opts.max_msg_bytes,
        )
        self._links[peer] = link
        self._spawn(self._recv_loop(sock, link))
        if link.paced is not None:
            self._spawn(link.paced.run())
        timeout = self.settings.connect_timeout_s
        try:
            async with asyncio.timeout(timeout):
                env = await unless_refused(self._hello_until_answered(link), watch, self.name, peer)
        except TimeoutError:
            hint = "is it running?"
            if watch is not None and watch.failures:
                hint = (
                    f"{watch.failures} CURVE handshakes failed: is {peer}.key here the key {peer} runs "
                    "with? (copy the key pairs of one sft keys generate to every host)"
                )
            raise PeerTimeout(
                f"{peer} did not answer HELLO within {timeout}s at {endpoint}; {hint}"
            ) from None
        if isinstance(env.msg, Error):
            err = remote_error(env.msg, peer=peer)
            refusal = {"SchemaMismatch": SchemaMismatch, "VersionMismatch": VersionMismatch}.get(
                err.remote_type
            )
            if refusal is not None:
                raise refusal(f"{peer} refused {self.name}'s handshake: {err.remote_message}") from err
            raise err
        if not isinstance(env.msg, Welcome):
            raise ProtocolError(f"{peer} answered HELLO with {env.kind.name}, expected WELCOME")
        check_schema(self.env.schema_hash, env.msg.schema_hash, peer=peer)
        link.set_window(max(1, min(self.settings.link_window, env.msg.credits)))
        self._established(link)

    async def _hello_until_answered(self, link: PeerLink) -> Envelope:
        """HELLO, again every heartbeat interval until answered (one can be lost while the peer
        drops an old connection); the peer answers a repeat from one session like the first."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.heartbeat_interval_s):
                    return await self._request(link, self._hello())

    async def _run_main(self) -> None:
        value = await self.run()
        if self.spec.role == "coordinator":
            self.stop_run(value if value is not None else self.result)

    async def _polite_stop(self) -> None:
        """Stage 1: SHUTDOWN (coordinator), drain the mailbox, BYE; bounded by drain_timeout_s."""
        self._closing = True
        budget = self.settings.drain_timeout_s
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(budget):
                # The coordinator's stop, whatever its cause, ends the run for everyone.
                announce = self._finishing_run or self.spec.role == "coordinator"
                if announce:
                    await self._broadcast_control(self._shutdown_message())
                await self._mailbox.join()
                for link in self._links.values():
                    if link.paced is not None:
                        await link.paced.drain()
                if announce:
                    # Let every peer leave first so none mistakes our exit for a failure.
                    while any(link.alive and not link.dialled for link in self._links.values()):
                        self._peer_change.clear()
                        await self._peer_change.wait()
                await self._broadcast_control(Bye(node=self.name, reason=self._stop_reason))
        self.log.debug("actor_stopping", reason=self._stop_reason)

    def _shutdown_message(self) -> Shutdown:
        """What a coordinator's SHUTDOWN says (the coordinator adds how the run ended)."""
        return Shutdown(reason=self._stop_reason)

    async def _broadcast_control(self, msg: Message) -> None:
        for link in list(self._links.values()):
            if link.state is LinkState.ESTABLISHED:
                with contextlib.suppress(UnknownPeer, zmq.ZMQError):
                    await link.send(encode(msg, sender=self.name, msg_id=next(self._ids)), paced=False)

    async def _close(self, exc: BaseException | None) -> None:
        """Stage 3: close sockets (small linger) and run ``cleanup`` under a timeout."""
        for _, fut in list(self._pending.values()):
            if not fut.done():
                fut.cancel()
        linger = self.settings.linger_ms if exc is None else 0
        for sock in [*self._dealers, *([self._router] if self._router is not None else [])]:
            sock.close(linger=linger)
        try:
            async with asyncio.timeout(_CLEANUP_TIMEOUT_S):
                await self.cleanup(exc)
        except Exception as cleanup_exc:
            self.log.error("cleanup_failed", error=repr(cleanup_exc))
            exc = exc or cleanup_exc
        failed = exc is not None and not isinstance(exc, asyncio.CancelledError)
        self.state = ActorState.FAILED if failed else ActorState.STOPPED
        self.error = exc if failed else None
        self._started.set()
        if failed:
            self.log.error("actor_failed", error=f"{type(exc).__name__}: {exc}")


class _StoppedBeforeReady(Exception):
    """Internal: ``stop()`` arrived while the actor was still starting (a clean stop)."""


def _unwrap(exc: BaseException) -> BaseException:
    """The first real error inside (nested) TaskGroup exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if not isinstance(e, asyncio.CancelledError)]
        exc = (inner or list(exc.exceptions))[0]
    return exc


__all__ = ["Actor", "ActorState", "MsgContext"]
