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
from typing import Any, Final, Literal

from sft_actors.codec.spec import CodecPolicy
from sft_actors.errors import UnknownMessageKind
from sft_actors.wire.fields import FieldSpec, compile_fields
from sft_actors.wire.kinds import MsgKind
from sft_actors.wire.message import Message, Request
from sft_actors.wire.plans import (
    DataPlan,
    EvalStats,
    ModelPlan,
    RoundStats,
    ServedDevice,
    ServerUpdate,
    TrainMode,
    TrainPlan,
)
from sft_actors.wire.tensors import WireTensor


# --- session -------------------------------------------------------------------------------
@dataclass(kw_only=True, frozen=True, slots=True)
class Hello(Message):
    """First message on a link. The protocol version travels in the envelope."""

    KIND = MsgKind.HELLO
    node: str
    role: str
    schema_hash: str  # see schema.schema_hash; a mismatch is refused with SchemaMismatch
    capabilities: list[str] = field(default_factory=list)
    # Random per process start: a HELLO with a new session is a restarted peer (nothing
    # pending on the old one will be answered); the same session is a re-dial after a pause.
    session: str = ""


@dataclass(kw_only=True, frozen=True, slots=True)
class Welcome(Message):
    KIND = MsgKind.WELCOME
    node: str
    schema_hash: str
    heartbeat_interval_s: float
    credits: int  # how many requests the peer may have in flight on this link


# --- generic replies -----------------------------------------------------------------------
@dataclass(kw_only=True, frozen=True, slots=True)
class Ack(Message):
    KIND = MsgKind.ACK
    of_msg_id: int
    credits: int = 0  # flow-control credits granted back to the receiver; 0 = none


# --- split training step -------------------------------------------------------------------
@dataclass(kw_only=True, frozen=True, slots=True)
class Gradients(Message):
    """Reply to :class:`Activations` (envelope ``reply_to`` = its msg_id)."""

    KIND = MsgKind.GRADIENTS
    device: str
    round: int
    step: int
    grad: WireTensor  # d loss / d activations, same shape as the activations (empty for eval)
    loss: float  # mean over ``n_tokens``
    n_tokens: int  # tokens (or samples) the loss was averaged over
    correct: int = 0  # classification: arg-max hits in this micro-batch
    server_ms: float = 0.0  # server compute for this micro-batch (forward + backward)


@dataclass(kw_only=True, frozen=True, slots=True)
class Activations(Message, Request[Gradients]):
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
    phase: Literal["train", "eval"] = "train"  # eval: loss only, no backward, no update


# --- adapter aggregation -------------------------------------------------------------------
@dataclass(kw_only=True, frozen=True, slots=True)
class AdaptersUp(Message):
    KIND = MsgKind.ADAPTERS_UP
    device: str
    round: int
    n_samples: int  # the averaging weight (a server reports the micro-batches it served)
    tensors: dict[str, WireTensor]  # LoRA parameter name -> tensor, device-side blocks only


@dataclass(kw_only=True, frozen=True, slots=True)
class AdaptersRequest(Message, Request[AdaptersUp]):
    """Ask a node for its current LoRA tensors; it answers ADAPTERS_UP."""

    KIND = MsgKind.ADAPTERS_REQUEST
    round: int


@dataclass(kw_only=True, frozen=True, slots=True)
class AdaptersDown(Message, Request[Ack]):
    KIND = MsgKind.ADAPTERS_DOWN
    round: int
    tensors: dict[str, WireTensor]  # averaged LoRA tensors for the blocks this device holds
    # Keys among ``tensors`` whose optimizer moments the device resets (``lora_averaging =
    # "svd"`` re-factorized them: a new basis, so the old AdamW moments no longer apply).
    reset_moments: list[str] = field(default_factory=list)


# --- health and telemetry ------------------------------------------------------------------
@dataclass(kw_only=True, frozen=True, slots=True)
class Heartbeat(Message):
    KIND = MsgKind.HEARTBEAT
    node: str
    seq: int
    sent_at_ns: int


@dataclass(kw_only=True, frozen=True, slots=True)
class Metrics(Message):
    """Progress of one micro-batch (fire and forget; drives the coordinator's progress bar)."""

    KIND = MsgKind.METRICS
    node: str
    round: int
    step_loss: float
    wire_bytes: int  # activations + gradient as sent
    raw_bytes: int  # the same as raw tensors


@dataclass(kw_only=True, frozen=True, slots=True)
class Error(Message):
    """A failed request. Build it with ``envelope.encode_error``; raise it with ``raise_remote``."""

    KIND = MsgKind.ERROR
    code: str  # the exception class name, e.g. "SchemaMismatch"
    message: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True, frozen=True, slots=True)
class Shutdown(Message):
    """Coordinator → everyone: the run is over; stop politely. ``status`` is how it ended
    (completed, interrupted, failed; "" when unknown): each node exits with it."""

    KIND = MsgKind.SHUTDOWN
    reason: str = ""
    status: str = ""


@dataclass(kw_only=True, frozen=True, slots=True)
class Bye(Message):
    KIND = MsgKind.BYE
    node: str
    reason: str = ""


# --- training protocol ---------------------------------------------------------------------
@dataclass(kw_only=True, frozen=True, slots=True)
class DevicePlan(Message, Request[Ack]):
    """The coordinator's assignment for one device: everything it builds and runs."""

    KIND = MsgKind.PLAN
    device: str
    index: int  # position among the run's devices (seeds derive from it)
    num_devices: int  # every device derives the same data partition from it
    mode: TrainMode
    server: str  # the server actor that takes this device's activations ("" in fedlora)
    cut: int  # the device runs blocks [0, cut) (fedlora: every block, whatever this says)
    shard: int  # index of its data shard
    model: ModelPlan
    data: DataPlan
    train: TrainPlan
    codec: CodecPolicy  # identity when the mode sends raw tensors
    run_id: str = ""  # which run: a plan of another run (a fresh coordinator) starts over


