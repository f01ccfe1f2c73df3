"""One exception hierarchy for the whole project.

Every error a user or a peer can cause is an :class:`SftError`. Pure layers raise these;
the actor boundary turns them into ERROR frames (see ``wire``), and the caller raises
:class:`RemoteError` carrying the remote type name and message.
"""

from __future__ import annotations


class SftError(Exception):
    """Base of every error raised on purpose by sft_actors."""


# --- wire / protocol -------------------------------------------------------------------
class ProtocolError(SftError):
    """A frame or message that does not follow the wire protocol."""


class MalformedFrame(ProtocolError):
    """Bytes that cannot be decoded: not msgpack, truncated, wrong types, inconsistent lengths."""


class FrameTooLarge(ProtocolError):
    """A frame (or the sum of a message's frames) exceeds the configured limit."""


class UnknownMessageKind(ProtocolError):
    """A header names a message kind this build does not know."""


class VersionMismatch(ProtocolError):
    """The peer speaks another major protocol version."""


class SchemaMismatch(ProtocolError):
    """The peer was configured differently (model, split plan, LoRA, dtype or codec set)."""


class UnexpectedReply(ProtocolError):
    """A request was answered with a message kind other than the one it declares."""


class ProtocolViolation(ProtocolError):
    """A well-formed message that breaks the protocol: wrong sender, no plan yet, a cut below
    the server's first block, a gradient for a micro-batch that is not in flight."""


class NotWelcomed(ProtocolError):
    """A message from a peer this actor has no handshake with (it must say HELLO first). A
    dialling peer that gets it back knows the actor it dialled restarted and forgot it."""


class IdentityRefused(ProtocolError):
    """A peer that is not who it may be: its CURVE key belongs to another actor, it claims the
    receiver's own name or another role, or it is not an actor that connects to the receiver."""


# --- codec -----------------------------------------------------------------------------
class CodecError(SftError):
    """A tensor cannot be encoded (e.g. NaN/inf) or a payload cannot be decoded."""


# --- runtime ---------------------------------------------------------------------------
class RuntimeFault(SftError):
    """Base for failures of the actor runtime."""


class PeerTimeout(RuntimeFault):
    """A call got no reply in time, or a peer stopped sending heartbeats."""


class PeerLost(PeerTimeout):
    """A request was pending when its peer was lost (silent, disconnected, said BYE, or came
    back as a new process): no reply will come."""


class ServerLost(RuntimeFault):
    """A server stage was lost mid-round: the round is aborted and the run rolls back to its
    last checkpoint once the server is back."""


class UnknownPeer(RuntimeFault):
    """A message was addressed to, or came from, a peer that is not known."""


class RoundFailed(RuntimeFault):
    """No device finished a round (each was lost, late or refused): there is nothing to average
    or report, so the run stops ``failed`` with each device's cause rather than count it."""


class RemoteError(RuntimeFault):
    """The peer answered with an ERROR frame; ``remote_type`` names its exception class."""

    def __init__(self, remote_type: str, message: str, *, peer: str = "") -> None:
        self.remote_type = remote_type
        self.remote_message = message
        self.peer = peer
        where = f" from {peer}" if peer else ""
        super().__init__(f"{remote_type}{where}: {message}")


class ActorFailed(RuntimeFault):
    """An actor failed during start-up or while running."""


# --- training ----------------------------------------------------------------------------
class NonFiniteLoss(SftError):
    """A training loss is NaN or inf: the run diverged (a too large learning rate, a dtype
    whose range the run exceeds). Not a peer's bad message: it stops the run, ``failed``, with a
    reason naming the round and the device ("non-finite training loss at round 2 on dev1: …")."""


# --- configuration, models, data -------------------------------------------------------
class ConfigError(SftError):
    """A configuration value is invalid."""


class TopologyError(ConfigError):
    """A topology file is invalid. The message names the file, the table, the key and the fix."""


class ModelSpecError(ConfigError):
    """A model spec cannot be resolved (say what to install or where to put the files)."""


class DatasetNotFound(ConfigError):
    """A dataset's files are missing (the message says where to put them)."""


class KeyFileError(ConfigError):
    """A CURVE key file is missing, malformed, readable by others or shared by two actors (the
    message names the file and the command that fixes it)."""


class PlanInfeasible(ConfigError):
    """The planner cannot satisfy a constraint (the message names the device and the limit)."""


class CheckpointError(SftError):
    """A checkpoint is missing, corrupt (a file's hash does not match) or incompatible (unknown
    format, tensors of other shapes). The message names the path and what to do."""


class DatasetCorrupt(SftError):
    """A dataset file exists but is not in the expected format (the message names the file)."""


class UnsafePickle(DatasetCorrupt):
    """A pickle-format dataset file references a class or function outside the allow-list."""
