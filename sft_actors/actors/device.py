"""The device actor: runs the embedding and blocks ``[0, cut)`` on its own data shard.

One round (``RoundStart`` → ``RoundDone``): for each micro-batch, forward through the device
blocks → compress → ACTIVATIONS to the server → GRADIENTS back → backward → optimizer step.
Up to ``max_inflight`` micro-batches are in flight, so the next forward overlaps the wait for
the previous gradient (see :mod:`sft_actors.train.device_trainer` for why that stays exact).

All torch and codec work runs in the runtime's thread pool (``offload``), so heartbeats keep
flowing while a large activation is compressed. One ``asyncio.Lock`` serialises this device's
compute: forward, backward and optimizer step never overlap on the same adapters.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from sft_actors.actors.base import Actor
from sft_actors.actors.env import ActorEnv
from sft_actors.actors.handlers import MsgContext
from sft_actors.actors.tasks import first_error
from sft_actors.codec import Basis, BasisRegistry, Codec
from sft_actors.data import ShardBatches
from sft_actors.errors import ConfigError, SftError
from sft_actors.sharing import SHARED
from sft_actors.topology import ActorSpec
from sft_actors.train import modes
from sft_actors.train.data_setup import BatchIterator, DeviceData, build_device_data
from sft_actors.train.device_trainer import DeviceTrainer
from sft_actors.train.loading import data_settings, load_shared_model, lora_config, torch_dtype
from sft_actors.train.summary import median_or_zero
from sft_actors.train.tensors import pack_tensor, step_seed, unpack_tensor
from sft_actors.wire import (
    Ack,
    Activations,
    AdaptersDown,
    AdaptersRequest,
    AdaptersUp,
    BasisUpload,
    EvalRequest,
    EvalResult,
    Gradients,
    Metrics,
    Plan,
    RoundDone,
    RoundStart,
    WireTensor,
)


@dataclass(slots=True)
class _RoundStats:
    losses: list[float] = field(default_factory=list)
    targets: int = 0
    bytes_up: int = 0
    raw_up: int = 0
    bytes_down: int = 0
    raw_down: int = 0
    encode_ms: float = 0.0
    step_ms: list[float] = field(default_factory=list)


#: EvalRequest.split asking for the held-out loss without the activation codec (model quality
#: alone); any other split evaluates through the codec, as the deployed system runs.
RAW_HELDOUT = "heldout_raw"


class DeviceActor(Actor):
    def __init__(self, spec: ActorSpec, env: ActorEnv) -> None:
        super().__init__(spec, env)
        self.plan: Plan | None = None
        self.index = [d.name for d in self.topology.devices].index(spec.name)
        self._compute = asyncio.Lock()
        self._samples_since_aggregation = 0
        self._global_step = 0

    # --- set-up --------------------------------------------------------------------------
    async def on_plan(self, msg: Plan, ctx: MsgContext) -> Ack:
        await self.offload(self._setup, msg)
        if self.basis_upload is not None:  # the server needs the basis before the first activations
            await self.call(self.server, self.basis_upload, timeout_s=self.topology.run.train.round_timeout_s)
        self.plan = msg
        self.log.info(
            "plan_received",
            cut=msg.cut,
            shard=msg.shard,
            mode=self.mode,
            train_samples=self.data.n_train_samples,
            label_classes=sum(1 for c in self.data.label_histogram if c),
            label_top=_top_labels(self.data.label_histogram),
        )
        return Ack(of_msg_id=ctx.msg_id)

    @property
    def mode(self) -> str:
        return self.topology.run.train.mode

    def _setup(self, plan: Plan) -> None:
        run = self.topology.run
        self.model = load_shared_model(run.model, torch_dtype(run.dtype))
        lora = lora_config(run.lora)
        if modes.whole_model_on_device(self.mode):
            from sft_actors.model import make_full_part

            self.full = make_full_part(self.model, lora, seed=run.seed)
            self.part: Any = self.full
            self.trainer = DeviceTrainer(self.full, lr=run.train.lr, max_inflight=1)
        else:
            from sft_actors.model import make_device_part

            self.part = make_device_part(self.model, plan.cut, lora, seed=run.seed)
            self.trainer = DeviceTrainer(self.part, lr=run.train.lr, max_inflight=run.train.max_inflight)
        self.data: DeviceData = build_device_data(
            data_settings(run),
            model=self.model,
            num_devices=len(self.topology.devices),
            shard=plan.shard,
            cache=SHARED.get,
        )
        self.batches = BatchIterator(self.data.train)
        self.server = self._server_for(plan.cut)
        self.bases = BasisRegistry()
        self.basis_upload: BasisUpload | None = None
        spec = modes.up_spec(plan.codec) if modes.uses_codec(self.mode) else None
        if spec is not None and spec.project is not None:
            self.basis_upload = self._fit_basis(spec)
        self.codec_up, _ = modes.codecs(plan.codec, bases=self.bases)

    def _fit_basis(self, spec: Any) -> BasisUpload:
        """Fit this device's PCA basis on its own training activations (no update), register it,
        and return the message that carries it to the server once per run."""
        run = self.topology.run
        train = self.data.train
        # A separate iterator, so calibration does not change which batches training sees.
        calibration = BatchIterator(
            ShardBatches(train.dataset, train.shard, batch_size=train.batch_size, seed=run.seed + 7919)
        )
        skip = spec.outliers.first_tokens if spec.outliers is not None else 0  # sent densely anyway
        hidden = [
            self.trainer.forward_eval(next(calibration)[0]) for _ in range(run.train.calibration_batches)
        ]
        basis = Basis.fit(torch.cat(hidden)[:, skip:, :])
        key = spec.project.basis
        self.bases.register(key, basis)
        self.log.info(
            "basis_fitted", key=key, rank=basis.rank, tokens=sum(h.shape[0] * h.shape[1] for h in hidden)
        )
        return BasisUpload(
            device=self.name,
            key=key,
            digest=basis.digest,
            vectors=WireTensor.from_torch(torch.from_numpy(basis.vectors)),
            mean=WireTensor.from_torch(torch.from_numpy(basis.mean)),
        )

    def _server_for(self, cut: int) -> str:
        servers = sorted(self.topology.servers, key=lambda s: s.start_block or 0)
        if not servers:
            return ""
        eligible = [s for s in servers if (s.start_block or 0) <= cut]
        if not eligible:
            raise ConfigError(f"no server starts at or below cut {cut} of device {self.name}")
        return eligible[-1].name

    def _require_plan(self) -> Plan:
        if self.plan is None:
            raise SftError(f"device {self.name} has no plan yet: the coordinator must send PLAN first")
        return self.plan

    # --- one round -----------------------------------------------------------------------
    async def on_round_start(self, msg: RoundStart, ctx: MsgContext) -> RoundDone:
        plan = self._require_plan()
        stats = _RoundStats()
        started = time.perf_counter()
        if modes.whole_model_on_device(self.mode):
            for _ in range(plan.steps_per_round):
                await self._local_step(stats)
        else:
            window = asyncio.Semaphore(self.trainer.max_inflight)
            try:
                async with asyncio.TaskGroup() as tg:
                    for _ in range(plan.steps_per_round):
                        await window.acquire()
                        request = await self._forward(msg.round, stats)
                        tg.create_task(self._exchange(request, window, stats))
            except BaseExceptionGroup as group:  # surface the first real cause to the coordinator
                raise first_error(group) from None
        n_samples = plan.steps_per_round * self.data.train.batch_size
        self._samples_since_aggregation += n_samples
        loss = sum(stats.losses) / max(1, len(stats.losses))
        metrics: dict[str, float | int | str] = {
            "bytes_up": stats.bytes_up,
            "bytes_down": stats.bytes_down,
            "raw_up": stats.raw_up,
            "raw_down": stats.raw_down,
            "encode_ms": round(stats.encode_ms, 3),
            "round_s": round(time.perf_counter() - started, 4),
            "step_ms_median": round(median_or_zero(stats.step_ms), 3),
            "targets": stats.targets,
        }
        self.log.info("round_finished", round=msg.round, loss=round(loss, 4), **metrics)
        return RoundDone(device=self.name, round=msg.round, n_samples=n_samples, loss=loss, metrics=metrics)

    async def _forward(self, round_: int, stats: _RoundStats) -> tuple[Activations, float]:
        plan = self._require_plan()
        step = self._global_step
        self._global_step += 1
        inputs, labels = next(self.batches)
        t0 = time.perf_counter()
        async with self._compute:
            hidden = await self.offload(self.trainer.forward, step, inputs)
        seed = step_seed(self.topology.run.seed, self.index, round_, step, 0)
        act, report = await self.offload(pack_tensor, hidden, self.codec_up, seed=seed)
        stats.raw_up += hidden.numel() * hidden.element_size()
        stats.bytes_up += act.desc.nbytes
        if report is not None:
            stats.encode_ms += report.encode_ms
        request = Activations(
            device=self.name,
            round=round_,
            step=step,
            cut=plan.cut,
            activations=act,
            labels=WireTensor.from_torch(labels),
            n_samples=int(labels.shape[0]),
            sent_at_ns=time.time_ns(),
        )
        return request, t0

    async def _exchange(
        self, request: tuple[Activations, float], window: asyncio.Semaphore, stats: _RoundStats
    ) -> None:
        msg, t0 = request
        try:
            reply = await self.call(self.server, msg)
            if not isinstance(reply, Gradients):
                raise SftError(f"server {self.server} answered {type(reply).__name__} to ACTIVATIONS")
            grad = await self.offload(unpack_tensor, reply.grad)
            raw = grad.numel() * grad.element_size()  # = the activations' raw size (same shape)
            stats.bytes_down += reply.grad.desc.nbytes
            stats.raw_down += raw
            async with self._compute:
                await self.offload(self.trainer.backward, msg.step, grad)
            stats.losses.append(reply.loss)
            stats.targets += reply.n_tokens
            stats.step_ms.append((time.perf_counter() - t0) * 1e3)
            wire = msg.activations.desc.nbytes + reply.grad.desc.nbytes
            await self._report_step(msg.round, reply.loss, wire_bytes=wire, raw_bytes=2 * raw)
        except BaseException:
            self.trainer.abandon(msg.step)
            raise
        finally:
            window.release()

    async def _local_step(self, stats: _RoundStats) -> None:
        """Federated LoRA: the whole model on the device, no server, no traffic but adapters."""
        inputs, labels = next(self.batches)
        t0 = time.perf_counter()

        def step() -> tuple[float, int]:
            out = self.full(inputs)
            loss = self.full.loss(out, labels)
            torch.autograd.backward(loss)
            self.trainer.optimizer.step()
            self.trainer.optimizer.zero_grad(set_to_none=True)
            return float(loss.detach()), int(labels.numel())

        async with self._compute:
            loss, n = await self.offload(step)
        stats.losses.append(loss)
        stats.targets += n
        stats.step_ms.append((time.perf_counter() - t0) * 1e3)
        await self._report_step(-1, loss)

    async def _report_step(
        self, round_: int, loss: float, *, wire_bytes: int = 0, raw_bytes: int = 0
    ) -> None:
        """Fire-and-forget progress to the coordinator (drives its progress bar)."""
        coordinator = self.topology.coordinator.name
        if coordinator in self.peers:
            values: dict[str, float | int | str] = {
                "step_loss": loss,
                "wire_bytes": wire_bytes,
                "raw_bytes": raw_bytes,
            }
            await self.send(coordinator, Metrics(node=self.name, round=round_, values=values))

    # --- evaluation ------------------------------------------------------------------------
    async def on_eval_request(self, msg: EvalRequest, ctx: MsgContext) -> EvalResult:
        self._require_plan()
        loss_sum, targets, correct = 0.0, 0, 0
        for i, (inputs, labels) in enumerate(self.data.heldout):
            if modes.whole_model_on_device(self.mode):
                async with self._compute:
                    loss, n, c = await self.offload(self._local_eval, inputs, labels)
            else:
                codec = None if msg.split == RAW_HELDOUT else self.codec_up
                loss, n, c = await self._remote_eval(msg.round, i, inputs, labels, codec)
            loss_sum += loss * n
            targets += n
            correct += c
        return EvalResult(
            node=self.name,
            round=msg.round,
            values={
                "loss_sum": loss_sum,
                "targets": targets,
                "correct": correct,
                "batches": len(self.data.heldout),
                # A language model reports perplexity, a classifier accuracy.
                "task": "lm" if self.model.family == "llama" else "classification",
            },
        )

    def _local_eval(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
        with torch.no_grad():
            out = self.full(inputs)
            loss = float(self.full.loss(out, labels))
        if out.dim() == 3:
            return loss, int((labels[:, 1:] != -100).sum()), 0
        return loss, int(labels.numel()), int((out.argmax(-1) == labels).sum())

    async def _remote_eval(
        self, round_: int, i: int, inputs: torch.Tensor, labels: torch.Tensor, codec: Codec | None
    ) -> tuple[float, int, int]:
        plan = self._require_plan()
        async with self._compute:
            hidden = await self.offload(self.trainer.forward_eval, inputs)
        seed = step_seed(self.topology.run.seed, self.index, round_, 1_000_000 + i, 0)
        act, _ = await self.offload(pack_tensor, hidden, codec, seed=seed)
        reply = await self.call(
            self.server,
            Activations(
                device=self.name,
                round=round_,
                step=-1 - i,
                cut=plan.cut,
                activations=act,
                labels=WireTensor.from_torch(labels),
                n_samples=int(labels.shape[0]),
                sent_at_ns=time.time_ns(),
                phase="eval",
            ),
        )
        if not isinstance(reply, Gradients):
            raise SftError(f"server {self.server} answered {type(reply).__name__} to an eval batch")
        return reply.loss, reply.n_tokens, int(reply.metrics.get("correct", 0))

    # --- adapters --------------------------------------------------------------------------
    async def on_adapters_request(self, msg: AdaptersRequest, ctx: MsgContext) -> AdaptersUp:
        from sft_actors.model import lora_state_dict

        self._require_plan()
        async with self._compute:
            state = lora_state_dict(self.part)
        n, self._samples_since_aggregation = self._samples_since_aggregation, 0
        tensors = {k: WireTensor.from_torch(v) for k, v in state.items()}
        return AdaptersUp(device=self.name, round=msg.round, n_samples=n, tensors=tensors)

    async def on_adapters_down(self, msg: AdaptersDown, ctx: MsgContext) -> Ack:
        from sft_actors.model import load_lora_state_dict

        self._require_plan()
        state = {k: unpack_tensor(v) for k, v in msg.tensors.items()}
        async with self._compute:
            missing, unexpected = load_lora_state_dict(self.part, state, strict=False)
        if unexpected:
            raise ConfigError(f"adapters for blocks this device does not hold: {unexpected[:3]}")
        self.log.debug("adapters_loaded", round=msg.round, tensors=len(state), missing=len(missing))
        return Ack(of_msg_id=ctx.msg_id)


def _top_labels(histogram: list[int], k: int = 5) -> str:
    """``"3:120 7:88 …"``: this shard's most frequent labels (class index: count), for the log."""
    top = sorted(((c, i) for i, c in enumerate(histogram) if c), reverse=True)[:k]
    return " ".join(f"{i}:{c}" for c, i in top)