@dataclass(kw_only=True, frozen=True, slots=True)
class ServerPlan(Message, Request[Ack]):
    """The coordinator's assignment for one server actor: a head, or a middle stage."""

    KIND = MsgKind.SERVER_PLAN
    server: str
    mode: TrainMode
    model: ModelPlan
    start_block: int  # first block this actor runs
    end_block: int | None  # None: runs to the head (loss); else a middle stage [start, end)
    next_stage: str  # the stage that takes this one's output ("" for the head)
    upstream: list[str]  # server stages allowed to send activations on behalf of a device
    update: ServerUpdate  # per micro-batch, or once per round over all devices
    lr: float
    # Micro-batches a middle stage may hold between forward and backward (an upper bound: the
    # actor's handler concurrency admits fewer at once).
    inflight: int
    round_timeout_s: float
    devices: list[ServedDevice]
    # The largest micro-batch a device sends: samples, and sequence length (text; a ViT's
    # token count is the model's). Activations beyond it are refused before they are decoded.
    batch_size: int
    seq_len: int
    run_id: str = ""  # which run: a plan of another run (a fresh coordinator) starts over


@dataclass(kw_only=True, frozen=True, slots=True)
class RoundDone(Message):
    """A device finished round ``round``."""

    KIND = MsgKind.ROUND_DONE
    device: str
    round: int
    n_samples: int
    loss: float  # mean training loss over the round
    stats: RoundStats


@dataclass(kw_only=True, frozen=True, slots=True)
class RoundStart(Message, Request[RoundDone]):
    KIND = MsgKind.ROUND_START
    round: int


@dataclass(kw_only=True, frozen=True, slots=True)
class RoundClose(Message, Request[Ack]):
    """Coordinator → server: every device finished ``round`` (``per_round`` updates apply now)."""

    KIND = MsgKind.ROUND_CLOSE
    round: int
    n_samples: int  # samples trained over all devices this round
    # Training micro-batches over all devices this round: a ``per_round`` update applies the
    # accumulated gradient divided by this, in every stage alike (a stage that only some
    # devices' activations pass through must not weight them more than the head does).
    micro_batches: int
    # The devices whose round counts (they finished it). A device lost or late mid-round is
    # not here: its micro-batches accumulated this round are discarded, never half-applied.
    devices: tuple[str, ...]


# --- durable runs --------------------------------------------------------------------------
@dataclass(kw_only=True, frozen=True, slots=True)
class StateReport(Message):
    """What a device or server needs to continue exactly where it was: its trainable tensors
    (``lora.*``, ``head.*``), optimizer state (``optim.*``) and counters (steps, samples)."""

    KIND = MsgKind.STATE_REPORT
    actor: str
    round: int  # the last round this state has finished
    tensors: dict[str, WireTensor]
    counters: dict[str, int]


@dataclass(kw_only=True, frozen=True, slots=True)
class StateRequest(Message, Request[StateReport]):
    """Coordinator → device/server, between rounds: send your state for a checkpoint."""

    KIND = MsgKind.STATE_REQUEST
    round: int


@dataclass(kw_only=True, frozen=True, slots=True)
class Restore(Message, Request[Ack]):
    """Coordinator → device/server: load this state (a resumed run, a restarted server, a
    device that rejoins) and continue from round ``round + 1``."""

    KIND = MsgKind.RESTORE
    round: int
    tensors: dict[str, WireTensor]
    counters: dict[str, int]


@dataclass(kw_only=True, frozen=True, slots=True)
class EvalResult(Message):
    KIND = MsgKind.EVAL_RESULT
    node: str
    round: int
    stats: EvalStats


@dataclass(kw_only=True, frozen=True, slots=True)
class EvalRequest(Message, Request[EvalResult]):
    """Evaluate this device's share of the held-out batches after round ``round``."""

    KIND = MsgKind.EVAL_REQUEST
    round: int
    # True: activations go through the device's codec, as the deployed system runs; False:
    # uncompressed, to measure the model alone.
    through_codec: bool = True


@dataclass(kw_only=True, frozen=True, slots=True)
class BasisUpload(Message, Request[Ack]):
    """A device's transform-coding basis (:class:`~sft_actors.codec.Basis`), sent before its
    first projected activations and again, under the same ``key``, after every refit.

    Build and read it with :mod:`sft_actors.wire.basis`; the receiver rebuilds the basis and
    refuses it (:class:`CodecError`) unless it hashes to ``digest``. Since protocol 3.3 it
    carries the whole basis (``kind``, ``scales``, ``clip``); a 3.2 upload is refused.
    """

    KIND = MsgKind.BASIS
    device: str
    key: str  # the name the codec chain's ``project.basis`` refers to
    digest: str  # content hash; encoded tensors carry it, so a stale basis is refused
    vectors: WireTensor | None  # (C, K) float16 orthonormal columns; None for kind "center"
    mean: WireTensor  # (C,) float32
    kind: Literal["klt", "center"] = "klt"
    scales: WireTensor | None = None  # (K,) float32 calibrated component scales (3.3: required)
    clip: WireTensor | None = None  # (K,) float32 calibrated clipping ranges (3.3: required)


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
    DevicePlan,
    RoundStart,
    RoundDone,
    EvalRequest,
    EvalResult,
    Ack,
    AdaptersRequest,
    BasisUpload,
    ServerPlan,
    RoundClose,
    StateRequest,
    StateReport,
    Restore,
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
