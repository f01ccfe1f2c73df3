"""The head server actor: one shared server part serving every device at that device's cut.

Each ACTIVATIONS request is decoded, run from the device's cut through the remaining blocks
and the head, and answered with the (compressed) gradient w.r.t. the cut activations. Up to
``handler_concurrency`` requests are handled at once so that decoding and encoding (in the
thread pool) overlap another device's compute; the compute itself is serialised by a lock —
one server part, one optimizer. ``update = "per_round"`` applies the accumulated gradient when
the coordinator closes the round (ROUND_CLOSE).
"""

from __future__ import annotations

import time

from sft_actors.actors.env import ActorEnv
from sft_actors.actors.handlers import MsgContext
from sft_actors.actors.server_base import ServerBase
from sft_actors.actors.stage import StageServerActor
from sft_actors.model import SplitLM, split_model
from sft_actors.topology import ActorSpec
from sft_actors.train.accumulate import order_key
from sft_actors.train.server_trainer import ServerResult, ServerTrainer
from sft_actors.wire import Activations, Gradients, ServerPlan, WireTensor


class HeadServerActor(ServerBase[ServerTrainer]):
    """Blocks ``[start_block, L)`` and the head: computes the loss and the cut gradient."""

    def _build(self, plan: ServerPlan, model: SplitLM) -> ServerTrainer:
        _, part = split_model(
            model, plan.start_block, server_start=plan.start_block, lora=plan.model.lora, seed=plan.model.seed
        )
        return ServerTrainer(part, lr=plan.lr, update=plan.update)

    async def on_activations(self, msg: Activations, ctx: MsgContext) -> Gradients:
        from_stage = self._check_sender(msg, ctx)
        hidden, labels = await self._inputs(msg)
        trainer = self.trainer
        t0 = time.perf_counter()
        async with self._compute:
            if msg.phase == "eval":
                res: ServerResult = await self.offload(trainer.eval_step, hidden, labels, msg.cut)
            else:
                key = order_key(self._devices[msg.device].index, msg.step)
                res = await self.offload(trainer.train_step, hidden, labels, msg.cut, key=key)
        server_ms = (time.perf_counter() - t0) * 1e3
        if res.grad is None:  # evaluation: no gradient goes back
            grad = WireTensor.from_torch(hidden.new_zeros(0))
        else:
            grad = await self._pack_grad(msg, res.grad, from_stage)
        return Gradients(
            device=msg.device,
            round=msg.round,
            step=msg.step,
            grad=grad,
            loss=res.loss,
            n_tokens=res.n_targets,
            correct=res.correct,
            server_ms=round(server_ms, 3),
        )


def server_actor(spec: ActorSpec, env: ActorEnv) -> HeadServerActor | StageServerActor:
    """The ``server`` role's factory: a middle stage when another server starts after this one.

    Placement is the runtime's (which class to build); everything the actor then runs comes from
    its SERVER_PLAN."""
    mine = spec.start_block or 0
    if any((s.start_block or 0) > mine for s in env.topology.servers):
        return StageServerActor(spec, env)
    return HeadServerActor(spec, env)
