"""The coordinator's per-actor plans (``plan.assign``) and the typed request/reply contract."""

from __future__ import annotations

from typing import Any

import pytest

from sft_actors.actors.base import Actor
from sft_actors.actors.handlers import MsgContext
from sft_actors.codec.spec import CodecPolicy
from sft_actors.plan.assign import device_plans, server_plans
from sft_actors.topology import parse_topology
from sft_actors.wire import (
    Ack,
    Activations,
    DevicePlan,
    EvalRequest,
    Gradients,
    Metrics,
    RoundStart,
    WireLimits,
    decode,
    encode,
)

UP = {"sparsify": {"keep": 0.2}, "quantize": {"bits": 8}}
OWN = {"up": {"quantize": {"bits": 4, "scale": "channel"}}, "down": {}}


def doc(mode: str = "sft", **train: Any) -> dict[str, Any]:
    return {
        "run": {
            "name": "t",
            "model": "llama-tiny",
            "train": {"mode": mode, "max_inflight": 2, **train},
            "codec": {"up": UP, "down": UP},
            "runtime": {"link_window": 4},
        },
        "actors": [
            {"name": "coordinator", "role": "coordinator", "port": 0},
            {"name": "s0", "role": "server", "port": 0},
            {"name": "s1", "role": "server", "port": 0, "start_block": 3},
            {"name": "dev0", "role": "device", "cut": 1},
            {"name": "dev1", "role": "device", "cut": 3, "codec": OWN},
            {"name": "dev2", "role": "device", "cut": 2, "shard": 7},
        ],
    }


def test_each_device_gets_its_server_stage_shard_and_chains() -> None:
    plans = {p.device: p for p in device_plans(parse_topology(doc()))}
    assert {d: p.server for d, p in plans.items()} == {"dev0": "s0", "dev1": "s1", "dev2": "s0"}
    assert [plans[d].shard for d in ("dev0", "dev1", "dev2")] == [0, 1, 7]
    assert [plans[d].index for d in ("dev0", "dev1", "dev2")] == [0, 1, 2]
    assert all(p.num_devices == 3 and p.train.max_inflight == 2 for p in plans.values())
    assert plans["dev0"].codec == CodecPolicy.parse({"up": UP, "down": UP})
    assert plans["dev1"].codec == CodecPolicy.parse(OWN)  # its own table wins
    assert plans["dev0"].model.lora.rank == 8 and plans["dev0"].data.dataset == "stdlib-docs"


def test_servers_get_their_block_range_neighbours_and_every_devices_chain() -> None:
    s0, s1 = server_plans(parse_topology(doc()))
    assert (s0.server, s0.start_block, s0.end_block, s0.next_stage, s0.upstream) == ("s0", 1, 3, "s1", [])
    assert (s1.server, s1.start_block, s1.end_block, s1.next_stage, s1.upstream) == (
        "s1",
        3,
        None,
        "",
        ["s0"],
    )
    assert s0.inflight == 4 * 3  # link_window × devices: every request any device may have open
    by_name = {d.name: d for d in s1.devices}
    assert by_name["dev1"].codec.up.quantize is not None and by_name["dev1"].codec.up.quantize.bits == 4
    assert by_name["dev2"].cut == 2 and by_name["dev2"].index == 2


@pytest.mark.parametrize("mode", ["sl", "sfl", "fedlora"])
def test_modes_without_a_codec_get_the_identity_once_in_the_plan(mode: str) -> None:
    topo = parse_topology(doc(mode))
    assert all(p.codec.is_identity for p in device_plans(topo))
    assert all(d.codec.is_identity for s in server_plans(topo) for d in s.devices)
    if mode == "fedlora":
        assert all(p.server == "" and p.train.max_inflight == 1 for p in device_plans(topo))


def test_a_plan_crosses_the_wire_as_itself() -> None:
    plan = device_plans(parse_topology(doc()))[1]
    env = decode(encode(plan, sender="coordinator", msg_id=3), WireLimits())
    assert isinstance(env.msg, DevicePlan) and env.msg == plan


def test_requests_declare_their_reply() -> None:
    assert Activations.REPLY is Gradients and EvalRequest.REPLY.__name__ == "EvalResult"
    assert RoundStart.REPLY.__name__ == "RoundDone" and DevicePlan.REPLY is Ack
    assert not hasattr(Metrics, "REPLY")  # progress is fire and forget


def test_a_handler_must_answer_with_the_declared_reply() -> None:
    with pytest.raises(TypeError, match=r"Activations is answered with Gradients; annotate '-> Gradients'"):

        class WrongReply(Actor):
            async def on_activations(self, msg: Activations, ctx: MsgContext) -> Ack:
                return Ack(of_msg_id=ctx.msg_id)

    with pytest.raises(TypeError, match="Metrics expects no reply"):

        class ReplyToProgress(Actor):
            async def on_metrics(self, msg: Metrics, ctx: MsgContext) -> Ack:
                return Ack(of_msg_id=ctx.msg_id)
