"""What every server actor shares: its plan, the devices it serves and their codecs.

A server actor is built empty and becomes useful when the coordinator's SERVER_PLAN arrives:
the plan says which blocks it runs, which stage comes next, and, per device, the cut and the
codec chains. Activations are accepted only from the device they claim to be from (or from an
upstream stage of this server), only at or above this actor's first block, and decoded with that
device's own basis. Subclasses: :class:`~sft_actors.actors.server.HeadServerActor` (runs to the
loss) and :class:`~sft_actors.actors.stage.StageServerActor` (a middle block range).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import torch

from sft_actors.actors.base import Actor
from sft_actors.actors.env import ActorEnv
from sft_actors.actors.handlers import MsgContext
from sft_actors.actors.rate_log import RateWarnings
from sft_actors.codec import BasisRegistry, Codec
from sft_actors.errors import CodecError, ProtocolViolation
from sft_actors.model import Part, SplitLM, head_state_dict, lora_state_dict
from sft_actors.placement import resolve_device
from sft_actors.topology import ActorSpec
from sft_actors.train.inputs import activation_bound, check_activations, check_labels
from sft_actors.train.loading import load_shared_model
from sft_actors.train.modes import codec_for
from sft_actors.train.state import TrainerState
from sft_actors.wire import (
    Ack,
    Activations,
    AdaptersRequest,
    AdaptersUp,
    BasisUpload,
    Restore,
    RoundClose,
    ServerPlan,
    StateReport,
    StateRequest,
    WireTensor,
)
from sft_actors.wire.basis import basis_from_upload
from sft_actors.wire.coded import pack_tensor, step_seed, unpack_tensor
from sft_actors.wire.plans import ServedDevice


class RoundTrainer(Protocol):
    """What a server actor trains with: a part, a ``per_round`` update to apply, and its
    state for checkpoints."""

    part: Part

    def end_round(self, micro_batches: int | None = None) -> int: ...

    def drop_devices(self, keep: Callable[[int], bool]) -> int: ...

    def state(self) -> TrainerState: ...

    def restore(self, state: TrainerState) -> None: ...


TrainerT = TypeVar("TrainerT", bound=RoundTrainer)


class ServerBase(Actor, ABC, Generic[TrainerT]):
    """Plan, per-device bases and codecs, sender checks; subclasses build their trainer and add
    ``on_activations``."""

    handler_concurrency = 4

    def __init__(self, spec: ActorSpec, env: ActorEnv) -> None:
        super().__init__(spec, env)
        self._plan: ServerPlan | None = None
        self._model: SplitLM | None = None
        self._trainer: TrainerT | None = None
        self._compute = asyncio.Lock()
        self._devices: dict[str, ServedDevice] = {}
        self._rate_warnings = RateWarnings()
        self._bases: dict[str, BasisRegistry] = {}
        self._codec_down: dict[str, Codec | None] = {}
        self.batches_served = 0
        #: The round whose training micro-batches are accepted (the next one to close).
        self.open_round = 1
        #: Where this server computes (``[[actors]] device``), checked against the host at start.
        self.compute_device = torch.device("cpu")

    async def _start(self) -> None:
        # Before any socket: a device this host lacks is a typed error naming actor and device.
        self.compute_device = resolve_device(self.spec.device, actor=self.name)
        await super()._start()

    @property
    def plan(self) -> ServerPlan:
        return self._require_plan()

    def _require_plan(self) -> ServerPlan:
        if self._plan is None:
            raise ProtocolViolation(
                f"server {self.name} has no plan yet: the coordinator must send SERVER_PLAN first"
            )
        return self._plan

    async def on_server_plan(self, msg: ServerPlan, ctx: MsgContext) -> Ack:
        self.require_coordinator(ctx)
        if msg.server != self.name:
            raise ProtocolViolation(f"plan for {msg.server!r} sent to server {self.name!r}")
        if self._plan is not None:
            if msg == self._plan:  # a restarted coordinator re-sends it: keep what is built
                self.log.info("plan_confirmed", round=self.open_round)
                return Ack(of_msg_id=ctx.msg_id)
            if msg.run_id == self._plan.run_id:
                raise ProtocolViolation(
                    f"server {self.name} already has a different plan for run {msg.run_id!r}; "
                    "restart it to re-plan the run"
                )
            self.log.warning("new_run", was=self._plan.run_id, now=msg.run_id)  # start over
            self.open_round, self.batches_served = 1, 0
        model = await self.offload(load_shared_model, msg.model, device=self.compute_device)
        self._model = model
        self._trainer = await self.offload(self._build, msg, model)
        self._devices = {d.name: d for d in msg.devices}
        self._bases = {d.name: BasisRegistry() for d in msg.devices}
        self._codec_down = {d.name: codec_for(d.codec.down) for d in msg.devices}
        self._plan = msg
        self.log.info(
            "server_ready",
            start_block=msg.start_block,
            end_block=msg.end_block,
            next_stage=msg.next_stage or None,
            update=msg.update,
            devices=len(msg.devices),
        )
        return Ack(of_msg_id=ctx.msg_id)

    @abstractmethod
    def _build(self, plan: ServerPlan, model: SplitLM) -> TrainerT:
        """The part and trainer this actor runs (called in the offload pool)."""

    @property
    def trainer(self) -> TrainerT:
        if self._trainer is None:
            self._require_plan()  # raises: no plan yet
        assert self._trainer is not None  # built with the plan
        return self._trainer

    @property
    def part(self) -> Part:
        """The server part whose LoRA (and head) this actor trains."""
        return self.trainer.part

    def _end_round(self, micro_batches: int) -> int:
        """Apply a ``per_round`` update over ``micro_batches`` (all devices' this round);
        returns the micro-batches whose gradient this actor accumulated (0: no update)."""
        return self.trainer.end_round(micro_batches)

    # --- checks and tensors ------------------------------------------------------------------
    def _check_round(self, msg: Activations) -> None:
        """Training micro-batches belong to the open round; a late device's activations of a
        round that closed without it are refused (its gradient would land in the wrong round)."""
        if msg.phase == "train" and msg.round != self.open_round:
            raise ProtocolViolation(
                f"activations of {msg.device} for round {msg.round}, but round {self.open_round} "
                "is open on this server (the device was dropped from that round)"
            )

    def _check_sender(self, msg: Activations, ctx: MsgContext) -> bool:
        """True if an upstream stage relayed ``msg``. Raises :class:`ProtocolViolation` for a
        device speaking as another, or activations at a cut other than the plan's (the device's
        own cut, or this stage's first block when a stage relays them)."""
        plan = self.plan
        self._check_round(msg)
        from_stage = ctx.peer in plan.upstream
        if msg.device not in self._devices or (msg.device != ctx.peer and not from_stage):
            raise ProtocolViolation(f"activations claim device {msg.device!r} but came from {ctx.peer!r}")
        expected = plan.start_block if from_stage else self._devices[msg.device].cut
        if msg.cut != expected:
            raise ProtocolViolation(
                f"activations for {msg.device} at cut {msg.cut}; the plan says {expected} "
                f"(server {self.name} runs blocks from {plan.start_block})"
            )
        return from_stage

    async def _inputs(self, msg: Activations) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded activations (B, T, C) and labels, checked before any compute touches them."""
        assert self._model is not None  # set with the plan
        bound = activation_bound(self._model, self.plan.batch_size, self.plan.seq_len)
        hidden = await self.offload(unpack_tensor, msg.activations, self._bases[msg.device], max_shape=bound)
        labels = await self.offload(unpack_tensor, msg.labels)
        check_activations(self._model, hidden)
        check_labels(self._model, hidden, labels)
        return hidden, labels

    async def _pack_grad(self, msg: Activations, grad: torch.Tensor, from_stage: bool) -> WireTensor:
        """Stage to stage: raw (same edge server); to a device: that device's gradient chain."""
        codec = None if from_stage else self._codec_down[msg.device]
        seed = step_seed(self.plan.model.seed, self._devices[msg.device].index, msg.round, msg.step, 1)
        packed, report = await self.offload(pack_tensor, grad, codec, seed=seed)
        self._rate_warnings.check(self.log, report, msg.round, direction="down", device=msg.device)
        self.batches_served += 1
        return packed

    # --- shared handlers ---------------------------------------------------------------------
    async def on_basis_upload(self, msg: BasisUpload, ctx: MsgContext) -> Ack:
        """A device's transform-coding basis (first fit or refit): its projected activations
        decode with it from now on; frames coded with an earlier one still decode by digest.

        Answers ERROR (:class:`CodecError`) for a malformed basis or one that does not match
        its digest, and :class:`ProtocolViolation` for another device's basis."""
        self._require_plan()
        if msg.device != ctx.peer or msg.device not in self._bases:
            raise ProtocolViolation(f"basis for device {msg.device!r} came from {ctx.peer!r}")
        try:
            basis = basis_from_upload(msg)
        except CodecError as exc:
            raise CodecError(f"basis {msg.key!r} from {msg.device}: {exc}") from None
        self._bases[msg.device].register(msg.key, basis)
        self.log.info(
            "basis_received",
            device=msg.device,
            key=msg.key,
            kind=basis.kind,
            rank=basis.rank,
            digest=basis.digest,
        )
        return Ack(of_msg_id=ctx.msg_id)

    async def on_round_close(self, msg: RoundClose, ctx: MsgContext) -> Ack:
        """The round is over: micro-batches of devices it closed without (lost, late) are
        discarded, then ``per_round`` applies the accumulated update of the rest."""
        self.require_coordinator(ctx)
        self._require_plan()
        if msg.round != self.open_round:
            raise ProtocolViolation(f"ROUND_CLOSE for round {msg.round}; round {self.open_round} is open")
        counted = {self._devices[d].index for d in msg.devices if d in self._devices}
        async with self._compute:
            dropped = 0
            if msg.devices:
                dropped = await self.offload(self.trainer.drop_devices, lambda i: i in counted)
            applied = await self.offload(self._end_round, msg.micro_batches)
        self.open_round = msg.round + 1
        if dropped:
            self.log.warning("round_batches_discarded", round=msg.round, micro_batches=dropped)
        self.log.debug("round_closed", round=msg.round, batches_applied=applied, samples=msg.n_samples)
        return Ack(of_msg_id=ctx.msg_id)

    # --- durable runs ----------------------------------------------------------------------
    async def on_state_request(self, msg: StateRequest, ctx: MsgContext) -> StateReport:
        """Adapters, optimizer state and counters for the coordinator's checkpoint."""
        self.require_coordinator(ctx)
        self._require_plan()
        async with self._compute:
            state = await self.offload(self.trainer.state)
        counters = {**state.counters, "batches_served": self.batches_served}
        return StateReport(
            actor=self.name,
            round=msg.round,
            tensors={k: WireTensor.from_torch(v) for k, v in state.tensors.items()},
            counters=counters,
        )

    async def on_restore(self, msg: Restore, ctx: MsgContext) -> Ack:
        """Continue from a checkpoint (a resumed run, or this server restarted)."""
        self.require_coordinator(ctx)
        self._require_plan()
        counters = dict(msg.counters)
        self.batches_served = counters.pop("batches_served", 0)
        state = TrainerState(tensors={k: unpack_tensor(v) for k, v in msg.tensors.items()}, counters=counters)
        async with self._compute:
            await self.offload(self.trainer.restore, state)
        self.open_round = msg.round + 1
        self.log.info("state_restored", round=msg.round, tensors=len(state.tensors))
        return Ack(of_msg_id=ctx.msg_id)

    async def on_adapters_request(self, msg: AdaptersRequest, ctx: MsgContext) -> AdaptersUp:
        self.require_coordinator(ctx)
        self._require_plan()
        async with self._compute:
            state: dict[str, Any] = {**lora_state_dict(self.part), **head_state_dict(self.part)}
        return AdaptersUp(
            device=self.name,
            round=msg.round,
            n_samples=self.batches_served,
            tensors={k: WireTensor.from_torch(v) for k, v in state.items()},
        )
