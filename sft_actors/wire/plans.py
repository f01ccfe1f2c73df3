"""Typed structs that travel inside messages: the per-actor plan and the stats actors report.

The coordinator turns a topology (and the planner's choices) into one :class:`DevicePlan` per
device and one :class:`ServerPlan` per server actor; an actor builds everything it runs from its
plan and never reads the topology for what the plan carries. Stats replace metrics dicts, so a
misspelt key is an error at import, not a silent zero in a summary.

The components' own configs travel unchanged: a codec :class:`CodecPolicy` (its ``ChainSpec``
per role) and the model's :class:`LoraConfig`. On decode each runs its own validation, so a peer
cannot smuggle an invalid chain past the checks a topology file gets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from sft_actors.codec.spec import CodecPolicy
from sft_actors.model.config import LoraConfig
from sft_actors.topology.schema import DType, Partition, ServerUpdate, TrainMode

#: What a held-out evaluation measures: perplexity (language model) or accuracy (classifier).
EvalTask = Literal["lm", "classification"]


@dataclass(kw_only=True, frozen=True, slots=True)
class ModelPlan:
    """The frozen base and the adapters every part of the split builds."""

    model: str  # a spec ``sft_actors.model.resolve_spec`` accepts: preset, .gguf, HF directory
    dtype: DType  # base weights; adapters and optimizer state stay float32
    lora: LoraConfig
    seed: int  # adapter init (per global block, so every part agrees) and data order


@dataclass(kw_only=True, frozen=True, slots=True)
class DataPlan:
    """Which data a device trains and evaluates on (every device derives the same partition)."""

    dataset: str  # a name ``sft_actors.data.load_dataset`` knows
    root: str | None
    partition: Partition
    alpha: float  # Dirichlet concentration (``partition = "dirichlet"``)
    heldout_fraction: float
    options: dict[str, Any] = field(default_factory=dict)  # loader options, e.g. max_documents
    batch_size: int
    seq_len: int  # tokens per sequence (text); ignored for images
    eval_batches: int  # held-out batches over all devices
    seed: int


@dataclass(kw_only=True, frozen=True, slots=True)
class TrainPlan:
    """A device's round schedule and optimizer settings."""

    rounds: int
    steps_per_round: int  # micro-batches per round
    lr: float  # AdamW learning rate
    max_inflight: int  # micro-batches between forward and gradient (1 = exact split learning)
    aggregate_every: int  # rounds between per-block adapter averaging
    calibration_batches: int  # forward-only batches to fit a PCA basis (``project`` chains)
    round_timeout_s: float  # bound on one request to the server (a round's work)


@dataclass(kw_only=True, frozen=True, slots=True)
class ServedDevice:
    """A device as its server sees it: where it cuts and how its tensors are coded."""

    name: str
    index: int  # position among the topology's devices (seeds per device derive from it)
    cut: int  # the device runs blocks [0, cut)
    codec: CodecPolicy  # identity in modes without a codec


@dataclass(kw_only=True, frozen=True, slots=True)
class RoundStats:
    """What one device measured over one round (bytes are on-the-wire sizes)."""

    bytes_up: int  # coded activations sent
    bytes_down: int  # coded gradients received
    raw_up: int  # the same activations as raw tensors (what an uncompressed run sends)
    raw_down: int
    encode_ms: float  # activation encoding, summed
    round_s: float  # wall time of the round on the device
    step_ms_median: float  # forward → gradient → update, per micro-batch
    targets: int  # tokens (or samples) the loss was averaged over
    # Transform-coding bases uploaded this round (the first fit counts in the device's first
    # round, refits in the round they happened): wire bytes and number of refits.
    basis_bytes: int = 0
    basis_refits: int = 0


@dataclass(kw_only=True, frozen=True, slots=True)
class EvalStats:
    """One device's share of a held-out evaluation (sums, so shares merge exactly)."""

    task: EvalTask
    loss_sum: float  # sum over targets of the per-target loss (nats)
    targets: int
    correct: int  # classification only (0 for a language model)
    batches: int


__all__ = [
    "DataPlan",
    "EvalStats",
    "EvalTask",
    "ModelPlan",
    "RoundStats",
    "ServedDevice",
    "ServerUpdate",
    "TrainMode",
    "TrainPlan",
]
