"""CurveZMQ on the sockets, with pyzmq's ZAP authenticator deciding who may connect.

Every tcp and ipc socket of a ``mode = "curve"`` topology runs the CURVE mechanism (RFC 26,
Curve25519 key exchange and authenticated encryption, done by libzmq): an addressed actor's
ROUTER is a CURVE server holding that actor's secret key, a dialling DEALER a CURVE client
that knows the server's public key (so it cannot be fooled by another listener) and proves
its own. Which client keys may connect is decided by one ZAP handler per zmq Context,
:class:`zmq.auth.asyncio.AsyncioAuthenticator`, given the topology's public keys: a stranger's
handshake is refused inside libzmq, before any of its messages reaches an actor, and refusals
are logged at a bounded rate. The ZAP User-Id of an accepted connection is the actor name its
key belongs to (``frame.get("User-Id")`` on every received frame), which the actors compare
with the name a peer claims. ``ZAP_ENFORCE_DOMAIN`` makes a ROUTER refuse everyone when no
ZAP handler answers, rather than let every key in.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from sft_actors.errors import IdentityRefused
from sft_actors.log import Throttle, get_logger
from sft_actors.security.keys import KeyRing, load_keyring
from sft_actors.topology import Topology
from sft_actors.topology.validate import exposed_hosts

#: The ZAP domain of every sft_actors ROUTER.
ZAP_DOMAIN = "sft"
USER_ID = "User-Id"
log = get_logger(component="auth")


class _ActorKeys:
    """The credentials provider ZAP asks: is this client key one of the topology's actors?"""

    def __init__(self, keyring: KeyRing, throttle: Throttle) -> None:
        self._actors = {key: name for name, key in keyring.publics.items()}
        self._throttle = throttle
        self.refused = 0

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self._actors:
            return True
        self.refused += 1
        suppressed = self._throttle.due("stranger")
        if suppressed is not None:
            log.warning(
                "connection_refused",
                reason="key of no actor",
                key=key.decode(errors="replace"),
                refused_total=self.refused,
                suppressed=suppressed,
            )
        return False

    def actor(self, key: bytes) -> str:
        return self._actors[key]


class _Authenticator(AsyncioAuthenticator):
    """Maps an accepted key to its actor's name (the connection's ZAP User-Id)."""

    def __init__(self, ctx: zmq.asyncio.Context, keys: _ActorKeys) -> None:
        super().__init__(ctx, log=_QuietLog())
        self._keys = keys

    def curve_user_id(self, client_public_key: bytes) -> str:
        from zmq.utils import z85

        return self._keys.actor(z85.encode(client_public_key))


class _QuietLog:
    """pyzmq's authenticator logs each refusal at error level (a flood = a flood of lines); ours
    are counted and throttled in :class:`_ActorKeys` instead."""

    def debug(self, *args: Any, **kwargs: Any) -> None:
        pass

    def error(self, msg: str, *args: Any, **kwargs: Any) -> None:
        log.debug("zap_error", detail=msg % args if args else msg)


