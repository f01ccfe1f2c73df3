"""One multipart message = ``[header, buf0, buf1, …]``.

The header is a msgpack map with short keys (unknown keys are ignored, so a minor version may
add some):

====  ==================================================================================
key   value
====  ==================================================================================
v     ``[major, minor]`` protocol version; another major is refused (VersionMismatch)
k     message kind (:class:`MsgKind` code)
s     sender node name
i     msg_id, unsigned 64-bit, chosen by the sender
r     reply_to: the msg_id this answers, 0 = none
b     body: map of field name -> value; a tensor field holds its buffer index
t     tensor descriptors, one per buffer frame, in frame order:
      ``{"d": dtype, "s": [dims], "n": nbytes, "c": codec metadata map or nil}``
====  ==================================================================================

Tensor bytes never enter msgpack; encoding returns memoryviews of the tensors (send them with
``copy=False``) and decoding returns memoryview slices of the received frames (no copy).

Decoding treats every frame as hostile: sizes are checked before anything is parsed, msgpack
runs with length limits and without ext types, and any inconsistency raises a
:class:`ProtocolError` subclass — never another exception type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, NoReturn, cast

import msgpack

from sft_actors.errors import (
    ConfigError,
    FrameTooLarge,
    MalformedFrame,
    ProtocolError,
    RemoteError,
    VersionMismatch,
)
from sft_actors.wire.fields import BufferSink, BufferTable, decode_fields, encode_body
from sft_actors.wire.kinds import MsgKind
from sft_actors.wire.message import Message
from sft_actors.wire.messages import REGISTRY, Error, spec_for
from sft_actors.wire.tensors import TensorDesc, WireTensor, as_byte_view

if TYPE_CHECKING:
    import zmq
    from typing_extensions import Buffer

    # What a socket hands back: bytes (copy=True) or zmq.Frame (copy=False), or a memoryview.
    FrameLike = Buffer | zmq.Frame

PROTOCOL_VERSION: Final[tuple[int, int]] = (3, 3)
_U64_MAX: Final[int] = 2**64 - 1


@dataclass(kw_only=True, frozen=True, slots=True)
class WireLimits:
    """What a receiver accepts. Checked before parsing, so a hostile frame cannot make it allocate."""

    max_header_bytes: int = 1 << 20
    max_message_bytes: int = 1 << 30  # header + all buffers
    max_tensors: int = 4096
    max_ndim: int = 8

    def __post_init__(self) -> None:
        for name in ("max_header_bytes", "max_message_bytes", "max_tensors", "max_ndim"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ConfigError(f"WireLimits.{name} must be a positive int, got {value!r}")


@dataclass(kw_only=True, frozen=True, slots=True)
class Envelope:
    """A decoded message with its routing fields."""

    version: tuple[int, int]
    kind: MsgKind
    sender: str
    msg_id: int
    reply_to: int
    msg: Message


# --- encoding ------------------------------------------------------------------------------
def _desc_to_wire(desc: TensorDesc) -> dict[str, Any]:
    return {"d": desc.dtype, "s": list(desc.shape), "n": desc.nbytes, "c": desc.codec}


def encode(msg: Message, *, sender: str, msg_id: int, reply_to: int = 0) -> list[bytes | memoryview]:
    """Frames for ``msg``: the msgpack header, then one zero-copy buffer per tensor."""
    kind = getattr(type(msg), "KIND", None)
    spec = REGISTRY.get(kind) if isinstance(kind, MsgKind) else None
    if spec is None or spec.cls is not type(msg):
        raise ProtocolError(f"{type(msg).__name__} is not a registered message class")
    for name, value in (("msg_id", msg_id), ("reply_to", reply_to)):
        if type(value) is not int or not 0 <= value <= _U64_MAX:
            raise ProtocolError(f"{name} must be an int in [0, 2**64), got {value!r}")
    if type(sender) is not str:
        raise ProtocolError(f"sender must be a str, got {type(sender).__name__}")
    sink = BufferSink()
    body = encode_body(msg, spec.fields, sink)
    header = {
        "v": list(PROTOCOL_VERSION),
        "k": int(spec.cls.KIND),
        "s": sender,
        "i": msg_id,
        "r": reply_to,
        "b": body,
        "t": [_desc_to_wire(t.desc) for t in sink.tensors],
    }
    try:
        packed: bytes = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(
            f"cannot encode {type(msg).__name__}: {exc}; body fields must be plain msgpack types "
            "(int, float, str, bool, bytes, list, dict, None) or WireTensor"
        ) from exc
    return [packed, *(t.data for t in sink.tensors)]


def encode_error(exc: BaseException, *, sender: str, msg_id: int, reply_to: int) -> list[bytes | memoryview]:
    """An ERROR message for ``exc``; a relayed :class:`RemoteError` keeps its original type."""
    if isinstance(exc, RemoteError):
        err = Error(code=exc.remote_type, message=exc.remote_message, detail={"peer": exc.peer})
    else:
        err = Error(code=type(exc).__name__, message=str(exc), detail={"module": type(exc).__module__})
    return encode(err, sender=sender, msg_id=msg_id, reply_to=reply_to)


def remote_error(err: Error, *, peer: str = "") -> RemoteError:
    """The typed exception for a received ERROR from ``peer``.

    A relayed error (see :func:`encode_error`) names the node where it happened, not the relay.
    """
    origin = err.detail.get("peer")
    return RemoteError(err.code, err.message, peer=origin if isinstance(origin, str) and origin else peer)


def raise_remote(err: Error, *, peer: str = "") -> NoReturn:
    """Raise the received ERROR at the caller as :class:`RemoteError`."""
    raise remote_error(err, peer=peer)


# --- decoding ------------------------------------------------------------------------------
def _unpack_header(header: memoryview) -> dict[Any, Any]:
    n = header.nbytes
    try:
        # Every msgpack element takes at least one byte, so no length can legitimately exceed
        # the header's size; these limits stop a 5-byte header from declaring a 4 GiB array.
        obj = msgpack.unpackb(
            header,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n,
            max_ext_len=0,  # no ext types at all: nothing in the header can build an object
        )
    except Exception as exc:  # msgpack raises ValueError, FormatError, StackError, ExtraData, …
        raise MalformedFrame(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from None
    if type(obj) is not dict:
        raise MalformedFrame(f"header must be a msgpack map, got {type(obj).__name__}")
    return obj


def _get(header: dict[Any, Any], key: str, tp: type, what: str) -> Any:
    if key not in header:
        raise MalformedFrame(f"header has no {what} (key {key!r})")
    value = header[key]
    if type(value) is not tp:
        raise MalformedFrame(f"header {what} must be {tp.__name__}, got {type(value).__name__}")
    return value


def _check_version(header: dict[Any, Any]) -> tuple[int, int]:
    version = _get(header, "v", list, "protocol version")
    if len(version) != 2 or any(type(part) is not int or part < 0 for part in version):
        raise MalformedFrame(f"protocol version must be [major, minor], got {version!r}")
    major, minor = version
    if major != PROTOCOL_VERSION[0]:
        ours = ".".join(map(str, PROTOCOL_VERSION))
        raise VersionMismatch(
            f"peer speaks protocol {major}.{minor}, this node speaks {ours}; run the same major "
            "version of sft_actors on both sides"
        )
    return major, minor


def _u64(header: dict[Any, Any], key: str, what: str) -> int:
    value: int = _get(header, key, int, what)
    if not 0 <= value <= _U64_MAX:
        raise MalformedFrame(f"header {what} {value} is outside [0, 2**64)")
    return value


def _desc_from_wire(obj: object, index: int, limits: WireLimits) -> TensorDesc:
    where = f"tensor descriptor {index}"
    if type(obj) is not dict:
        raise MalformedFrame(f"{where} must be a map, got {type(obj).__name__}")
    dtype = _get(obj, "d", str, f"{where} dtype")
    shape = _get(obj, "s", list, f"{where} shape")
    nbytes = _get(obj, "n", int, f"{where} nbytes")
    codec = obj.get("c")
    if len(shape) > limits.max_ndim:
        raise MalformedFrame(f"{where} has {len(shape)} dims, the limit is {limits.max_ndim}")
    if codec is not None and (type(codec) is not dict or any(type(k) is not str for k in codec)):
        raise MalformedFrame(f"{where} codec must be a map with str keys or nil")
    return TensorDesc(dtype=dtype, shape=tuple(shape), nbytes=nbytes, codec=codec)


def decode(frames: Sequence[FrameLike], limits: WireLimits) -> Envelope:
    """Parse ``[header, buf0, …]`` into an :class:`Envelope` without copying tensor bytes.

    Accepts ``bytes``, ``memoryview`` or ``zmq.Frame`` items. Raises only ProtocolError
    subclasses: FrameTooLarge, MalformedFrame, VersionMismatch, UnknownMessageKind.
    """
    if len(frames) == 0:
        raise MalformedFrame("empty message: expected [header, buffers…]")
    if len(frames) - 1 > limits.max_tensors:
        raise FrameTooLarge(f"message has {len(frames) - 1} buffers, the limit is {limits.max_tensors}")
    # zmq.Frame implements the buffer protocol; its stubs hide that behind __getattr__.
    views = [as_byte_view(cast("Buffer", frame), f"frame {i}") for i, frame in enumerate(frames)]
    header_view, buffers = views[0], views[1:]
    if header_view.nbytes > limits.max_header_bytes:
        raise FrameTooLarge(
            f"header is {header_view.nbytes} bytes, the limit is {limits.max_header_bytes} "
            "(WireLimits.max_header_bytes)"
        )
    total = sum(view.nbytes for view in views)
    if total > limits.max_message_bytes:
        raise FrameTooLarge(
            f"message is {total} bytes, the limit is {limits.max_message_bytes} "
            "(raise WireLimits.max_message_bytes or send smaller micro-batches)"
        )

    header = _unpack_header(header_view)
    version = _check_version(header)  # first: another major may lay out the rest differently
    spec = spec_for(_get(header, "k", int, "message kind"))
    sender: str = _get(header, "s", str, "sender")
    msg_id = _u64(header, "i", "msg_id")
    reply_to = _u64(header, "r", "reply_to")
    descs = _get(header, "t", list, "tensor descriptors")
    if len(descs) != len(buffers):
        raise MalformedFrame(
            f"header describes {len(descs)} tensors but the message has {len(buffers)} buffers"
        )
    tensors = []
    for i, (desc_obj, buf) in enumerate(zip(descs, buffers, strict=True)):
        desc = _desc_from_wire(desc_obj, i, limits)
        if desc.nbytes != buf.nbytes:
            raise MalformedFrame(f"tensor {i}: descriptor says {desc.nbytes} bytes, buffer has {buf.nbytes}")
        tensors.append(WireTensor(desc=desc, data=buf))
    body = _get(header, "b", dict, "body")
    # Buffers no known field claims are tolerated: a newer minor version may add tensor fields.
    kwargs = decode_fields(spec.cls.__name__, body, spec.fields, BufferTable(tensors=tensors))
    msg = spec.cls(**kwargs)
    return Envelope(
        version=version, kind=spec.cls.KIND, sender=sender, msg_id=msg_id, reply_to=reply_to, msg=msg
    )
