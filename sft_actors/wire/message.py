"""The base of every wire message, and the request mixin that names a message's reply."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar, get_args, get_origin

from sft_actors.wire.kinds import MsgKind


@dataclass(kw_only=True, frozen=True, slots=True)
class Message:
    """Base of all messages. ``KIND`` is the class's code on the wire."""

    KIND: ClassVar[MsgKind]


R = TypeVar("R", bound=Message)


class Request(Generic[R]):
    """Mixin of a message that expects a reply of type ``R``: ``class X(Message, Request[Y])``.

    ``Actor.call`` returns exactly ``R`` (or raises one typed error), and a handler for ``X``
    must be annotated to return ``R``; both read ``REPLY``, set here from the class's bases.
    """

    __slots__ = ()
    REPLY: ClassVar[type[Message]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in getattr(cls, "__orig_bases__", ()):
            if get_origin(base) is Request:
                (reply,) = get_args(base)
                if not (isinstance(reply, type) and issubclass(reply, Message)):
                    raise TypeError(f"{cls.__name__}: Request[...] needs a message class, got {reply!r}")
                cls.REPLY = reply


__all__ = ["Message", "R", "Request"]
