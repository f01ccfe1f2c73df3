"""Byte budgets of a run's sockets, from the model and the plan, applied before any allocation.

libzmq reads a frame's length before its bytes: with MAXMSGSIZE set, a peer announcing a frame
larger than anything the run can legitimately send is disconnected before a byte of it is
buffered. The largest legitimate frame is known from the model config and the plan: the cut
activations of one micro-batch (and their gradient, the same shape), a PCA basis, one adapter
or trainable-head tensor, the header. High-water marks count messages, so they are set from a
byte budget per peer (``[run.runtime] queue_mb``) divided by that frame size.
"""

from __future__ import annotations

from sft_actors.errors import SftError
from sft_actors.model.config import LlamaConfig, ModelConfig
from sft_actors.topology import Topology
from sft_actors.transport.sockets import SocketOptions
from sft_actors.wire.envelope import WireLimits

MIB = 2**20
_FP32 = 4
_INT64 = 8
#: Slack over the largest expected tensor frame (a coded frame can exceed its raw tensor a little;
#: an eval batch is not larger than a training one).
_MARGIN = 2


def largest_frame_bytes(topology: Topology, config: ModelConfig) -> int:
    """The biggest tensor frame any actor of ``topology`` sends (bytes, raw fp32 sizes)."""
    t, rank = topology.run.train, topology.run.lora.rank
    if isinstance(config, LlamaConfig):
        tokens, inner, head = t.seq_len, max(config.ffn_dim, config.kv_dim), 0
    else:
        tokens, inner, head = config.num_tokens, config.mlp_dim, config.num_classes * (config.dim + 1)
    activations = t.batch_size * tokens * config.dim * _FP32
    labels = t.batch_size * tokens * _INT64
    basis = config.dim * config.dim * _FP32
    adapter = rank * max(config.dim, inner) * _FP32
    return max(activations, labels, basis, adapter, head * _FP32)


def socket_options(topology: Topology, config: ModelConfig | None, limits: WireLimits) -> SocketOptions:
    """MAXMSGSIZE and high-water marks for every socket of the run.

    Without a model config (a stand-in model in tests) frames are capped by ``max_message_mb``
    only. The frame cap is never below the header limit (a header is one frame).
    """
    rt = topology.run.runtime
    cap = int(rt.max_message_mb * MIB)
    if config is None:
        frame = cap
    else:
        frame = min(cap, _MARGIN * largest_frame_bytes(topology, config) + limits.max_header_bytes)
    hwm = int(rt.queue_mb * MIB) // frame
    hwm = max(2 * rt.link_window + 2, min(rt.hwm, hwm))
    return SocketOptions(
        sndhwm=hwm,
        rcvhwm=hwm,
        linger_ms=rt.linger_ms,
        max_msg_bytes=frame,
        handover=topology.run.security.mode == "none",
    )


def socket_options_unplanned(topology: Topology) -> SocketOptions:
    """Options from the runtime settings alone (no frame cap beyond ``max_message_mb``)."""
    rt = topology.run.runtime
    return SocketOptions(
        sndhwm=rt.hwm, rcvhwm=rt.hwm, linger_ms=rt.linger_ms, max_msg_bytes=int(rt.max_message_mb * MIB)
    )


def run_model_config(topology: Topology) -> ModelConfig | None:
    """The run's model config (read again: the topology keeps only its name); None when the
    model is not one the model layer can resolve here (a test's stand-in)."""
    from sft_actors.model.spec import load_config, resolve_spec  # reads the config file only

    try:
        return load_config(resolve_spec(topology.run.model))
    except (SftError, OSError, KeyError, ValueError, TypeError):  # only: no tighter budget than the cap
        return None
