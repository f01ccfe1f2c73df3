"""One device's side of a run, built from its plan alone: a pure state machine (no sockets).

The device actor is a protocol shell around a :class:`DeviceSession`: it asks the session for
the next micro-batch's cut activations, sends them, and hands back the gradient the server
returned. Pipelining (up to ``max_inflight`` micro-batches between forward and gradient, each
on a private snapshot of the LoRA tensors) lives in :class:`DeviceTrainer`; what a round
measured accumulates in a :class:`~sft_actors.train.meters.RoundMeter`; the basis of a
projecting codec is watched for drift by :class:`~sft_actors.train.basis_drift.BasisDrift`.
Two strategies, chosen by the plan's mode:

- split (``sl``, ``sfl``, ``sft``): blocks ``[0, cut)`` here, the rest on the server;
- local (``fedlora``): every block here; a step is a whole forward, loss and update.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Hashable
from typing import Any

import torch

from sft_actors.codec import Basis, BasisRegistry, Codec, fit_basis
from sft_actors.data import ShardBatches
from sft_actors.errors import NonFiniteLoss, ProtocolViolation
from sft_actors.model import Part, load_lora_state_dict, lora_state_dict, make_device_part, make_full_part
from sft_actors.model.lora import adapter_items
from sft_actors.placement import to_compute
from sft_actors.sharing import SHARED
from sft_actors.train.basis_drift import BasisDrift
from sft_actors.train.data_setup import Batch, BatchIterator, DeviceData, build_device_data
from sft_actors.train.device_trainer import DeviceTrainer
from sft_actors.train.loading import load_shared_model
from sft_actors.train.meters import EvalMeter, RoundMeter
from sft_actors.train.modes import codec_for, whole_model_on_device
from sft_actors.train.server_trainer import count_targets
from sft_actors.train.state import TrainerState, counter
from sft_actors.wire.messages import DevicePlan
from sft_actors.wire.plans import EvalTask

Cache = Callable[[Hashable, Callable[[], Any]], Any]
#: Steps of held-out batches are numbered from here, so their quantization seeds never repeat a
#: training step's.
EVAL_STEP_BASE = 1_000_000
#: Seeds the calibration iterator apart from the training one (calibration never changes which
#: batches training sees).
CALIBRATION_SEED_OFFSET = 7919

__all__ = ["EVAL_STEP_BASE", "DeviceSession", "EvalMeter", "RoundMeter", "elapsed_ms"]


class DeviceSession:
    """Model part, data shard, trainer and activation codec of one device, from its plan.

    Heavy (loads the model and data): construct it off the event loop. Every method is
    synchronous and CPU-bound; the actor runs them in its offload pool, one at a time.
    """

    def __init__(
        self, plan: DevicePlan, *, cache: Cache = SHARED.get, device: torch.device | str = "cpu"
    ) -> None:
        """``device``: where this device computes (its base weights and adapters live there)."""
        self.plan = plan
        self.model = load_shared_model(plan.model, cache, device)
        self.whole_model = whole_model_on_device(plan.mode)
        lora, seed = plan.model.lora, plan.model.seed
        self.part: Part = (
            make_full_part(self.model, lora, seed=seed)
            if self.whole_model
            else make_device_part(self.model, plan.cut, lora, seed=seed)
        )
        self.trainer = DeviceTrainer(self.part, lr=plan.train.lr, max_inflight=plan.train.max_inflight)
        self.data: DeviceData = build_device_data(
            plan.data, model=self.model, num_devices=plan.num_devices, shard=plan.shard, cache=cache
        )
        self.batches = BatchIterator(self.data.train)
        self.bases = BasisRegistry()
        self.codec_up: Codec | None = codec_for(plan.codec.up, bases=self.bases)
        up = plan.codec.up
        self.drift = BasisDrift(up, plan.codec.refit) if up.project is not None else None
        self.eval_task: EvalTask = "lm" if self.model.family == "llama" else "classification"
        self._global_step = 0
        self._samples_since_aggregation = 0

    # --- set-up ------------------------------------------------------------------------------
    def fit_basis(self) -> Basis | None:
        """Fit and register this device's PCA basis when its up chain projects (else None).

        ``calibration_batches`` forward passes (no update) over its own training shard, through
        a separate iterator so training sees the same batches as without calibration.
        """
        chain = self.plan.codec.up
        if chain.project is None or self.drift is None:
            return None
        train = self.data.train
        calibration = BatchIterator(
            ShardBatches(
                train.dataset,
                train.shard,
                batch_size=train.batch_size,
                seed=self.plan.data.seed + CALIBRATION_SEED_OFFSET,
            )
        )
        hidden = [
            self.trainer.forward_eval(next(calibration)[0])
            for _ in range(self.plan.train.calibration_batches)
        ]
        basis = fit_basis(chain, torch.cat(hidden))
        self.bases.register(chain.project.basis, basis)
        self.drift.fitted()
        return basis

    # --- training ------------------------------------------------------------------------------
    def next_batch(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(step, inputs, labels) of the next training micro-batch; steps count over the run."""
        step = self._global_step
        self._global_step += 1
        inputs, labels = next(self.batches)
        return step, inputs, labels

    def forward(self, step: int, inputs: torch.Tensor) -> torch.Tensor:
        """Cut activations (B, T, C) of micro-batch ``step``, kept in flight until its gradient."""
        return self.trainer.forward(step, inputs)

    def backward(self, step: int, grad: torch.Tensor) -> None:
        """Finish micro-batch ``step`` with the server's gradient (B, T, C) and step the optimizer."""
        self.trainer.backward(step, grad)

    def abandon(self, step: int) -> None:
        self.trainer.abandon(step)

    def local_step(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        """Federated LoRA: forward, loss, backward and update on the whole model; (loss, targets).

        Raises :class:`NonFiniteLoss` (nothing applied) when the loss is NaN or inf."""
        device = self.part.device
        out = self.part(to_compute(inputs, device))
        loss = self.model.loss(out, to_compute(labels, device))
        if not bool(torch.isfinite(loss)):
            raise NonFiniteLoss(f"the loss of a local step is {float(loss.detach())}; no update made")
        torch.autograd.backward(loss)
        self.trainer.optimizer.step()
        self.trainer.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), count_targets(out, labels)[0]

    def finish_round(self) -> int:
        """Samples trained this round (also counted towards the next averaging weight)."""
        n = self.plan.train.steps_per_round * self.data.train.batch_size
        self._samples_since_aggregation += n
        return n

    # --- evaluation ----------------------------------------------------------------------------
    @property
    def heldout(self) -> list[Batch]:
        return self.data.heldout

    def forward_eval(self, inputs: torch.Tensor) -> torch.Tensor:
        """Cut activations without autograd (held-out batches)."""
        return self.trainer.forward_eval(inputs)

    @torch.no_grad()
    def local_eval(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
        """(mean loss, targets, correct) of one held-out batch on the whole model (fedlora)."""
        device = self.part.device
        out = self.part(to_compute(inputs, device))
        labels = to_compute(labels, device)
        return float(self.model.loss(out, labels)), *count_targets(out, labels)

    # --- adapters ------------------------------------------------------------------------------
    def adapters(self) -> tuple[dict[str, torch.Tensor], int]:
        """This part's LoRA tensors and the samples trained since the last averaging (its weight)."""
        n, self._samples_since_aggregation = self._samples_since_aggregation, 0
        return lora_state_dict(self.part), n

    def load_adapters(self, state: dict[str, torch.Tensor], reset_moments: Collection[str] = ()) -> int:
        """Load averaged LoRA tensors; returns how many of this part's tensors were not given.

        ``reset_moments`` names loaded tensors the coordinator re-factorized (``lora_averaging =
        "svd"``): their AdamW moments described the old factors' basis and start afresh.
        Raises :class:`ProtocolViolation` for tensors of blocks this device does not hold, or a
        reset of a tensor that was not given."""
        stray = sorted(set(reset_moments) - set(state))
        if stray:
            raise ProtocolViolation(f"moment reset for tensors not sent: {stray[:3]}")
        missing, unexpected = load_lora_state_dict(self.part, state, strict=False)
        if unexpected:
            raise ProtocolViolation(f"adapters for blocks this device does not hold: {unexpected[:3]}")
        if reset_moments:
            own = {}
            for key, adapter in adapter_items(self.part.adapters):
                own[f"{key}.lora_A"], own[f"{key}.lora_B"] = adapter.lora_A, adapter.lora_B
            self.trainer.reset_moments(own[k] for k in reset_moments if k in own)
        return len(missing)

    # --- state (checkpoints, rejoin) -----------------------------------------------------------
    def state(self) -> TrainerState:
        """The trainer's state tensors and the counters ``step`` (micro-batches drawn so far)
        and ``samples_since_aggregation``. Take it between rounds (nothing in flight)."""
        return TrainerState(
            tensors=self.trainer.state_tensors(),
            counters={
                "step": self._global_step,
                "samples_since_aggregation": self._samples_since_aggregation,
            },
        )

    def restore(self, state: TrainerState) -> None:
        """Continue from a :meth:`state`: load the LoRA and optimizer tensors, the counters, and
        move the training batches so :meth:`next_batch` returns what the uninterrupted session
        would have. The PCA basis (fitted deterministically from the plan) is left as it is.

        Raises :class:`CheckpointError` for a missing counter or tensors that do not fit."""
        step = counter(state, "step")
        samples = counter(state, "samples_since_aggregation")
        self.trainer.load_state_tensors(state.tensors)
        self.batches.batches.seek(step)
        self._global_step = step
        self._samples_since_aggregation = samples


def elapsed_ms(t0: float) -> float:
    """Milliseconds since ``t0`` (a ``time.perf_counter()`` reading)."""
    return (time.perf_counter() - t0) * 1e3
