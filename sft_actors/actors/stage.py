"""A middle server stage: runs blocks ``[start_block, end_block)`` and passes the result on.

Several ``role = "server"`` actors with distinct first blocks are stages of one edge server;
different devices' micro-batches flow through them concurrently. A stage forwards, calls the
next stage with its output, and backpropagates the gradient that comes back. The compute lock
is held only around the forward and the backward, so while one micro-batch is in a later stage
this one serves the next (pipelining).
"""

from __future__ import annotations

import dataclasses

import torch

from sft_actors.actors.handlers import MsgContext
from sft_actors.actors.server_base import ServerBase
from sft_actors.errors import ProtocolViolation
from sft_actors.model import Part, SplitLM
from sft_actors.placement import to_compute
from sft_actors.train.accumulate import order_key
from sft_actors.train.device_trainer import DeviceTrainer
from sft_actors.train.stages import StagePart
from sft_actors.wire import Activations, Gradients, ServerPlan, WireTensor
from sft_actors.wire.coded import unpack_tensor


class StageServerActor(ServerBase[DeviceTrainer]):
    """Blocks ``[start_block, end_block)``; the plan's ``next_stage`` takes its output."""

    def _build(self, plan: ServerPlan, model: SplitLM) -> DeviceTrainer:
        if plan.end_block is None or not plan.next_stage:
            raise ProtocolViolation(f"server {plan.server} is planned as the head, not a middle stage")
        part = StagePart(model, plan.start_block, plan.end_block, plan.model.lora, seed=plan.model.seed)
        # The stage's forward/backward bookkeeping is a device's: activations in, gradient back.
        return DeviceTrainer(
            part, lr=plan.lr, max_inflight=plan.inflight, accumulate=plan.update == "per_round"
        )

    async def on_activations(self, msg: Activations, ctx: MsgContext) -> Gradients:
        from_stage = self._check_sender(msg, ctx)
        hidden, _ = await self._inputs(msg)
        plan, trainer = self.plan, self.trainer
        assert plan.end_block is not None  # a stage has an end block (see _build)
        train = msg.phase == "train"
        # In flight and accumulated under the micro-batch's order key (eval: no backward).
        key = order_key(self._devices[msg.device].index, msg.step) if train else -1
        part = trainer.part  # the base dtype and device: bfloat16 activations stay bfloat16
        x = to_compute(hidden.detach(), part.device, part.dtype).requires_grad_(train)
        async with self._compute:
            if train:
                out = await self.offload(trainer.forward, key, x, msg.cut)
            else:
                out = await self.offload(_eval_forward, trainer.part, x, msg.cut)
        onward = dataclasses.replace(msg, cut=plan.end_block, activations=WireTensor.from_torch(out))
        try:
            reply = await self.call(plan.next_stage, onward, timeout_s=plan.round_timeout_s)
        except BaseException:
            if train:
                trainer.abandon(key)
            raise
        if not train:
            return dataclasses.replace(reply, device=msg.device)
        grad_out = await self.offload(unpack_tensor, reply.grad, max_shape=tuple(out.shape))
        async with self._compute:
            await self.offload(trainer.backward, key, grad_out)
        assert x.grad is not None  # x is a leaf that required grad; backward filled it
        grad = await self._pack_grad(msg, x.grad, from_stage)
        return dataclasses.replace(reply, grad=grad)


@torch.no_grad()
def _eval_forward(part: Part, x: torch.Tensor, cut: int) -> torch.Tensor:
    out: torch.Tensor = part(x, cut)
    return out
