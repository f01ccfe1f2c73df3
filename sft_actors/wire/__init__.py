"""Wire format: message kinds, frozen message dataclasses, tensor frames, envelope encode/decode.

A pure layer: it never imports actors, transport or runtime, and never pickles.
"""

from sft_actors.wire.envelope import (
    PROTOCOL_VERSION,
    Envelope,
    WireLimits,
    decode,
    encode,
    encode_error,
    raise_remote,
    remote_error,
)
from sft_actors.wire.kinds import MsgKind
from sft_actors.wire.messages import (
    ALL_MESSAGES,
    Ack,
    Activations,
    AdaptersDown,
    AdaptersRequest,
    AdaptersUp,
    Bye,
    Error,
    EvalRequest,
    EvalResult,
    Gradients,
    Heartbeat,
    Hello,
    Message,
    Metrics,
    Plan,
    RoundDone,
    RoundStart,
    Shutdown,
    Welcome,
    message_class,
)
from sft_actors.wire.schema import check_schema, schema_hash
from sft_actors.wire.tensors import TensorDesc, WireTensor

__all__ = [
    "ALL_MESSAGES",
    "PROTOCOL_VERSION",
    "Ack",
    "Activations",
    "AdaptersDown",
    "AdaptersRequest",
    "AdaptersUp",
    "Bye",
    "Envelope",
    "Error",
    "EvalRequest",
    "EvalResult",
    "Gradients",
    "Heartbeat",
    "Hello",
    "Message",
    "Metrics",
    "MsgKind",
    "Plan",
    "RoundDone",
    "RoundStart",
    "Shutdown",
    "TensorDesc",
    "Welcome",
    "WireLimits",
    "WireTensor",
    "check_schema",
    "decode",
    "encode",
    "encode_error",
    "message_class",
    "raise_remote",
    "remote_error",
    "schema_hash",
]
