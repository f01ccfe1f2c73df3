"""The device side of one split-learning step, as a pure state machine (no sockets).

``forward`` runs the device's blocks on a micro-batch and returns the cut activations to send;
``backward`` takes the gradient the server returned for that micro-batch, finishes the backward
pass and steps the optimizer. Up to ``max_inflight`` micro-batches may be between the two.

Why snapshots: with ``max_inflight > 1`` the next forward runs before the previous
micro-batch's gradient has come back. Stepping the optimizer in place would invalidate the
saved tensors of the graphs still in flight (autograd refuses), and using the new weights would
compute the gradient at weights the forward never saw. So each forward runs on a private copy of
the (small) LoRA tensors via ``torch.func.functional_call``; its gradient — exact for the weights
it used, at most ``max_inflight - 1`` updates stale — is applied to the live parameters. With
``max_inflight = 1`` the copy equals the live weights and this is exact split learning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call

from sft_actors.errors import ConfigError, NonFiniteLoss, ProtocolViolation
from sft_actors.model import Part
from sft_actors.placement import to_compute
from sft_actors.train.accumulate import OrderedGradients, device_of
from sft_actors.train.state import TrainerState, counter, load_trainer_tensors, trainer_tensors


class StepOrderError(ProtocolViolation):
    """A gradient arrived for a micro-batch that is not in flight (duplicate, unknown or late)."""


@dataclass(slots=True)
class _InFlight:
    hidden: torch.Tensor
    snapshot: dict[str, torch.Tensor]


class DeviceTrainer:
    """Forward/backward bookkeeping and the optimizer for one device part."""

    def __init__(
        self,
        part: Part,
        *,
        lr: float,
        max_inflight: int = 1,
        weight_decay: float = 0.0,
        accumulate: bool = False,
    ) -> None:
        """``accumulate=True`` keeps each micro-batch's gradient until :meth:`end_round` (a
        server stage's ``per_round`` update; ``step`` is then the micro-batch's order key);
        otherwise every backward steps the optimizer."""
        if max_inflight < 1:
            raise ConfigError(f"max_inflight must be >= 1, got {max_inflight}")
        self.part = part
        self.max_inflight = max_inflight
        self.params = {n: p for n, p in part.named_parameters() if p.requires_grad}
        if not self.params:
            raise ConfigError("the device part has no trainable parameters (is LoRA applied?)")
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=lr, weight_decay=weight_decay)
        self._inflight: dict[int, _InFlight] = {}
        self.accumulate = accumulate
        self._accumulated = OrderedGradients()
        self.steps_done = 0

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def forward(self, step: int, *inputs: Any) -> torch.Tensor:
        """Run the part on ``inputs``; returns the detached output ``(B, T, C)`` to send on."""
        if len(self._inflight) >= self.max_inflight:
            raise StepOrderError(f"{len(self._inflight)} micro-batches already in flight (max_inflight)")
        if step in self._inflight:
            raise StepOrderError(f"micro-batch {step} is already in flight")
        snapshot = {n: p.detach().clone().requires_grad_(True) for n, p in self.params.items()}
        inputs = tuple(to_compute(x, self.part.device) if isinstance(x, torch.Tensor) else x for x in inputs)
        hidden: torch.Tensor = functional_call(self.part, snapshot, inputs)
        self._inflight[step] = _InFlight(hidden=hidden, snapshot=snapshot)
        return hidden.detach()

    @torch.no_grad()
    def forward_eval(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.part(to_compute(inputs, self.part.device))  # type: ignore[no-any-return]

    def backward(self, step: int, grad: torch.Tensor) -> None:
        """Finish micro-batch ``step`` with the server's gradient and step the optimizer."""
        entry = self._inflight.pop(step, None)
        if entry is None:
            raise StepOrderError(f"gradient for micro-batch {step}, which is not in flight")
        if grad.shape != entry.hidden.shape:
            raise StepOrderError(
                f"gradient shape {tuple(grad.shape)} != activation shape {tuple(entry.hidden.shape)}"
            )
        if not bool(torch.isfinite(grad).all()):  # never let a bad gradient reach the optimizer
            raise ProtocolViolation(f"the gradient for micro-batch {step} contains NaN or inf; dropped")
        torch.autograd.backward(entry.hidden, to_compute(grad, entry.hidden.device, entry.hidden.dtype))
        grads = [t.grad for t in entry.snapshot.values()]
        if not all(g is None or bool(torch.isfinite(g).all()) for g in grads):
            raise NonFiniteLoss(f"micro-batch {step} gives non-finite gradients; no update made")
        if self.accumulate:  # kept per micro-batch, summed in step order at end_round
            self._accumulated.add(step, {name: t.grad for name, t in entry.snapshot.items()})
            return
        for name, p in self.params.items():
            p.grad = entry.snapshot[name].grad
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1

    def end_round(self, micro_batches: int | None = None) -> int:
        """Apply the accumulated gradients (``accumulate=True``): their step-ordered sum divided
        by ``micro_batches`` (default: how many were accumulated); returns how many there were."""
        if not self.accumulate or len(self._accumulated) == 0:
            return 0
        n = self._accumulated.apply_mean(self.params, micro_batches or 0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        return n

    def abandon(self, step: int) -> None:
        """Drop a micro-batch whose gradient will never come (e.g. the server refused it)."""
        self._inflight.pop(step, None)

    def abandon_all(self) -> int:
        """Drop every micro-batch in flight (a round that failed half-way); returns how many."""
        n = len(self._inflight)
        self._inflight.clear()
        return n

    @torch.no_grad()
    def reset_moments(self, params: Iterable[torch.nn.Parameter]) -> int:
        """Reset the optimizer state of ``params`` to a fresh AdamW's (moments and step count
        zero), e.g. after the coordinator re-factorized those adapters in a new basis. Parameters
        that have no state yet are left alone; returns how many were reset."""
        n = 0
        for p in params:
            state = self.optimizer.state.get(p)
            if state:
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        value.zero_()
                n += 1
        return n

    # --- state (checkpoints, rejoin) ----------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Copies of the trainable parameters (``param.<name>``) and the optimizer state
        (``optim.<name>.<entry>``). Micro-batches in flight or accumulated are not part of it:
        take it between rounds."""
        return trainer_tensors(self.params, self.optimizer)

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load :meth:`state_tensors` output; forgets micro-batches in flight and accumulated.

        Raises :class:`CheckpointError` naming the key for a missing parameter, an unknown key
        or a shape/dtype mismatch (parameters then unchanged)."""
        load_trainer_tensors(self.params, self.optimizer, tensors)
        self._inflight.clear()
        self._accumulated = OrderedGradients()

    def state(self) -> TrainerState:
        """:meth:`state_tensors` and the counter ``steps_done`` (a server stage's trainer)."""
        return TrainerState(tensors=self.state_tensors(), counters={"steps_done": self.steps_done})

    def restore(self, state: TrainerState) -> None:
        """Load a :meth:`state`; raises :class:`CheckpointError` (see :meth:`load_state_tensors`)."""
        steps_done = counter(state, "steps_done")
        self.load_state_tensors(state.tensors)
        self.steps_done = steps_done

    def drop_devices(self, keep: Callable[[int], bool]) -> int:
        """Forget accumulated micro-batches (``accumulate=True``, keyed by
        :func:`~sft_actors.train.accumulate.order_key`) of devices whose index ``keep``
        rejects; returns how many were dropped. Micro-batches in flight are left alone (their
        gradient still comes back through the stages)."""
        return self._accumulated.discard(lambda key: keep(device_of(key)))
