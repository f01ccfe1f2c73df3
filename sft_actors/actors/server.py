"""The edge server actor: one shared server part serving every device at that device's cut.

Each ACTIVATIONS request is decoded, run from the device's cut through the remaining blocks
and the head, and answered with the (compressed) gradient w.r.t. the cut activations. Up to
``handler_concurrency`` requests are handled at once so that decoding and encoding (in the
thread pool) overlap another device's compute; the compute itself is serialised by a lock —
one server part, one optimizer. ``server_update = "per_round"`` applies the accumulated
gradient when the coordinator reports the round done.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from typing import Any

import torch

from sft_actors.actors.base import Actor
from sft_actors.actors.env import ActorEnv
from sft_actors.actors.handlers import MsgContext
from sft_actors.codec import Basis, BasisRegistry, Codec
from sft_actors.errors import CodecError, ConfigError
from sft_actors.topology import ActorSpec
from sft_actors.train import modes
from sft_actors.train.device_trainer import DeviceTrainer
from sft_actors.train.loading import load_shared_model, lora_config, torch_dtype
from sft_actors.train.server_trainer import ServerResult, ServerTrainer
from sft_actors.train.stages import StagePart
from sft_actors.train.tensors import pack_tensor, step_seed, unpack_tensor
from sft_actors.wire import (
    Ack,
    Activations,
    AdaptersRequest,
    AdaptersUp,
    BasisUpload,
    Gradients,
    RoundDone,
    WireTensor,
)


class ServerActor(Actor):
    handler_concurrency = 4

    def __init__(self, spec: ActorSpec, env: ActorEnv) -> None:
        super().__init__(spec, env)
        devices = self.topology.devices
        cuts = [d.cut for d in devices if d.cut is not None]
        self.start_block = spec.start_block if spec.start_block is not None else min(cuts, default=0)
        self._compute = asyncio.Lock()
        self._device_index = {d.name: i for i, d in enumerate(devices)}
        # Server stages: every server actor's first block; the stage after this one (if any)
        # receives this stage's output, and this stage returns its gradient.
        starts = {
            s.name: (s.start_block if s.start_block is not None else min(cuts, default=0))
            for s in self.topology.servers
        }
        later = sorted((b, n) for n, b in starts.items() if b > self.start_block)
        self.next_stage: str | None = later[0][1] if later else None
        self.end_block: int | None = later[0][0] if later else None
        self._stages = set(starts)
        self._keys = itertools.count()
        # Each device's projection bases (transform coding), received once per run.
        self._bases: dict[str, BasisRegistry] = {d.name: BasisRegistry() for d in devices}
        self.batches_served = 0

    async def on_start(self) -> None:
        await self.offload(self._setup)
        self.log.info(
            "server_ready",
            start_block=self.start_block,
            end_block=self.end_block,
            next_stage=self.next_stage,
            update=self.topology.run.train.server_update,
        )

    def _setup(self) -> None:
        from sft_actors.model import split_model

        run = self.topology.run
        self.model = load_shared_model(run.model, torch_dtype(run.dtype))
        if self.end_block is not None:  # a middle stage: blocks [start, end), no head
            self.part: Any = StagePart(
                self.model, self.start_block, self.end_block, lora_config(run.lora), seed=run.seed
            )
            self.stage_trainer: DeviceTrainer | None = DeviceTrainer(
                self.part,
                lr=run.train.lr,
                max_inflight=max(1, self.settings.link_window * max(1, len(self.topology.devices))),
                accumulate=run.train.server_update == "per_round",
            )
            self.trainer: ServerTrainer | None = None
        else:
            self.stage_trainer = None
            _, self.part = split_model(
                self.model,
                self.start_block,
                server_start=self.start_block,
                lora=lora_config(run.lora),
                seed=run.seed,
            )
            self.trainer = ServerTrainer(self.part, lr=run.train.lr, update=run.train.server_update)
        self.codec_down = self._down_codecs()

    def _down_codecs(self) -> dict[str, Codec | None]:
        """The gradient codec for each device (its own ``codec`` table, else ``[run.codec]``)."""
        mode = self.topology.run.train.mode
        return {
            d.name: modes.down_codec(modes.policy_table(mode, self.topology.codec_table(d.name)))
            for d in self.topology.devices
        }

    async def on_activations(self, msg: Activations, ctx: MsgContext) -> Gradients:
        from_stage = ctx.peer in self._stages
        if msg.device not in self._device_index or (msg.device != ctx.peer and not from_stage):
            raise ConfigError(f"activations claim device {msg.device!r} but came from {ctx.peer!r}")
        if msg.cut < self.start_block:
            raise ConfigError(
                f"device {msg.device} sent activations at cut {msg.cut}, below this server's first block "
                f"{self.start_block}; set start_block ≤ {msg.cut} for server {self.name}"
            )
        hidden = await self.offload(unpack_tensor, msg.activations, self._bases[msg.device])
        labels = await self.offload(unpack_tensor, msg.labels)
        if self.stage_trainer is not None:
            return await self._through_next_stage(msg, ctx, hidden, from_stage)
        t0 = time.perf_counter()
        assert self.trainer is not None
        async with self._compute:
            if msg.phase == "eval":
                res: ServerResult = await self.offload(self.trainer.eval_step, hidden, labels, msg.cut)
            elif msg.phase == "train":
                res = await self.offload(self.trainer.train_step, hidden, labels, msg.cut)
            else:
                raise ConfigError(f"unknown activation phase {msg.phase!r}: use 'train' or 'eval'")
        server_ms = (time.perf_counter() - t0) * 1e3
        if res.grad is None:
            grad = WireTensor.from_torch(hidden.new_zeros(0))
        else:
            # Stage to stage: raw (same edge server); to a device: that device's down chain.
            codec = None if from_stage else self.codec_down[msg.device]
            seed = step_seed(self.topology.run.seed, self._device_index[msg.device], msg.round, msg.step, 1)
            grad, _ = await self.offload(pack_tensor, res.grad, codec, seed=seed)
            self.batches_served += 1
        return Gradients(
            device=msg.device,
            round=msg.round,
            step=msg.step,
            grad=grad,
            loss=res.loss,
            n_tokens=res.n_targets,
            metrics={"correct": res.correct, "server_ms": round(server_ms, 3)},
        )

    async def _through_next_stage(
        self, msg: Activations, ctx: MsgContext, hidden: torch.Tensor, from_stage: bool
    ) -> Gradients:
        """A middle stage: run blocks [cut, end), pass the result on, backprop what comes back.

        The compute lock is held only around the forward and the backward, so while this
        micro-batch is in a later stage, this stage serves the next one (pipelining).
        """
        assert self.stage_trainer is not None and self.next_stage is not None and self.end_block is not None
        trainer = self.stage_trainer
        key = next(self._keys)
        x = hidden.detach().to(torch.float32).requires_grad_(msg.phase == "train")
        async with self._compute:
            if msg.phase == "train":
                out = await self.offload(trainer.forward, key, x, msg.cut)
            else:
                out = await self.offload(_eval_forward, self.part, x, msg.cut)
        try:
            reply = await self.call(
                self.next_stage,
                dataclasses.replace(msg, cut=self.end_block, activations=WireTensor.from_torch(out)),
                timeout_s=self.topology.run.train.round_timeout_s,
            )
        except BaseException:
            trainer.abandon(key)
            raise
        if not isinstance(reply, Gradients):
            trainer.abandon(key)
            raise ConfigError(f"stage {self.next_stage} answered {type(reply).__name__} to ACTIVATIONS")
        if msg.phase != "train":
            return dataclasses.replace(reply, device=msg.device)
        grad_out = await self.offload(unpack_tensor, reply.grad)
        async with self._compute:
            await self.offload(trainer.backward, key, grad_out)
        assert x.grad is not None
        codec = None if from_stage else self.codec_down[msg.device]
        seed = step_seed(self.topology.run.seed, self._device_index[msg.device], msg.round, msg.step, 1)
        grad, _ = await self.offload(pack_tensor, x.grad, codec, seed=seed)
        self.batches_served += 1
        return dataclasses.replace(reply, grad=grad)

    async def on_basis_upload(self, msg: BasisUpload, ctx: MsgContext) -> Ack:
        """A device's PCA basis: its projected activations decode with it from now on."""
        if msg.device != ctx.peer or msg.device not in self._bases:
            raise ConfigError(f"basis for device {msg.device!r} came from {ctx.peer!r}")
        vectors, mean = unpack_tensor(msg.vectors), unpack_tensor(msg.mean)
        basis = Basis(vectors=vectors.numpy().astype("float32"), mean=mean.numpy().astype("float32"))
        if basis.digest != msg.digest:
            raise CodecError(f"basis from {msg.device} does not match its digest: corrupted in transit")
        self._bases[msg.device].register(msg.key, basis)
        self.log.info("basis_received", device=msg.device, key=msg.key, rank=basis.rank)
        return Ack(of_msg_id=ctx.msg_id)

    async def on_round_done(self, msg: RoundDone, ctx: MsgContext) -> Ack:
        """The coordinator closes a round: ``per_round`` applies the accumulated update now."""
        trainer: Any = self.stage_trainer if self.stage_trainer is not None else self.trainer
        async with self._compute:
            applied = await self.offload(trainer.end_round)
        self.log.debug("round_closed", round=msg.round, batches_applied=applied)
        return Ack(of_msg_id=ctx.msg_id)

    async def on_adapters_request(self, msg: AdaptersRequest, ctx: MsgContext) -> AdaptersUp:
        from sft_actors.model import head_state_dict, lora_state_dict

        async with self._compute:
            state: dict[str, Any] = {**lora_state_dict(self.part), **head_state_dict(self.part)}
        return AdaptersUp(
            device=self.name,
            round=msg.round,
            n_samples=self.batches_served,
            tensors={k: WireTensor.from_torch(v) for k, v in state.items()},
        )


@torch.no_grad()
def _eval_forward(part: Any, x: torch.Tensor, cut: int) -> torch.Tensor:
    return part(x, cut)  # type: ignore[no-any-return]
