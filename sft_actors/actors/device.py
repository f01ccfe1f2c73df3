"""The device actor: a protocol shell around :class:`~sft_actors.train.device_session.DeviceSession`.

PLAN → build the session (model part, data shard, codec) and, for a projecting codec, send the
PCA basis to the server. ROUND_START → micro-batches: forward → compress → ACTIVATIONS →
GRADIENTS → backward, with up to ``max_inflight`` in flight so the next forward overlaps the
wait for the previous gradient → ROUND_DONE with typed stats.

All torch and codec work runs in the runtime's thread pool (``offload``), so heartbeats keep
flowing while a large activation is compressed. One ``asyncio.Lock`` serialises this device's
compute: forward, backward and optimizer step never overlap on the same adapters.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import torch

from sft_actors.actors.base import Actor
from sft_actors.actors.env import ActorEnv
from sft_actors.actors.handlers import MsgContext
from sft_actors.actors.rate_log import RateWarnings
from sft_actors.actors.tasks import first_error, task_group
from sft_actors.codec import Codec
from sft_actors.errors import NonFiniteLoss, ProtocolViolation, RemoteError
from sft_actors.placement import resolve_device
from sft_actors.topology import ActorSpec
from sft_actors.train.device_session import EVAL_STEP_BASE, DeviceSession, elapsed_ms
from sft_actors.train.meters import EvalMeter, RoundMeter
from sft_actors.train.state import TrainerState
from sft_actors.wire import (
    Ack,
    Activations,
    AdaptersDown,
    AdaptersRequest,
    AdaptersUp,
    DevicePlan,
    EvalRequest,
    EvalResult,
    Metrics,
    Restore,
    RoundDone,
    RoundStart,
    StateReport,
    StateRequest,
    WireTensor,
)
from sft_actors.wire.basis import basis_upload, upload_bytes
from sft_actors.wire.coded import pack_tensor, step_seed, unpack_tensor


class DeviceActor(Actor):
    def __init__(self, spec: ActorSpec, env: ActorEnv) -> None:
        super().__init__(spec, env)
        self._session: DeviceSession | None = None
        self._compute = asyncio.Lock()
        #: Where this device computes (``[[actors]] device``), checked against the host at start.
        self.compute_device = torch.device("cpu")
        self._rate_warnings = RateWarnings()

    async def _start(self) -> None:
        # Before any socket: a device this host lacks is a typed error naming actor and device.
        self.compute_device = resolve_device(self.spec.device, actor=self.name)
        await super()._start()

    @property
    def session(self) -> DeviceSession:
        if self._session is None:
            raise ProtocolViolation(
                f"device {self.name} has no plan yet: the coordinator must send PLAN first"
            )
        return self._session

    # --- set-up --------------------------------------------------------------------------
    async def on_device_plan(self, msg: DevicePlan, ctx: MsgContext) -> Ack:
        self.require_coordinator(ctx)
        if msg.device != self.name:
            raise ProtocolViolation(f"plan for {msg.device!r} sent to device {self.name!r}")
        if self._session is not None and self._session.plan == msg:
            # Re-sent after this device rejoined (or the coordinator restarted): keep the
            # session; RESTORE / ADAPTERS_DOWN bring its state in line with the run.
            self.log.info("plan_confirmed", cut=msg.cut, server=msg.server)
            return Ack(of_msg_id=ctx.msg_id)
        session = await self.offload(DeviceSession, msg, device=self.compute_device)
        basis = await self.offload(session.fit_basis)
        if basis is not None and session.drift is not None:  # the server needs it first
            upload = basis_upload(self.name, session.drift.key, basis)
            await self.call(msg.server, upload, timeout_s=msg.train.round_timeout_s)
            session.drift.pending_bytes += upload_bytes(upload)  # counted in the first round
            self.log.info(
                "basis_fitted",
                key=session.drift.key,
                kind=basis.kind,
                rank=basis.rank,
                bytes=upload_bytes(upload),
            )
        self._session = session
        hist = session.data.label_histogram
        self.log.info(
            "plan_received",
            cut=msg.cut,
            shard=msg.shard,
            mode=msg.mode,
            server=msg.server,
            max_inflight=msg.train.max_inflight,
            train_samples=session.data.n_train_samples,
            label_classes=sum(1 for c in hist if c),
            label_top=_top_labels(hist),
        )
        return Ack(of_msg_id=ctx.msg_id)

    # --- one round -----------------------------------------------------------------------
    async def on_round_start(self, msg: RoundStart, ctx: MsgContext) -> RoundDone:
        self.require_coordinator(ctx)
        s = self.session
        meter = RoundMeter()
        if s.drift is not None:
            meter.basis_sent(s.drift.take_pending_bytes())
        started = time.perf_counter()
        if s.whole_model:
            for _ in range(s.plan.train.steps_per_round):
                await self._local_step(msg.round, meter)
        else:
            await self._split_round(msg.round, meter)
        n_samples = s.finish_round()
        stats = meter.stats(time.perf_counter() - started)
        self.log.info(
            "round_finished",
            round=msg.round,
            loss=round(meter.loss, 4),
            n_samples=n_samples,
            **dataclasses.asdict(stats),
        )
        return RoundDone(device=self.name, round=msg.round, n_samples=n_samples, loss=meter.loss, stats=stats)

    async def _split_round(self, round_: int, meter: RoundMeter) -> None:
        window = asyncio.Semaphore(self.session.plan.train.max_inflight)
        try:
            async with task_group() as tg:
                for _ in range(self.session.plan.train.steps_per_round):
                    await window.acquire()
                    request = await self._forward(round_, meter)
                    tg.create_task(self._exchange(request, window, meter))
        except BaseExceptionGroup as group:  # surface the first real cause to the coordinator
            raise first_error(group) from None
        finally:
            # A round that failed half-way (a refused or lost micro-batch) may leave forwards
            # whose gradient will never come; the next round starts with none in flight.
            self.session.trainer.abandon_all()

    async def _forward(self, round_: int, meter: RoundMeter) -> tuple[Activations, float]:
        s = self.session
        step, inputs, labels = s.next_batch()
        t0 = time.perf_counter()
        async with self._compute:
            hidden = await self.offload(s.forward, step, inputs)
        seed = step_seed(s.plan.data.seed, s.plan.index, round_, step, 0)
        measure = False
        if s.drift is not None and s.drift.enabled:
            measure, window_bytes = await self.offload(s.drift.observe, hidden)
            if window_bytes is not None:
                self.log.info("basis_window", batches=s.plan.codec.refit.window, bytes=window_bytes)
        act, report = await self.offload(pack_tensor, hidden, s.codec_up, seed=seed, measure_error=measure)
        self._rate_warnings.check(self.log, report, round_, direction="up")
        meter.sent(
            raw=hidden.numel() * hidden.element_size(),
            coded=act.desc.nbytes,
            encode_ms=report.encode_ms if report is not None else 0.0,
        )
        if measure and s.drift is not None and report is not None and s.drift.drifted(report.rel_error):
            await self._refit(round_, meter, report.rel_error or 0.0)
        return self._activations(round_, step, act, labels), t0

    async def _refit(self, round_: int, meter: RoundMeter, before: float) -> None:
        """Fit a new basis on the kept activations, upload it, and encode with it only once the
        server acknowledged it (frames already sent still decode there by their digest)."""
        s = self.session
        assert s.drift is not None
        baseline = s.drift.baseline or 0.0
        basis, after = await self.offload(s.drift.refit)
        upload = basis_upload(self.name, s.drift.key, basis)
        await self.call(s.plan.server, upload, timeout_s=s.plan.train.round_timeout_s)
        s.bases.register(s.drift.key, basis)
        s.drift.fitted()
        meter.basis_sent(upload_bytes(upload), refit=True)
        self.log.info(
            "basis_refit",
            device=self.name,
            round=round_,
            error_baseline=round(baseline, 5),  # the first measured after the previous fit
            error_before=round(before, 5),
            error_after=round(after, 5),  # the latest micro-batch, coded with the new basis
            bytes=upload_bytes(upload),
        )

    def _activations(
        self, round_: int, step: int, act: WireTensor, labels: torch.Tensor, phase: str = "train"
    ) -> Activations:
        return Activations(
            device=self.name,
            round=round_,
            step=step,
            cut=self.session.plan.cut,
            activations=act,
            labels=WireTensor.from_torch(labels),
            n_samples=int(labels.shape[0]),
            sent_at_ns=time.time_ns(),
            phase="eval" if phase == "eval" else "train",
        )

    async def _exchange(
        self, request: tuple[Activations, float], window: asyncio.Semaphore, meter: RoundMeter
    ) -> None:
        msg, t0 = request
        s = self.session
        try:
            try:
                reply = await self.call(s.plan.server, msg, timeout_s=s.plan.train.round_timeout_s)
            except RemoteError as exc:  # the run diverged: say where, so the coordinator stops it
                if exc.remote_type != NonFiniteLoss.__name__:
                    raise
                raise self._diverged(msg.round, exc.remote_message) from None
            grad = await self.offload(unpack_tensor, reply.grad, max_shape=msg.activations.desc.shape)
            raw = grad.numel() * grad.element_size()  # = the activations' raw size (same shape)
            meter.received(raw=raw, coded=reply.grad.desc.nbytes)
            async with self._compute:
                try:
                    await self.offload(s.backward, msg.step, grad)
                except NonFiniteLoss as exc:  # a finite gradient, non-finite adapter gradients
                    raise self._diverged(msg.round, str(exc)) from None
            meter.step_done(loss=reply.loss, targets=reply.n_tokens, step_ms=elapsed_ms(t0))
            wire = msg.activations.desc.nbytes + reply.grad.desc.nbytes
            await self._report_step(msg.round, reply.loss, wire_bytes=wire, raw_bytes=2 * raw)
        except BaseException:
            s.abandon(msg.step)
            raise
        finally:
            window.release()

    async def _local_step(self, round_: int, meter: RoundMeter) -> None:
        """Federated LoRA: the whole model on the device, no server, no traffic but adapters."""
        s = self.session
        _, inputs, labels = s.next_batch()
        t0 = time.perf_counter()
        async with self._compute:
            try:
                loss, n = await self.offload(s.local_step, inputs, labels)
            except NonFiniteLoss as exc:
                raise self._diverged(round_, str(exc)) from None
        meter.step_done(loss=loss, targets=n, step_ms=elapsed_ms(t0))
        await self._report_step(round_, loss)

    def _diverged(self, round_: int, why: str) -> NonFiniteLoss:
        return NonFiniteLoss(f"non-finite training loss at round {round_} on {self.name}: {why}")

    async def _report_step(
        self, round_: int, loss: float, *, wire_bytes: int = 0, raw_bytes: int = 0
    ) -> None:
        """Fire-and-forget progress to the coordinator (drives its progress bar)."""
        coordinator = self.topology.coordinator.name  # the only peer that sends plans
        if coordinator in self.peers:
            progress = Metrics(
                node=self.name, round=round_, step_loss=loss, wire_bytes=wire_bytes, raw_bytes=raw_bytes
            )
            await self.send(coordinator, progress)

    # --- evaluation ------------------------------------------------------------------------
    async def on_eval_request(self, msg: EvalRequest, ctx: MsgContext) -> EvalResult:
        self.require_coordinator(ctx)
        s = self.session
        meter = EvalMeter(task=s.eval_task)
        codec = s.codec_up if msg.through_codec else None
        for i, (inputs, labels) in enumerate(s.heldout):
            if s.whole_model:
                async with self._compute:
                    loss, n, correct = await self.offload(s.local_eval, inputs, labels)
            else:
                loss, n, correct = await self._remote_eval(msg.round, i, inputs, labels, codec)
            meter.add(loss, n, correct)
        return EvalResult(node=self.name, round=msg.round, stats=meter.stats())

    async def _remote_eval(
        self, round_: int, i: int, inputs: torch.Tensor, labels: torch.Tensor, codec: Codec | None
    ) -> tuple[float, int, int]:
        s = self.session
        async with self._compute:
            hidden = await self.offload(s.forward_eval, inputs)
        seed = step_seed(s.plan.data.seed, s.plan.index, round_, EVAL_STEP_BASE + i, 0)
        act, _ = await self.offload(pack_tensor, hidden, codec, seed=seed)
        request = self._activations(round_, -1 - i, act, labels, phase="eval")
        reply = await self.call(s.plan.server, request, timeout_s=s.plan.train.round_timeout_s)
        return reply.loss, reply.n_tokens, reply.correct

    # --- durable runs ------------------------------------------------------------------------
    async def on_state_request(self, msg: StateRequest, ctx: MsgContext) -> StateReport:
        """Adapters, optimizer state and counters for the coordinator's checkpoint."""
        self.require_coordinator(ctx)
        async with self._compute:
            state = await self.offload(self.session.state)
        tensors = {k: WireTensor.from_torch(v) for k, v in state.tensors.items()}
        return StateReport(actor=self.name, round=msg.round, tensors=tensors, counters=state.counters)

    async def on_restore(self, msg: Restore, ctx: MsgContext) -> Ack:
        """Continue from a checkpointed state (a resumed run, or this device rejoining)."""
        self.require_coordinator(ctx)
        state = TrainerState(
            tensors={k: unpack_tensor(v) for k, v in msg.tensors.items()}, counters=dict(msg.counters)
        )
        async with self._compute:
            await self.offload(self.session.restore, state)
        self.log.info("state_restored", round=msg.round, step=state.counters.get("step"))
        return Ack(of_msg_id=ctx.msg_id)

    # --- adapters --------------------------------------------------------------------------
    async def on_adapters_request(self, msg: AdaptersRequest, ctx: MsgContext) -> AdaptersUp:
        self.require_coordinator(ctx)
        async with self._compute:
            state, n = self.session.adapters()
        tensors = {k: WireTensor.from_torch(v) for k, v in state.items()}
        return AdaptersUp(device=self.name, round=msg.round, n_samples=n, tensors=tensors)

    async def on_adapters_down(self, msg: AdaptersDown, ctx: MsgContext) -> Ack:
        self.require_coordinator(ctx)
        s = self.session
        state = {k: unpack_tensor(v) for k, v in msg.tensors.items()}
        async with self._compute:
            missing = s.load_adapters(state, msg.reset_moments)
        reset = len(msg.reset_moments)
        self.log.debug("adapters_loaded", round=msg.round, tensors=len(state), missing=missing, reset=reset)
        return Ack(of_msg_id=ctx.msg_id)


def _top_labels(histogram: list[int], k: int = 5) -> str:
    """``"3:120 7:88 …"``: this shard's most frequent labels (class index: count), for the log."""
    top = sorted(((c, i) for i, c in enumerate(histogram) if c), reverse=True)[:k]
    return " ".join(f"{i}:{c}" for c, i in top)
