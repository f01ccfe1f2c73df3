"""What an addressed actor lets in: who may speak, as whom, how much, and how loudly refusals log.

An actor's ROUTER is reachable by anyone who can reach its port. :class:`InboundGuard` holds
the rules the inbound path applies before a message costs more than a header decode:

* **Identity** — under CURVE a peer *is* the actor its key belongs to: every connection
  carries the ZAP User-Id of its key (:mod:`sft_actors.transport.auth`), dialling sockets set
  no routing id and the ROUTER routes by the id it assigns per connection. A HELLO must name
  that same actor (and, in every mode, an actor of the topology that dials this one, in its
  own role, never this actor's own name).
* **Silence to strangers** — only peers that may legitimately dial this actor (under CURVE:
  every authenticated connection) get ERROR frames back; anyone else gets nothing, so junk
  learns nothing about the topology and costs no reply.
* **Credits on the receiving side** — a peer may have at most ``2 × link_window`` messages
  queued or in handling here (requests honour the window its WELCOME granted; the rest is
  slack for one-way messages); beyond that its messages are dropped (a request is answered
  with :class:`~sft_actors.errors.ProtocolViolation`).
* **Bounded logging** — refusals are logged through a :class:`~sft_actors.log.Throttle` (per
  event, per known actor, strangers pooled), and the last refused handshakes are kept without
  their tracebacks (a traceback pins the whole refused message in memory).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import zmq

from sft_actors.errors import IdentityRefused, ProtocolError, SftError, UnknownPeer
from sft_actors.log import Throttle
from sft_actors.topology import Topology
from sft_actors.transport.auth import user_id
from sft_actors.wire.messages import Hello

#: Refused handshakes remembered (``Actor.refused``), oldest forgotten first.
REFUSED_KEPT = 32
STRANGER = "<stranger>"


class InboundGuard:
    def __init__(self, me: str, topology: Topology, *, secure: bool, window: int, now: Any, log: Any) -> None:
        self.me = me
        self.topology = topology
        self.secure = secure
        self.limit = 2 * window
        self._log = log
        self._throttle = Throttle(now)
        #: Actors that dial this one (the only names a HELLO may carry).
        self.callers = frozenset(a.name for a in topology.actors if me in topology.connections(a.name))
        self._queued: collections.Counter[str] = collections.Counter()
        #: The last refused handshakes, as (peer, error without traceback).
        self.refused: collections.deque[tuple[str, SftError]] = collections.deque(maxlen=REFUSED_KEPT)
        #: Messages refused or dropped by this guard (identity, credit, unreadable, strangers).
        self.rejected = 0

    # --- identity ---------------------------------------------------------------------------
    def peer_of(self, identity: bytes, frames: Sequence[zmq.Frame]) -> str | None:
        """Who sent ``frames``. Under CURVE: the actor the connection's key belongs to (its ZAP
        User-Id); the routing id is then one the ROUTER chose for that connection, so no key
        holder can claim, squat or take over another actor's route. Otherwise the routing id
        the peer chose (its name). None: a connection with no actor's key (ZAP let nobody
        else in; counted and dropped)."""
        if not self.secure:
            return identity.decode(errors="replace")
        owner = user_id(frames[0]) if frames else None
        if owner is None:
            self.rejected += 1
        return owner

    def check_hello(self, peer: str, sender: str, hello: Hello) -> None:
        """Raises a :class:`ProtocolError` subclass when ``hello`` may not open a link."""
        if hello.node != peer or sender != peer:
            if self.secure:
                raise IdentityRefused(f"the key of {peer!r} may not speak as {hello.node!r}")
            raise IdentityRefused(f"HELLO from routing id {peer!r} claims to be {hello.node!r}")
        if peer == self.me:
            raise IdentityRefused(f"HELLO under {self.me}'s own name")
        if peer not in {a.name for a in self.topology.actors}:
            raise UnknownPeer(f"{peer!r} is not an actor of this topology")
        role = self.topology.actor(peer).role
        if hello.role != role:
            raise IdentityRefused(f"{peer} is a {role}, its HELLO claims {hello.role!r}")
        if peer not in self.callers:
            raise IdentityRefused(f"{peer} ({role}) does not connect to {self.me}")

    def may_answer(self, peer: str) -> bool:
        """Whether ``peer`` gets ERROR frames (authenticated, or an actor that dials this one)."""
        return self.secure or peer in self.callers

    # --- credits ----------------------------------------------------------------------------
    def admit(self, peer: str) -> bool:
        """Count one more message of ``peer`` in the mailbox; False (not counted) over the limit."""
        if self._queued[peer] >= self.limit:
            self.rejected += 1
            self.note("credit_exceeded", peer, f"more than {self.limit} messages queued")
            return False
        self._queued[peer] += 1
        return True

    def release(self, peer: str) -> None:
        """One of ``peer``'s admitted messages was handled."""
        self._queued[peer] -= 1
        if self._queued[peer] <= 0:
            del self._queued[peer]

    # --- refusals ---------------------------------------------------------------------------
    def refuse_handshake(self, peer: str, exc: SftError) -> None:
        self.refused.append((peer, _bare(exc)))
        self.note("handshake_refused", peer, f"{type(exc).__name__}: {exc}", level="error")

    def note(self, event: str, peer: str, error: str, *, level: str = "warning") -> None:
        """Log ``event`` about ``peer`` at a bounded rate (strangers share one budget)."""
        who = peer if peer in self.callers or peer == self.me else STRANGER
        suppressed = self._throttle.due(f"{event}:{who}")
        if suppressed is not None:
            shown = peer if who != STRANGER else peer[:32]
            getattr(self._log, level)(event, peer=shown, error=error[:300], suppressed=suppressed)

    def unreadable(self, peer: str, exc: ProtocolError) -> None:
        self.rejected += 1
        self.note("frame_rejected", peer, f"{type(exc).__name__}: {exc}")


def _bare(exc: SftError) -> SftError:
    """``exc`` without traceback or chained context (they hold the frames it was raised over)."""
    exc.__traceback__ = None
    exc.__context__ = None
    exc.__cause__ = None
    return exc
