"""zmq socket factory: ROUTER for addressed actors, DEALER for connections to them.

Options are explicit on every socket: high-water marks (messages), LINGER (ms), MAXMSGSIZE
(bytes per frame: libzmq disconnects a peer that announces a bigger one before reading it) and,
on ROUTERs, ROUTER_MANDATORY — without it a ROUTER silently drops messages to unknown peers
or at the high-water mark. ``secure`` sets a security mechanism (CURVE, ``transport.auth``)
before the socket binds or connects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio


@dataclass(kw_only=True, slots=True, frozen=True)
class SocketOptions:
    sndhwm: int = 1000
    rcvhwm: int = 1000
    linger_ms: int = 200
    #: 0 = no limit; otherwise a peer sending a bigger frame is disconnected by libzmq.
    max_msg_bytes: int = 0
    reconnect_ivl_ms: int = 100
    reconnect_ivl_max_ms: int = 2000
    #: ROUTER: a new connection with a routing id in use takes it over (a restarted peer before
    #: its old connection is known dead). Off under CURVE, where the ROUTER assigns every
    #: connection its own id and peers are told apart by key: nobody may take one over.
    handover: bool = True
    #: A connection that has not finished its ZMTP (and CURVE) handshake by then is dropped, so
    #: idle connections from strangers cannot hold file descriptors for long (libzmq: 30 s).
    handshake_ivl_ms: int = 10_000


def _apply(sock: zmq.asyncio.Socket, opts: SocketOptions) -> None:
    sock.setsockopt(zmq.SNDHWM, opts.sndhwm)
    sock.setsockopt(zmq.RCVHWM, opts.rcvhwm)
    sock.setsockopt(zmq.LINGER, opts.linger_ms)
    sock.setsockopt(zmq.RECONNECT_IVL, opts.reconnect_ivl_ms)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, opts.reconnect_ivl_max_ms)
    sock.setsockopt(zmq.HANDSHAKE_IVL, opts.handshake_ivl_ms)
    if opts.max_msg_bytes:
        sock.setsockopt(zmq.MAXMSGSIZE, opts.max_msg_bytes)


Secure = Callable[[zmq.asyncio.Socket], None]


def bind_router(
    ctx: zmq.asyncio.Context, endpoint: str, opts: SocketOptions, *, secure: Secure | None = None
) -> tuple[zmq.asyncio.Socket, str]:
    """A ROUTER bound to ``endpoint``; returns it and the endpoint actually bound."""
    sock = ctx.socket(zmq.ROUTER)
    try:
        _apply(sock, opts)
        if secure is not None:
            secure(sock)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A restarted peer reconnects under its old name before the old connection is known
        # dead: the new connection takes the routing id over (the default refuses it).
        sock.setsockopt(zmq.ROUTER_HANDOVER, int(opts.handover))
        sock.bind(endpoint)
        bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock, bound


def connect_dealer(
    ctx: zmq.asyncio.Context,
    endpoint: str,
    identity: str | None,
    opts: SocketOptions,
    *,
    secure: Secure | None = None,
) -> zmq.asyncio.Socket:
    """A DEALER connected to ``endpoint``, routed by ``identity`` (the actor's name; None: the
    ROUTER assigns one per connection, as under CURVE)."""
    sock = ctx.socket(zmq.DEALER)
    try:
        _apply(sock, opts)
        if secure is not None:
            secure(sock)
        if identity is not None:
            sock.setsockopt(zmq.ROUTING_ID, identity.encode())
        sock.connect(endpoint)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock
