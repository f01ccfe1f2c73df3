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
import time
from typing import Any

from sft_actors.actors.base import Actor
from sft_actors.actors.env import ActorEnv
from sft_actors.actors.handlers import MsgContext
from sft_actors.errors import ConfigError
from sft_actors.topology import ActorSpec
from sft_actors.train import modes
from sft_actors.train.loading import load_shared_model, lora_config, torch_dtype
from sft_actors.train.server_trainer import ServerResult, ServerTrainer
from sft_actors.train.tensors import pack_tensor, step_seed, unpack_tensor
from sft_actors.wire import Ack, Activations, AdaptersRequest, AdaptersUp, Gradients, RoundDone, WireTensor


class ServerActor(Actor):
    handler_concurrency = 4

    def __init__(self, spec: ActorSpec, env: ActorEnv) -> None:
        super().__init__(spec, env)
        devices = self.topology.devices
        cuts = [d.cut for d in devices if d.cut is not None]
        self.start_block = spec.start_block if spec.start_block is not None else min(cuts, default=0)
        self._compute = asyncio.Lock()
        self._device_index = {d.name: i for i, d in enumerate(devices)}
        self.batches_served = 0

    async def on_start(self) -> None:
        await self.offload(self._setup)
        self.log.info("server_ready", start_block=self.start_block, update=self.trainer.update)

    def _setup(self) -> None:
        from sft_actors.model import split_model

        run = self.topology.run
        self.model = load_shared_model(run.model, torch_dtype(run.dtype))
        _, self.part = split_model(
            self.model,
            self.start_block,
            server_start=self.start_block,
            lora=lora_config(run.lora),
            seed=run.seed,
        )
        self.trainer = ServerTrainer(self.part, lr=run.train.lr, update=run.train.server_update)
        _, self.codec_down = modes.codecs(modes.policy_table(run.train.mode, {"up": run.codec.up, "down": run.codec.down}))

    async def on_activations(self, msg: Activations, ctx: MsgContext) -> Gradients:
        if msg.device not in self._device_index or msg.device != ctx.peer:
            raise ConfigError(f"activations claim device {msg.device!r} but came from {ctx.peer!r}")
        if msg.cut < self.start_block:
            raise ConfigError(
                f"device {msg.device} sent activations at cut {msg.cut}, below this server's first block "
                f"{self.start_block}; set start_block ≤ {msg.cut} for server {self.name}"
            )
        hidden = await self.offload(unpack_tensor, msg.activations)
        labels = await self.offload(unpack_tensor, msg.labels)
        t0 = time.perf_counter()
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
            seed = step_seed(self.topology.run.seed, self._device_index[msg.device], msg.round, msg.step, 1)
            grad, _ = await self.offload(pack_tensor, res.grad, self.codec_down, seed=seed)
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

    async def on_round_done(self, msg: RoundDone, ctx: MsgContext) -> Ack:
        """The coordinator closes a round: ``per_round`` applies the accumulated update now."""
        async with self._compute:
            applied = await self.offload(self.trainer.end_round)
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
