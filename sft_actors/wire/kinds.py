"""Message kinds. The numbers are the protocol: never renumber or reuse a code.

A new kind gets the next free code and a minor protocol version bump; a peer that does not know
it answers UnknownMessageKind instead of guessing.
"""

from __future__ import annotations

from enum import IntEnum


class MsgKind(IntEnum):
    """One code per message type (see ``messages.py`` for each body)."""

    # --- session ---------------------------------------------------------------------------
    HELLO = 1  # peer -> addressed node: "I am node X, role R, configured as schema S"
    WELCOME = 2  # addressed node -> peer: handshake accepted; heartbeat interval and credits
    # --- split training step -----------------------------------------------------------------
    ACTIVATIONS = 3  # device -> server: cut activations + labels of one micro-batch
    GRADIENTS = 4  # server -> device: gradient w.r.t. those activations, and the loss
    # --- adapter aggregation -----------------------------------------------------------------
    ADAPTERS_UP = 5  # device -> coordinator: device-side LoRA tensors, weighted by n_samples
    ADAPTERS_DOWN = 6  # coordinator -> device: per-block averaged LoRA tensors
    # --- health and telemetry ----------------------------------------------------------------
    HEARTBEAT = 7  # any -> any: liveness, with a sequence number and send time
    METRICS = 8  # any -> coordinator: named scalar measurements
    ERROR = 9  # any -> any: a request failed; raised at the caller as RemoteError
    SHUTDOWN = 10  # coordinator -> any: stop politely (drain, then exit)
    BYE = 11  # any -> any: this node is leaving; forget it without waiting for timeouts
    # --- training protocol -------------------------------------------------------------------
    PLAN = 12  # coordinator -> device: its whole plan (cut, shard, model, data, schedule, codec)
    ROUND_START = 13  # coordinator -> devices: begin round r
    ROUND_DONE = 14  # device -> coordinator: round r finished, with samples, loss and stats
    EVAL_REQUEST = 15  # coordinator -> node: evaluate on a data split after round r
    EVAL_RESULT = 16  # node -> coordinator: the evaluation's values
    ACK = 17  # any -> any: generic reply to a message id; may grant flow-control credits
    ADAPTERS_REQUEST = 18  # coordinator -> device/server: answer ADAPTERS_UP with your LoRA (1.1)
    BASIS = 19  # device -> server: its activation codec's PCA basis, once per run (1.1)
    SERVER_PLAN = 20  # coordinator -> server: block range, next stage, per-device codecs (2.0)
    ROUND_CLOSE = 21  # coordinator -> server: every device finished round r (2.0)
    # --- durable runs ------------------------------------------------------------------------
    STATE_REQUEST = 22  # coordinator -> device/server: answer STATE_REPORT for a checkpoint (3.0)
    STATE_REPORT = 23  # device/server -> coordinator: adapters, optimizer state, counters (3.0)
    RESTORE = 24  # coordinator -> device/server: continue from this state (resume, rejoin) (3.0)
