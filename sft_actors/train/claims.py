"""What a device reports, checked against its plan before the coordinator believes it.

FedAvg weights each device's adapters by the samples it claims, and the run's summary is built
from the losses and held-out shares devices report. A device that claims a billion samples
would own the average; one that reports a near-zero held-out loss would make the summary lie.
Keys (CURVE) stop strangers and impostors; these bounds stop a buggy or compromised device
from claiming more than its plan lets it do. Each check raises
:class:`~sft_actors.errors.ProtocolViolation` naming the device, the claim and the bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from sft_actors.errors import NonFiniteLoss, ProtocolViolation
from sft_actors.topology.schema import TrainConfig
from sft_actors.wire.messages import AdaptersUp, RoundDone
from sft_actors.wire.plans import EvalStats


def round_samples(train: TrainConfig) -> int:
    """The most samples one device trains in one round: steps × micro-batch."""
    return train.steps_per_round * train.batch_size


def check_round_done(msg: RoundDone, *, device: str, round_: int, train: TrainConfig) -> None:
    """``msg`` answers round ``round_`` of ``device``, with at most a round's samples and a finite,
    non-negative loss."""
    _who(msg.device, device, msg.round, round_)
    _samples(msg.n_samples, round_samples(train), device, "in one round")
    if not math.isfinite(msg.loss) or msg.loss < 0:
        raise ProtocolViolation(f"{device} reports a training loss of {msg.loss!r}")


def check_adapters_up(msg: AdaptersUp, *, device: str, round_: int, train: TrainConfig) -> None:
    """``msg`` carries ``device``'s adapters, weighted by at most the samples it can have trained
    since the last averaging (``aggregate_every`` rounds)."""
    _who(msg.device, device, msg.round, round_)
    _samples(msg.n_samples, round_samples(train) * train.aggregate_every, device, "since the last averaging")


def check_adapters_finite(tensors: Mapping[str, torch.Tensor], *, device: str, round_: int) -> None:
    """Every adapter tensor ``device`` sent for round ``round_`` is finite. NaN or inf there is
    the run diverging on that device (its own training made them), not a claim to refuse:
    raises :class:`NonFiniteLoss`, which fails the run, before any average or SVD sees them."""
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise NonFiniteLoss(f"non-finite adapters from {device} at round {round_}: {bad[0]}{more}")


def check_eval(stats: EvalStats, *, device: str, train: TrainConfig, tokens_per_sample: int) -> None:
    """A held-out share within ``eval_batches`` micro-batches of ``tokens_per_sample`` targets
    each (1 for a classifier), with a finite non-negative loss sum and ``correct ≤ targets``."""
    most = train.eval_batches * train.batch_size * tokens_per_sample
    if not 0 <= stats.batches <= train.eval_batches or not 0 <= stats.targets <= most:
        raise ProtocolViolation(
            f"{device} reports {stats.targets} held-out targets in {stats.batches} batches; "
            f"the plan allows at most {most} in {train.eval_batches}"
        )
    if not math.isfinite(stats.loss_sum) or stats.loss_sum < 0 or not 0 <= stats.correct <= stats.targets:
        raise ProtocolViolation(
            f"{device} reports a held-out loss sum of {stats.loss_sum!r} and {stats.correct} correct"
        )


def _who(claimed: str, device: str, claimed_round: int, round_: int) -> None:
    if claimed != device or claimed_round != round_:
        raise ProtocolViolation(
            f"{device} answered as {claimed!r} for round {claimed_round}, not round {round_}"
        )


def _samples(n: int, most: int, device: str, when: str) -> None:
    if not 0 <= n <= most:
        raise ProtocolViolation(f"{device} claims {n} samples {when}; its plan allows at most {most}")
