"""Handler tables: which method handles which message kind, checked when a class is built.

A handler is an ``async def on_<anything>(self, msg: SomeMessage, ctx: MsgContext)`` whose
return annotation is a message class, ``None`` or a union of those. The table is built from
the annotations in ``Actor.__init_subclass__``, so a missing annotation, a non-message type or
two handlers for the same kind is a ``TypeError`` at import, never a surprise mid-run.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from sft_actors.wire.kinds import MsgKind
from sft_actors.wire.message import Message
from sft_actors.wire.messages import REGISTRY

#: Kinds the runtime itself handles (handshake, liveness, errors, shutdown); actors cannot.
RESERVED_KINDS: frozenset[MsgKind] = frozenset(
    {MsgKind.HELLO, MsgKind.WELCOME, MsgKind.HEARTBEAT, MsgKind.ERROR, MsgKind.SHUTDOWN, MsgKind.BYE}
)
#: ``on_*`` names that are lifecycle hooks, not message handlers.
HOOK_NAMES: frozenset[str] = frozenset(
    {"on_start", "on_peer_joined", "on_peer_lost", "on_peer_left", "on_handshake_refused"}
)


@dataclass(kw_only=True, frozen=True, slots=True)
class MsgContext:
    """Facts about one received message, passed to its handler."""

    peer: str
    msg_id: int
    reply_to: int
    kind: MsgKind
    nbytes: int
    received_at: float  # the actor clock's now() (s) when the last frame arrived


@dataclass(kw_only=True, frozen=True, slots=True)
class HandlerSpec:
    kind: MsgKind
    msg_cls: type[Message]
    method: str
    owner: str  # class that defined it (for error messages)


def _message_class(tp: Any) -> type[Message] | None:
    if isinstance(tp, type) and issubclass(tp, Message) and tp is not Message:
        return tp
    return None


def _check_return(cls: type, name: str, tp: Any) -> None:
    arms = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    for arm in arms:
        if arm is type(None) or arm is None or _message_class(arm) is not None:
            continue
        raise TypeError(
            f"{cls.__name__}.{name} returns {tp!r}; a handler returns a message (sent as the reply), "
            "None, or a union of those"
        )


def _check_reply(where: str, msg_cls: type[Message], tp: Any) -> None:
    """A request's handler answers with the reply the request declares (``REPLY``), or returns
    None when the kind is only ever *sent* to it (e.g. a sink that measures arrivals); a
    message that expects no reply gets none."""
    expected = getattr(msg_cls, "REPLY", None)
    arms = set(typing.get_args(tp)) if typing.get_origin(tp) in (typing.Union, types.UnionType) else {tp}
    arms.discard(type(None))
    arms.discard(None)
    if expected is None and arms:
        raise TypeError(f"{where}: {msg_cls.__name__} expects no reply; annotate '-> None'")
    if expected is not None and arms - {expected}:
        raise TypeError(
            f"{where}: {msg_cls.__name__} is answered with {expected.__name__}; annotate "
            f"'-> {expected.__name__}' (got {tp!r})"
        )


def build_handler_table(cls: type, inherited: Mapping[MsgKind, HandlerSpec]) -> Mapping[MsgKind, HandlerSpec]:
    """The handler table of ``cls``: its base's table plus the ``on_*`` methods it defines."""
    table = dict(inherited)
    for name, fn in vars(cls).items():
        if not name.startswith("on_") or name in HOOK_NAMES or not callable(fn):
            continue
        where = f"{cls.__name__}.{name}"
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"{where} must be 'async def' (handlers run on the event loop)")
        params = list(inspect.signature(fn).parameters.values())[1:]
        if len(params) != 2:
            raise TypeError(f"{where} must take (self, msg: <MessageClass>, ctx: MsgContext)")
        try:
            hints = typing.get_type_hints(fn)
        except Exception as exc:
            raise TypeError(
                f"{where}: cannot resolve its annotations ({exc}); import the message classes"
            ) from exc
        msg_param = params[0].name
        if msg_param not in hints:
            raise TypeError(f"{where}: annotate {msg_param!r} with the message class it handles")
        if "return" not in hints:
            raise TypeError(f"{where}: annotate the return type (a message class or None)")
        msg_cls = _message_class(hints[msg_param])
        if msg_cls is None or REGISTRY.get(msg_cls.KIND) is None or REGISTRY[msg_cls.KIND].cls is not msg_cls:
            raise TypeError(f"{where}: {hints[msg_param]!r} is not a wire message class")
        _check_return(cls, name, hints["return"])
        _check_reply(where, msg_cls, hints["return"])
        kind = msg_cls.KIND
        if kind in RESERVED_KINDS:
            raise TypeError(f"{where}: {kind.name} is handled by the runtime; actors cannot handle it")
        existing = table.get(kind)
        if existing is not None and existing.method != name:
            raise TypeError(
                f"{where} and {existing.owner}.{existing.method} both handle {kind.name}; keep one "
                "(override the inherited method by its name to replace it)"
            )
        table[kind] = HandlerSpec(kind=kind, msg_cls=msg_cls, method=name, owner=cls.__name__)
    return MappingProxyType(table)
