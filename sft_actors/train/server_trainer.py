"""The server side of split learning, as a pure state machine (no sockets).

One shared server part serves every device: it enters each micro-batch at that device's cut,
computes the loss, and returns the gradient w.r.t. the cut activations. Its LoRA is updated
either after every micro-batch (``per_batch``) or once per round over the gradients of all
devices' micro-batches (``per_round``, the mean of the accumulated gradients).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sft_actors.errors import ConfigError, NonFiniteLoss
from sft_actors.model import Part
from sft_actors.placement import to_compute
from sft_actors.topology.schema import ServerUpdate
from sft_actors.train.accumulate import OrderedGradients, device_of
from sft_actors.train.state import TrainerState, counter, load_trainer_tensors, trainer_tensors


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerResult:
    grad: torch.Tensor | None  # (B, T, C) w.r.t. the cut activations; None for evaluation
    loss: float  # mean loss over the micro-batch's target tokens (or samples)
    n_targets: int  # tokens (LM) or samples (classification) behind ``loss``
    correct: int  # correct predictions (classification); 0 for LMs


class ServerTrainer:
    def __init__(self, part: Part, *, lr: float, update: ServerUpdate = "per_batch") -> None:
        if update not in ("per_batch", "per_round"):
            raise ConfigError(f"server_update must be 'per_batch' or 'per_round', got {update!r}")
        self.part = part
        self.update = update
        self.params = {n: p for n, p in part.named_parameters() if p.requires_grad}
        self.optimizer = (
            torch.optim.AdamW(self.params.values(), lr=lr, weight_decay=0.0) if self.params else None
        )
        self._accumulated = OrderedGradients()
        self.batches_done = 0

    def train_step(
        self, hidden: torch.Tensor, labels: torch.Tensor, cut: int, *, key: int | None = None
    ) -> ServerResult:
        """Forward from ``cut`` (hidden: (B, T, C) or (B, N, C)), loss, backward; ``per_batch``
        steps the optimizer now, ``per_round`` keeps the gradient under ``key`` (see
        :func:`~sft_actors.train.accumulate.order_key`; default: arrival order) until
        :meth:`end_round`. Raises :class:`NonFiniteLoss` for a NaN/inf loss or non-finite
        gradients (nothing applied either way): the inputs passed ``check_activations``, so
        the run diverged.

        ``hidden`` arrives on the CPU in any float dtype; it enters the part on its device in the
        base dtype (bfloat16 runs compute in bfloat16), the loss is float32, and the returned
        gradient (B, T, C) is in the base dtype on the part's device."""
        part = self.part
        x = to_compute(hidden.detach(), part.device, part.dtype).requires_grad_(True)  # the cut: a leaf
        labels = to_compute(labels, part.device)
        out = self.part(x, cut)
        loss = self.part.loss(out, labels)  # type: ignore[operator]
        if not bool(torch.isfinite(loss)):  # nothing applied: the shared part stays as it was
            raise NonFiniteLoss(
                f"the server's loss of this micro-batch is {float(loss.detach())}; no update made"
            )
        loss.backward()
        if not _all_finite([x.grad, *(p.grad for p in self.params.values())]):
            self._take_grads()  # drop them: huge finite inputs can still overflow the backward
            # The inputs passed check_activations: the run diverged (a too large lr), which
            # must stop it, not drop the device as if it had sent a bad message.
            value = float(loss.detach())
            raise NonFiniteLoss(
                f"the server gradients of this micro-batch are non-finite (loss {value:.4g}); no update made"
            )
        if self.optimizer is not None:
            if self.update == "per_round":
                self._accumulated.add(self.batches_done if key is None else key, self._take_grads())
            else:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.batches_done += 1
        n, correct = count_targets(out, labels)
        assert x.grad is not None
        return ServerResult(grad=x.grad, loss=float(loss.detach()), n_targets=n, correct=correct)

    @torch.no_grad()
    def eval_step(self, hidden: torch.Tensor, labels: torch.Tensor, cut: int) -> ServerResult:
        part = self.part
        out = part(to_compute(hidden, part.device, part.dtype), cut)
        labels = to_compute(labels, part.device)
        loss = self.part.loss(out, labels)  # type: ignore[operator]
        n, correct = count_targets(out, labels)
        return ServerResult(grad=None, loss=float(loss), n_targets=n, correct=correct)

    def _take_grads(self) -> dict[str, torch.Tensor | None]:
        grads = {n: p.grad for n, p in self.params.items()}
        for p in self.params.values():
            p.grad = None
        return grads

    def end_round(self, micro_batches: int | None = None) -> int:
        """Apply the round's accumulated gradient (``per_round``): the key-ordered sum over
        micro-batches divided by ``micro_batches`` (default: the micro-batches this trainer
        saw). Returns the micro-batches accumulated (0: no update)."""
        if self.optimizer is None or len(self._accumulated) == 0:
            return 0
        n = self._accumulated.apply_mean(self.params, micro_batches or 0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return n

    # --- state (checkpoints, a restarted server) ----------------------------------------------
    def state(self) -> TrainerState:
        """Trainable parameters (``param.<name>``), optimizer state (``optim.<name>.<entry>``)
        and the counter ``batches_done``. Accumulated ``per_round`` gradients are not part of
        it: take it between rounds."""
        tensors = trainer_tensors(self.params, self.optimizer)
        return TrainerState(tensors=tensors, counters={"batches_done": self.batches_done})

    def restore(self, state: TrainerState) -> None:
        """Load a :meth:`state`; forgets accumulated gradients. Raises :class:`CheckpointError`
        naming the key for a missing parameter, an unknown key or a shape/dtype mismatch."""
        batches_done = counter(state, "batches_done")
        load_trainer_tensors(self.params, self.optimizer, state.tensors)
        self._accumulated = OrderedGradients()
        self.batches_done = batches_done

    def drop_devices(self, keep: Callable[[int], bool]) -> int:
        """Forget accumulated ``per_round`` micro-batches of devices whose index ``keep``
        rejects (a device lost mid-round); returns how many were dropped."""
        return self._accumulated.discard(lambda key: keep(device_of(key)))


def _all_finite(tensors: list[torch.Tensor | None]) -> bool:
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


def count_targets(out: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(targets, correct) behind a loss: next-token labels of a LM (-100 = ignore; correct is
    0) or class labels (correct = arg-max hits)."""
    if out.dim() == 3:  # (B, T, V) language model: labels shift by one inside the loss
        return int((labels[:, 1:] != -100).sum()), 0
    pred = out.argmax(dim=-1)
    return int(labels.numel()), int((pred == labels).sum())