class CurveAuth:
    """CURVE for one process: the ZAP handler of its Context and the socket options.

    ``start()`` must run before any ROUTER binds (on the event loop); ``stop()`` when the
    process's sockets are closed. :meth:`server` and :meth:`client` set the options on a socket
    before it binds or connects. Raises :class:`~sft_actors.errors.KeyFileError` when a needed
    secret key was not loaded.
    """

    def __init__(self, ctx: zmq.asyncio.Context, keyring: KeyRing, *, now: Any) -> None:
        self.keyring = keyring
        self._keys = _ActorKeys(keyring, Throttle(now))
        self._auth = _Authenticator(ctx, self._keys)

    @property
    def refused(self) -> int:
        """Handshakes refused so far (client keys of no actor)."""
        return self._keys.refused

    def start(self) -> None:
        self._auth.start()
        self._auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self._keys)

    def stop(self) -> None:
        self._auth.stop()

    def server(self, sock: zmq.asyncio.Socket, actor: str) -> None:
        """``sock`` (a ROUTER, before bind) accepts CURVE clients that ZAP lets in."""
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.keyring.secret(actor))

    def client(self, sock: zmq.asyncio.Socket, actor: str, server: str) -> None:
        """``sock`` (a DEALER, before connect) speaks as ``actor`` to the CURVE server ``server``."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.keyring.public(server))
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keyring.public(actor))
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.keyring.secret(actor))


def user_id(frame: zmq.Frame) -> str | None:
    """The ZAP User-Id (actor name) of the connection ``frame`` arrived on; None without ZAP."""
    try:
        value = frame.get(USER_ID)
    except zmq.ZMQError:
        return None
    return value if isinstance(value, str) and value else None


def start_curve(
    topology: Topology, names: Sequence[str], transport: str, ctx: zmq.asyncio.Context
) -> CurveAuth | None:
    """CURVE for the actors ``names`` run in this process, started; None when the run has none.

    ``mode = "curve"`` over tcp or ipc reads every public key and these actors' secret keys
    (:class:`~sft_actors.errors.KeyFileError` names a missing or unsafe file) and starts the
    ZAP handler. Over inproc (one process, no socket outside it) there is nothing to secure.
    ``mode = "none"`` on a non-loopback address (``allow_insecure``) is announced with a warning.
    """
    security = topology.run.security
    if security.mode == "none":
        exposed = sorted(h.address for h in exposed_hosts(topology))
        if exposed and transport == "tcp":
            log.warning(
                "insecure_network",
                addresses=exposed,
                detail="mode = none: anyone who can reach these ports can join as any actor; "
                'use [run.security] mode = "curve" (sft keys generate)',
            )
        return None
    if transport == "inproc":
        log.info("curve_not_needed", detail="inproc: every actor is in this process")
        return None
    keyring = load_keyring(topology, names)
    auth = CurveAuth(ctx, keyring, now=time.monotonic)
    auth.start()
    log.info("curve_enabled", keys=str(keyring.directory), actors=list(names), transport=transport)
    return auth


_WATCHED = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
)


class HandshakeWatch:
    """The CURVE handshakes of one dialling socket, from libzmq's monitor events.

    A refused key otherwise looks like a peer that is not running (HELLO is never answered):
    :meth:`refused` returns as soon as the peer's ZAP handler refuses this actor's key, and
    :attr:`failures` counts handshakes that failed without a reason (the usual sign that the
    server's public key here is not the one it runs with). Create it before the socket
    connects; :meth:`close` once the link is up.
    """

    def __init__(self, sock: zmq.asyncio.Socket) -> None:
        self._sock = sock
        self._monitor = sock.get_monitor_socket(_WATCHED)
        self.failures = 0

    async def refused(self) -> str:
        """Wait until the peer refuses our key; returns why (ZAP status). Waits forever after
        a handshake succeeded."""
        from zmq.utils.monitor import parse_monitor_message

        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return f"ZAP status {event['value']}"
            if event["event"] != zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.failures += 1

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._monitor.close(linger=0)


T = TypeVar("T")


async def unless_refused(request: Awaitable[T], watch: HandshakeWatch | None, me: str, peer: str) -> T:
    """``request``'s result, or :class:`IdentityRefused` as soon as ``peer``'s ZAP handler refuses
    ``me``'s key (rather than a HELLO that times out as if ``peer`` were not running)."""
    if watch is None:
        return await request
    answer = asyncio.ensure_future(request)
    refused = asyncio.ensure_future(watch.refused())
    try:
        await asyncio.wait({answer, refused}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for fut in (answer, refused):
            if not fut.done():
                fut.cancel()
        await asyncio.gather(answer, refused, return_exceptions=True)
    if answer.done() and not answer.cancelled():
        return answer.result()
    raise IdentityRefused(
        f"{peer} refused {me}'s CURVE key ({refused.result()}): {me}.key is not a key {peer} knows; "
        "copy the key pairs of one sft keys generate to every host"
    )
