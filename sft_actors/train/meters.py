"""What a device measures over a round (:class:`RoundMeter`) and an evaluation (:class:`EvalMeter`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sft_actors.train.summary import median_or_zero
from sft_actors.wire.plans import EvalStats, EvalTask, RoundStats


@dataclass(slots=True)
class RoundMeter:
    """What one device measures over one round; :meth:`stats` freezes it for the wire."""

    losses: list[float] = field(default_factory=list)
    targets: int = 0
    bytes_up: int = 0
    raw_up: int = 0
    bytes_down: int = 0
    raw_down: int = 0
    encode_ms: float = 0.0
    step_ms: list[float] = field(default_factory=list)
    basis_bytes: int = 0
    basis_refits: int = 0

    def sent(self, *, raw: int, coded: int, encode_ms: float = 0.0) -> None:
        """Activations of one micro-batch left: ``raw`` bytes as a tensor, ``coded`` on the wire."""
        self.raw_up += raw
        self.bytes_up += coded
        self.encode_ms += encode_ms

    def received(self, *, raw: int, coded: int) -> None:
        self.raw_down += raw
        self.bytes_down += coded

    def basis_sent(self, nbytes: int, *, refit: bool = False) -> None:
        """A transform-coding basis of ``nbytes`` tensor bytes went up (``refit``: a refit, not
        the first fit, whose bytes the session hands over at the first round)."""
        self.basis_bytes += nbytes
        self.basis_refits += int(refit)

    def step_done(self, *, loss: float, targets: int, step_ms: float) -> None:
        self.losses.append(loss)
        self.targets += targets
        self.step_ms.append(step_ms)

    @property
    def loss(self) -> float:
        """Mean training loss over the round's micro-batches (0.0 before the first)."""
        return sum(self.losses) / max(1, len(self.losses))

    def stats(self, round_s: float) -> RoundStats:
        return RoundStats(
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            raw_up=self.raw_up,
            raw_down=self.raw_down,
            encode_ms=round(self.encode_ms, 3),
            round_s=round(round_s, 4),
            step_ms_median=round(median_or_zero(self.step_ms), 3),
            targets=self.targets,
            basis_bytes=self.basis_bytes,
            basis_refits=self.basis_refits,
        )


@dataclass(slots=True)
class EvalMeter:
    """Sums over this device's held-out batches (shares of all devices merge exactly)."""

    task: EvalTask
    loss_sum: float = 0.0
    targets: int = 0
    correct: int = 0
    batches: int = 0

    def add(self, loss: float, targets: int, correct: int) -> None:
        self.loss_sum += loss * targets
        self.targets += targets
        self.correct += correct
        self.batches += 1

    def stats(self) -> EvalStats:
        return EvalStats(
            task=self.task,
            loss_sum=self.loss_sum,
            targets=self.targets,
            correct=self.correct,
            batches=self.batches,
        )
