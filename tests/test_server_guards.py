"""The shared server refuses what it must not train on, and who may not steer it — before
anything is applied (a refused micro-batch leaves the server part exactly as it was)."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import torch
import zmq.asyncio

from sft_actors.actors.server import HeadServerActor
from sft_actors.actors.testing import Idle, actor_env, serving, small_topology
from sft_actors.errors import RemoteError
from sft_actors.model import lora_state_dict
from sft_actors.plan.assign import server_plans
from sft_actors.wire import Activations, AdaptersRequest, Gradients, RoundClose, ServerPlan, WireTensor

pytestmark = pytest.mark.timeout(60)
DIM, T = 64, 8  # llama-tiny's width; tokens per sequence


def activations(**change: Any) -> Activations:
    msg = Activations(
        device="dev0",
        round=1,
        step=0,
        cut=1,  # dev0's planned cut in small_topology
        activations=WireTensor.from_torch(torch.randn(2, T, DIM, generator=torch.Generator().manual_seed(0))),
        labels=WireTensor.from_torch(
            torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(1))
        ),
        n_samples=2,
        sent_at_ns=time.time_ns(),
    )
    return dataclasses.replace(msg, **change)


def _t(x: torch.Tensor) -> WireTensor:
    return WireTensor.from_torch(x)


BAD: dict[str, tuple[Callable[[], Activations], str]] = {
    "nan": (lambda: activations(activations=_t(torch.full((2, T, DIM), float("nan")))), "NaN or inf"),
    "integers": (lambda: activations(activations=_t(torch.ones(2, T, DIM, dtype=torch.int64))), "floating"),
    "width": (lambda: activations(activations=_t(torch.zeros(2, T, 32))), rf"\(B, T, {DIM}\)"),
    "cut": (lambda: activations(cut=3), "the plan says 1"),
    "huge": (lambda: activations(activations=_t(torch.full((2, T, DIM), 3e38))), "too large"),
    "labels_int32": (lambda: activations(labels=_t(torch.zeros(2, T, dtype=torch.int32))), "int64"),
    "labels_range": (lambda: activations(labels=_t(torch.full((2, T), 999))), r"labels outside \[0, 256\)"),
    "labels_shape": (lambda: activations(labels=_t(torch.zeros(3, T, dtype=torch.int64))), "labels must be"),
    "another_device": (lambda: activations(device="dev1"), "claim device 'dev1' but came from 'dev0'"),
}


@contextlib.asynccontextmanager
async def head_server(
    ctx: zmq.asyncio.Context,
) -> AsyncIterator[tuple[Idle, HeadServerActor, Idle, ServerPlan]]:
    """A real head server between a scripted coordinator and a scripted device ``dev0``
    (a second device, ``dev1``, is planned but never connects)."""
    topo = small_topology(devices=2)
    (plan,) = server_plans(topo)
    with actor_env(topo, ctx) as env:
        coord, server, dev = (
            Idle(topo.actor("coordinator"), env),
            HeadServerActor(topo.actor("server"), env),
            Idle(topo.actor("dev0"), env),
        )
        async with serving(coord, server, dev):
            await dev.ready()
            yield coord, server, dev, plan


@pytest.mark.asyncio
@pytest.mark.parametrize("case", sorted(BAD))
async def test_bad_micro_batches_are_refused_and_change_nothing(
    case: str, zmq_ctx: zmq.asyncio.Context
) -> None:
    async with head_server(zmq_ctx) as (coord, server, dev, plan):
        await coord.call("server", plan)
        before = {k: v.clone() for k, v in lora_state_dict(server.part).items()}
        make, why = BAD[case]
        with pytest.raises(RemoteError, match="ProtocolViolation") as info:
            await dev.call("server", make())
        assert re.search(why, info.value.remote_message), info.value.remote_message
        after = lora_state_dict(server.part)
        assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was applied
        # ...and the server still serves the device's honest micro-batch, which does train.
        reply = await dev.call("server", activations())
        assert isinstance(reply, Gradients) and reply.grad.desc.shape == (2, T, DIM)
        trained = lora_state_dict(server.part)
        assert any(not torch.equal(before[k], trained[k]) for k in before)


@pytest.mark.asyncio
async def test_only_the_coordinator_steers_the_server(zmq_ctx: zmq.asyncio.Context) -> None:
    async with head_server(zmq_ctx) as (coord, server, dev, plan):
        hijack = dataclasses.replace(plan, lr=1e6)
        close = RoundClose(round=1, n_samples=2, micro_batches=1, devices=("dev0",))
        for msg in (hijack, close, AdaptersRequest(round=1)):
            with pytest.raises(
                RemoteError, match="is the coordinator's to send; 'dev0' is not 'coordinator'"
            ):
                await dev.call("server", msg)  # type: ignore[arg-type]
        await coord.call("server", plan)
        with pytest.raises(RemoteError, match="already has a different plan"):
            await coord.call("server", hijack)
        assert server.plan.lr == plan.lr
        up = await coord.call("server", AdaptersRequest(round=1))
        assert set(lora_state_dict(server.part)) <= set(up.tensors)  # the coordinator may ask
