"""One frozen dataclass per message kind, and the kind -> class registry.

Bodies hold plain msgpack types; tensors are :class:`WireTensor` fields that the envelope
lifts into separate frames. Within a major protocol version a field may be *added* only with a
default (older peers ignore it, newer peers reading an older message use the default); a
field is never removed, renamed or retyped.

The registry is built and checked at import: every :class:`MsgKind` has exactly one class,
and every field annotation can go on the wire (see ``fields.py``), otherwise importing this
module fails.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Final

from sft_actors.errors import UnknownMessageKind
from sft_actors.wire.fields import FieldSpec, compile_fields
from sft_actors.wire.kinds import MsgKind
from sft_actors.wire.tensors import WireTensor

# A measurement: numbers, or a short label (e.g. the name of the codec chain in use).
Scalar = float | int | str


@dataclass(kw_only=True, frozen=True, slots=True)
class Message:
    """Base of all messages. ``KIND`` is the class's code on the wire."""

    KIND: ClassVar[MsgKind]


# --- session -------------------------------------------------------------------------------
@dataclass(kw_only=True, frozen=True, slots=True)
class Hello(Message):
    """First message on a link. The protocol version travels in the envelope."""

    KIND = MsgKind.HELLO
    node: str
    role: str
    schema_hash: str  # see schema.schema_hash; a mismatch is refused with SchemaMismatch
    capabilities: list[str] = field(default_factory=list)


@dataclass(kw_only=True, frozen=True, slots=True)
class Welcome(Message):
    KIND = MsgKind.WELCOME
    node: str
    schema_hash: str
    heartbeat_interval_s: float
    credits: int  # how many requests the peer may have in flight on this link


# --- split training step -------------------------------------------------------------------
@dataclass(kw_only=True, frozen=True, slots=True)
class Activations(Message):
    """One micro-batch's activations at the device's cut; the server continues from ``cut``."""

    KIND = MsgKind.ACTIVATIONS
    device: str
    round: int
    step: int
    cut: int  # index of the first block the server runs for this device
    activations: WireTensor  # (B, T, C) for a decoder, (B, N, C) for a ViT; raw or coded
    labels: WireTensor  # (B, T) token ids (ignore_index where masked) or (B,) class ids
    n_samples: int
    sent_at_ns: int  # sender's time.time_ns(), for latency telemetry
    attention_mask: WireTensor | None = None  # (B, T) for padded batches; None = all valid
    phase: str = "train"  # "train": backward and update; "eval": loss only, no update (since 1.1)


@dataclass(kw_only=True, frozen=True, slots=True)
class Gradients(Message):
    """Reply to :class:`Activations` (envelope ``reply_to`` = its msg_id)."""

    KIND = MsgKind.GRADIENTS
    device: str
    round: int
    step: int
    grad: WireTensor  # d loss / d activations, same shape as the activations; raw or coded
    loss: float
    n_tokens: int  # tokens (or samples) the loss was averaged over
    metrics: dict[str, Scalar] = field(default_factory=dict)  # e.g. correct, server_ms (since 1.1)


# --- adapter aggregation -------------------------------------------------------------------
@dataclass(kw_only=True, frozen=True, slots=True)
class AdaptersUp(Message):
    KIND = MsgKind.ADAPTERS_UP
    device: str
    round: int
    n_samples: int  # the averaging weight
    tensors: dict[str, WireTensor]  # LoRA parameter name -> tensor, device-side blocks only


@dataclass(kw_only=True, frozen=True, slots=True)
class AdaptersDown(Message):
    KIND = MsgKind.ADAPTERS_DOWN
    round: int
    tensors: dict[str, WireTensor]  # averaged LoRA tensors for the blocks this device holds


# --- health and telemetry ------------------------------------------------------------------
@dataclass(kw_only=True, frozen=True, slots=True)
class Heartbeat(Message):
    KIND = MsgKind.HEARTBEAT
    node: str
    seq: int
    sent_at_ns: int


@dataclass(kw_only=True, frozen=True, slots=True)
class Metrics(Message):
    KIND = MsgKind.METRICS
    node: str
    round: int
    values: dict[str, Scalar]


@dataclass(kw_only=True, frozen=True, slots=True)
class Error(Message):
    """A failed request. Build it with ``envelope.encode_error``; raise it with ``raise_remote``."""

    KIND = MsgKind.ERROR
    code: str  # the exception class name, e.g. "SchemaMismatch"
    message: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True, frozen=True, slots=True)
class Shutdown(Message):
    KIND = MsgKind.SHUTDOWN
    reason: str = ""


