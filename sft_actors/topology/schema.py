"""Topology schema: frozen, keyword-only dataclasses built from a TOML file by ``loader``.

A topology says *what* runs (``[run]``: model, training, LoRA, data, codec, runtime timing)
and *where* (``[[hosts]]`` and ``[[actors]]``). The same file drives one node
(``sft-node``), a whole local run (``sft run``) and the SSH launcher (``sft launch``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sft_actors.codec.spec import CodecPolicy
from sft_actors.model.config import LoraConfig

Role = Literal["coordinator", "server", "device"]
ROLES: tuple[Role, ...] = ("coordinator", "server", "device")
#: Roles that bind a ROUTER and are addressed by name; devices only connect.
ADDRESSED_ROLES: frozenset[str] = frozenset({"coordinator", "server"})

TrainMode = Literal["sl", "sfl", "sft", "fedlora"]
#: Modes whose devices send coded tensors; the others send raw tensors whatever the codec
#: tables say (``sft_actors.plan.assign`` gives them the identity codec).
CODED_MODES: frozenset[str] = frozenset({"sft"})
ServerUpdate = Literal["per_batch", "per_round"]
#: How the coordinator averages LoRA factors (``sft_actors.train.lora_average``): ``fedavg``
#: averages A and B separately (McMahan et al. 2017); ``svd`` averages the products B·A and
#: re-factorizes to rank r by truncated SVD (as FlexLoRA, Bai et al. 2024).
LoraAveraging = Literal["fedavg", "svd"]
LORA_AVERAGING: tuple[LoraAveraging, ...] = ("fedavg", "svd")
Partition = Literal["iid", "dirichlet"]
DataKind = Literal["text", "instruction"]
#: ``[run.data]`` keys that are loader options of record datasets (jsonl:, csv:, parquet:, file:).
DATA_FIELD_KEYS = ("text_key", "prompt_key", "response_key", "messages_key", "group_key")
RECORD_DATASETS = ("jsonl:", "csv:", "parquet:", "file:")
DType = Literal["float32", "bfloat16", "float16"]
SecurityMode = Literal["none", "curve"]

LOCALHOST = "localhost"
#: ``[[hosts]] address = "auto"``: found when the run starts (``sft_actors.rendezvous``).
AUTO_ADDRESS = "auto"
#: Without ``round_deadline_s``: a round's deadline is this many times the median round so far,
#: and never below the floor (seconds).
ADAPTIVE_DEADLINE_FACTOR = 10.0
ADAPTIVE_DEADLINE_FLOOR_S = 60.0


@dataclass(kw_only=True, slots=True, frozen=True)
class TrainConfig:
    mode: TrainMode = "sft"
    rounds: int = 2
    steps_per_round: int = 4
    batch_size: int = 4
    seq_len: int = 64
    lr: float = 1e-3
    aggregate_every: int = 1
    max_inflight: int = 1
    server_update: ServerUpdate = "per_batch"
    #: Device-side LoRA averaging: ``fedavg`` (A and B averaged separately; avg(B)·avg(A) misses
    #: the cross terms of avg(B·A)) or ``svd`` (the exact sample-weighted avg(B·A), truncated to
    #: rank r by SVD; the re-factorized adapters' AdamW moments are reset on the devices).
    lora_averaging: LoraAveraging = "fedavg"
    eval_batches: int = 4
    #: Micro-batches each device forwards (no update) to fit its PCA basis when its activation
    #: codec has a ``project`` stage; the basis then travels to the server once per run.
    calibration_batches: int = 8
    #: Bound on one round (and on set-up: loading the model and data) before the run fails.
    round_timeout_s: float = 1800.0
    #: A device that has not finished a round this many seconds after it started is a
    #: straggler: dropped from that round (not from the run) and re-admitted later. None:
    #: adaptive — ``round_timeout_s`` for the first round, then 10 × the median round so far
    #: (at least 60 s, at most ``round_timeout_s``).
    round_deadline_s: float | None = None
    #: Quorum: the fewest devices a round may close with. A round that would have fewer waits
    #: up to ``[run.runtime] rejoin_timeout_s`` for devices to (re)join, then the run stops
    #: with an error and a checkpoint. None: a majority, ``ceil(devices / 2)``.
    min_devices: int | None = None

    def deadline_s(self, round_seconds: Sequence[float] = ()) -> float:
        """The round deadline in force (seconds), given the durations of the rounds so far."""
        if self.round_deadline_s is not None:
            return self.round_deadline_s
        if not round_seconds:
            return self.round_timeout_s
        typical = sorted(round_seconds)[len(round_seconds) // 2]
        return min(self.round_timeout_s, max(ADAPTIVE_DEADLINE_FLOOR_S, ADAPTIVE_DEADLINE_FACTOR * typical))

    def quorum(self, n_devices: int) -> int:
        """Fewest devices a round may close with, out of ``n_devices``."""
        return (n_devices + 1) // 2 if self.min_devices is None else self.min_devices


@dataclass(kw_only=True, slots=True, frozen=True)
class DataConfig:
    #: A name ``sft_actors.data.load_dataset`` knows: stdlib-docs, text:<path>, jsonl:<path>,
    #: cifar100, tiny-imagenet, fashion-mnist, digits.
    dataset: str = "stdlib-docs"
    root: str | None = None
    partition: Partition = "iid"
    alpha: float = 0.5
    heldout_fraction: float = 0.1
    #: Loader options, e.g. ``{max_documents = 200}`` for stdlib-docs (see ``sft data info``).
    options: dict[str, Any] = field(default_factory=dict)
    #: What each record of a jsonl:/csv:/parquet:/file: dataset holds: "text" (a document; loss
    #: on every token) or "instruction" (prompt/response or chat messages; loss on responses only).
    kind: DataKind = "text"
    #: JSON keys or CSV/parquet columns; None: "text", "prompt", "response", "messages"; no group.
    text_key: str | None = None
    prompt_key: str | None = None
    response_key: str | None = None
    messages_key: str | None = None
    #: The partitioning label (``partition = "dirichlet"``); None: the file's group.
    group_key: str | None = None
    #: kind = "instruction": "auto" (the model's chat template; the plain format without one),
    #: "none" (the plain format) or a path to a .jinja file / tokenizer_config.json.
    chat_template: str = "auto"

    def loader_options(self) -> dict[str, Any]:
        """``options`` plus the keys above that are set: what ``load_dataset`` is given."""
        out = dict(self.options)
        out.update({k: getattr(self, k) for k in DATA_FIELD_KEYS if getattr(self, k) is not None})
        if self.kind != "text":
            out["kind"] = self.kind
            out["chat_template"] = self.chat_template
        return out


@dataclass(kw_only=True, slots=True, frozen=True)
class OutputConfig:
    dir: str = "runs"


@dataclass(kw_only=True, slots=True, frozen=True)
class CheckpointConfig:
    """``[run.checkpoint]``: what a run keeps so that ``--resume RUN_DIR`` can continue it."""

    #: Write a checkpoint after every ``every`` rounds (and after the last round).
    every: int = 1
    #: Complete checkpoints kept in ``RUN_DIR/checkpoints`` (older ones are deleted).
    keep: int = 2


@dataclass(kw_only=True, slots=True, frozen=True)
class RuntimeConfig:
    """Timing and queue bounds of the actor runtime. Validated against each other."""

    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0
    connect_timeout_s: float = 30.0
    request_timeout_s: float = 60.0
    drain_timeout_s: float = 5.0
    #: Requests (``call``) in flight per peer link: the credit window.
    link_window: int = 8
    mailbox_size: int = 64
    #: Upper bound on the zmq high-water marks, in messages (see ``queue_mb``).
    hwm: int = 1000
    linger_ms: int = 200
    #: Cap on one message (MiB). Sockets also refuse any frame larger than the run's largest
    #: expected tensor (activations, a PCA basis, an adapter), computed from the model and plan.
    max_message_mb: float = 512.0
    #: Bytes a socket may queue per peer (MiB): the high-water marks are this over the largest
    #: expected frame (at most ``hwm``), so a flood or a peer that never reads stays bounded.
    queue_mb: float = 256.0
    #: How long a lost coordinator or server may take to come back (restarted, or resumed
    #: after a pause) before the actors waiting for it give up; also how long a coordinator
    #: below quorum waits for devices to (re)join.
    rejoin_timeout_s: float = 60.0


@dataclass(kw_only=True, slots=True, frozen=True)
class SecurityConfig:
    """``[run.security]``: who may connect to the coordinator and the servers.

    ``mode = "curve"`` puts CurveZMQ (RFC 26: Curve25519 key exchange, authenticated
    encryption) on every tcp and ipc socket and lets in only the public keys of the
    topology's actors, each bound to its own actor name (``sft keys generate F --out DIR``
    makes the pairs). ``mode = "none"`` is for one-process and loopback runs; on a host
    address that is not loopback it needs ``allow_insecure = true`` and warns at start.
    """

    mode: SecurityMode = "none"
    #: The key directory (relative to the directory a node runs in, like ``[run.output] dir``):
    #: ``<actor>.key`` (public, every node reads every actor's) and ``<actor>.key_secret``
    #: (secret, mode 0600, needed only on the host that runs that actor).
    keys: str = "keys"
    #: Accept ``mode = "none"`` on addresses other machines can reach (anyone who can reach
    #: the ports can then join as any actor).
    allow_insecure: bool = False


@dataclass(kw_only=True, slots=True, frozen=True)
class RunConfig:
    name: str
    model: str
    seed: int = 0
    dtype: DType = "float32"
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    #: The codec chain per role, parsed once (``[run.codec.up]`` / ``[run.codec.down]``).
    codec: CodecPolicy = field(default_factory=CodecPolicy)
    output: OutputConfig = field(default_factory=OutputConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)


@dataclass(kw_only=True, slots=True, frozen=True)
class HostSpec:
    name: str
    #: How other machines dial this host; ``"auto"``: known only when the run starts (a
    #: scheduler's allocation): nodes publish and find it via ``sft-node --rendezvous DIR``.
    address: str = "127.0.0.1"
    #: SSH target for ``sft launch`` (``user@board``); empty runs that host's nodes locally.
    ssh: str = ""
    #: Checkout of sft_actors on that host (where the launcher ``cd``s before ``sft-node``).
    workdir: str = "."


@dataclass(kw_only=True, slots=True, frozen=True)
class LinkProfile:
    """Emulated wireless link of one device; ``None`` leaves that direction unpaced."""

    uplink_mbps: float | None = None
    downlink_mbps: float | None = None
    rtt_ms: float = 0.0

    @property
    def is_paced(self) -> bool:
        return self.uplink_mbps is not None or self.downlink_mbps is not None or self.rtt_ms > 0


@dataclass(kw_only=True, slots=True, frozen=True)
class DeviceHardware:
    """Hardware and radio facts the planner uses; the runtime ignores them."""

    memory_mb: float | None = None
    flops: float | None = None
    distance_m: float | None = None
    tx_power_dbm: float | None = None


@dataclass(kw_only=True, slots=True, frozen=True)
class ActorSpec:
    name: str
    role: Role
    host: str = LOCALHOST
    #: TCP port of an addressed actor; 0 binds an ephemeral port (one-process runs only).
    port: int | None = None
    #: Where a device or server computes: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (checked against
    #: the host when the actor starts, and by ``sft topology check`` for this machine's actors).
    device: str = "cpu"
    # --- devices ---
    cut: int | None = None
    shard: int | None = None
    link: LinkProfile = field(default_factory=LinkProfile)
    profile: DeviceHardware = field(default_factory=DeviceHardware)
    #: This device's own codec chains (e.g. a slower radio compresses harder); None inherits
    #: ``[run.codec]``; ``codec = { up = {}, down = {} }`` sends this device's tensors raw.
    codec: CodecPolicy | None = None
    # --- servers ---
    start_block: int | None = None

    @property
    def addressed(self) -> bool:
        return self.role in ADDRESSED_ROLES


@dataclass(kw_only=True, slots=True, frozen=True)
class Topology:
    source: str
    run: RunConfig
    hosts: tuple[HostSpec, ...]
    actors: tuple[ActorSpec, ...]
    #: what the environment checks warn of (instruction data dropped at seq_len), set at load
    data_warnings: tuple[str, ...] = field(default=(), compare=False)

    def actor(self, name: str) -> ActorSpec:
        for a in self.actors:
            if a.name == name:
                return a
        from sft_actors.errors import TopologyError

        known = ", ".join(a.name for a in self.actors)
        raise TopologyError(f"{self.source}: no actor named {name!r}; known actors: {known}")

    def host(self, name: str) -> HostSpec:
        for h in self.hosts:
            if h.name == name:
                return h
        from sft_actors.errors import TopologyError

        raise TopologyError(f"{self.source}: no host named {name!r}; define it in a [[hosts]] table")

    def by_role(self, role: str) -> tuple[ActorSpec, ...]:
        return tuple(a for a in self.actors if a.role == role)

    @property
    def coordinator(self) -> ActorSpec:
        return self.by_role("coordinator")[0]

    @property
    def devices(self) -> tuple[ActorSpec, ...]:
        return self.by_role("device")

    @property
    def servers(self) -> tuple[ActorSpec, ...]:
        return self.by_role("server")

    def connections(self, name: str) -> tuple[str, ...]:
        """Addressed actors that ``name`` dials at start-up (one link per pair of actors).

        Devices dial every addressed actor; an addressed actor dials the addressed actors
        declared before it in role order (servers dial the coordinator, a later server stage
        dials earlier ones), so each pair shares exactly one DEALER→ROUTER link.
        """
        me = self.actor(name)
        if not me.addressed:
            return tuple(a.name for a in self.actors if a.addressed)
        order = sorted(
            (a for a in self.actors if a.addressed),
            key=lambda a: (ROLES.index(a.role), self.actors.index(a)),
        )
        names = [a.name for a in order]
        return tuple(names[: names.index(name)])

    def schema_parts(self) -> dict[str, Any]:
        """What both ends of a link must agree on; hashed into the HELLO handshake."""
        run = self.run
        return {
            "model": run.model,
            "dtype": run.dtype,
            "split": {
                "devices": {d.name: d.cut for d in self.devices},
                "servers": {s.name: s.start_block for s in self.servers},
            },
            "lora": run.lora,
            "codec": run.codec,
            "device_codecs": {d.name: d.codec for d in self.devices if d.codec is not None},
        }

    def codec_policy(self, device: str) -> CodecPolicy:
        """The codec chains that apply to ``device``: its own ``codec`` table, else ``[run.codec]``."""
        spec = self.actor(device)
        return spec.codec if spec.codec is not None else self.run.codec