@dataclass(kw_only=True, frozen=True, slots=True)
class Bye(Message):
    KIND = MsgKind.BYE
    node: str
    reason: str = ""


# --- training protocol ---------------------------------------------------------------------
@dataclass(kw_only=True, frozen=True, slots=True)
class Plan(Message):
    """The coordinator's assignment for one device."""

    KIND = MsgKind.PLAN
    device: str
    cut: int  # the device runs blocks [0, cut)
    shard: int  # index of its data shard
    steps_per_round: int
    rounds: int
    aggregate_every: int  # rounds between adapter averaging
    codec: dict[str, Any]  # codec policy per role (activation up, gradient down)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True, frozen=True, slots=True)
class RoundStart(Message):
    KIND = MsgKind.ROUND_START
    round: int


@dataclass(kw_only=True, frozen=True, slots=True)
class RoundDone(Message):
    KIND = MsgKind.ROUND_DONE
    device: str
    round: int
    n_samples: int
    loss: float  # mean training loss over the round
    metrics: dict[str, Scalar] = field(default_factory=dict)


@dataclass(kw_only=True, frozen=True, slots=True)
class EvalRequest(Message):
    KIND = MsgKind.EVAL_REQUEST
    round: int
    split: str  # e.g. "val", "test"


@dataclass(kw_only=True, frozen=True, slots=True)
class EvalResult(Message):
    KIND = MsgKind.EVAL_RESULT
    node: str
    round: int
    values: dict[str, Scalar]


@dataclass(kw_only=True, frozen=True, slots=True)
class Ack(Message):
    KIND = MsgKind.ACK
    of_msg_id: int
    credits: int = 0  # flow-control credits granted back to the receiver; 0 = none


@dataclass(kw_only=True, frozen=True, slots=True)
class AdaptersRequest(Message):
    """Ask a node for its current LoRA tensors; it answers ADAPTERS_UP."""

    KIND = MsgKind.ADAPTERS_REQUEST
    round: int


@dataclass(kw_only=True, frozen=True, slots=True)
class BasisUpload(Message):
    """A device's transform-coding basis, sent once before its first projected activations."""

    KIND = MsgKind.BASIS
    device: str
    key: str  # the name the codec chain's ``project.basis`` refers to
    digest: str  # content hash; encoded tensors carry it, so a stale basis is refused
    vectors: WireTensor  # (C, K) orthonormal columns
    mean: WireTensor  # (C,)


ALL_MESSAGES: Final[tuple[type[Message], ...]] = (
    Hello,
    Welcome,
    Activations,
    Gradients,
    AdaptersUp,
    AdaptersDown,
    Heartbeat,
    Metrics,
    Error,
    Shutdown,
    Bye,
    Plan,
    RoundStart,
    RoundDone,
    EvalRequest,
    EvalResult,
    Ack,
    AdaptersRequest,
    BasisUpload,
)


@dataclass(frozen=True, slots=True)
class MessageSpec:
    cls: type[Message]
    fields: tuple[FieldSpec, ...]


def build_registry(classes: Iterable[type[Message]]) -> Mapping[MsgKind, MessageSpec]:
    """Map each kind to its class and compiled fields; ``TypeError`` unless it is one-to-one."""
    registry: dict[MsgKind, MessageSpec] = {}
    for cls in classes:
        kind = getattr(cls, "KIND", None)
        if not isinstance(kind, MsgKind):
            raise TypeError(f"{cls.__name__} has no KIND: set KIND = MsgKind.<CODE> in its body")
        if kind in registry:
            raise TypeError(f"{kind.name} has two classes: {registry[kind].cls.__name__} and {cls.__name__}")
        registry[kind] = MessageSpec(cls=cls, fields=compile_fields(cls))
    missing = [kind.name for kind in MsgKind if kind not in registry]
    if missing:
        raise TypeError(f"message kinds without a class: {', '.join(missing)}; add one in messages.py")
    return MappingProxyType(registry)


REGISTRY: Final[Mapping[MsgKind, MessageSpec]] = build_registry(ALL_MESSAGES)


def spec_for(kind: int) -> MessageSpec:
    """The class and fields of message code ``kind``; UnknownMessageKind if this build lacks it."""
    try:
        return REGISTRY[MsgKind(kind)]
    except ValueError:
        raise UnknownMessageKind(
            f"message kind {kind} is unknown to this build (knows 1..{max(MsgKind)}); "
            "upgrade this node or stop sending that kind"
        ) from None


def message_class(kind: MsgKind) -> type[Message]:
    return REGISTRY[kind].cls
