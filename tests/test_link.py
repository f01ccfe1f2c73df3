"""Link emulation: rate within 5 %, latency pipelined, links independent, wired into actors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import pytest
import torch
import zmq.asyncio

from sft_actors.actors.peers import link_rate
from sft_actors.actors.testing import ArrivalSink, Idle, actor_env, serving, small_topology
from sft_actors.transport.link import LinkRate, PacedSender, Pacer, fitted_mbps
from sft_actors.wire.messages import Activations
from sft_actors.wire.tensors import WireTensor

pytestmark = pytest.mark.timeout(60)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_pacer_books_a_virtual_clock() -> None:
    clock = Clock()
    pacer = Pacer(LinkRate(rate_mbps=8.0, latency_s=0.01), clock, burst_s=0.0)  # 1 MB/s
    assert pacer.reserve(1000) == pytest.approx((100.0, 100.001, 100.011))
    assert pacer.reserve(1000) == pytest.approx((100.001, 100.002, 100.012))  # behind the first
    clock.now = 200.0  # idle link, no bucket depth: no credit accumulates
    assert pacer.reserve(2000) == pytest.approx((200.0, 200.002, 200.012))
    unpaced = Pacer(LinkRate(latency_s=0.5), clock, burst_s=0.0)
    assert unpaced.reserve(10**9) == (200.0, 200.0, 200.5)
    bucket = Pacer(LinkRate(rate_mbps=8.0), clock, burst_s=0.005)
    clock.now = 300.0
    assert bucket.reserve(1000)[0] == pytest.approx(299.995)  # a late sender may use 5 ms of credit
    assert bucket.reserve(1000)[0] == pytest.approx(299.996)  # …but never more than the rate allows


class Recorder:
    def __init__(self) -> None:
        self.times: list[float] = []
        self.sizes: list[int] = []

    async def __call__(self, frames: Sequence[Any]) -> None:
        self.times.append(time.monotonic())
        self.sizes.append(sum(len(f) for f in frames))


async def pump(sender: PacedSender, n: int, size: int) -> None:
    payload = bytes(size)
    for _ in range(n):
        await sender.send([payload])
    await sender.drain()


def measured_mbps(rec: Recorder) -> float:
    return fitted_mbps(list(zip(rec.times, rec.sizes, strict=True)))


@pytest.mark.asyncio
async def test_paced_throughput_within_5_percent() -> None:
    rec = Recorder()
    sender = PacedSender(LinkRate(rate_mbps=40.0, latency_s=0.005), rec)
    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(sender.run())
        await pump(sender, 50, 100_000)  # 5 MB at 5 MB/s: one second
        runner.cancel()
    assert measured_mbps(rec) == pytest.approx(40.0, rel=0.05)


@pytest.mark.asyncio
async def test_latency_is_pipelined_and_links_are_independent() -> None:
    slow, fast = Recorder(), Recorder()
    slow_link = PacedSender(LinkRate(rate_mbps=1.0, latency_s=0.0), slow)  # 100 kB = 0.8 s
    fast_link = PacedSender(LinkRate(latency_s=0.1), fast)
    async with asyncio.TaskGroup() as tg:
        runners = [tg.create_task(slow_link.run()), tg.create_task(fast_link.run())]
        slow_task = tg.create_task(pump(slow_link, 1, 100_000))
        t0 = time.monotonic()
        await pump(fast_link, 20, 10)
        fast_done = time.monotonic() - t0
        assert not slow_task.done()  # the slow link did not hold the fast one back
        await slow_task
        for r in runners:
            r.cancel()
    # 20 messages with 100 ms one-way latency each arrive together, not one after another.
    assert 0.1 <= fast_done < 0.5
    assert fast.times[-1] - fast.times[0] < 0.05


def test_link_rate_follows_device_profiles() -> None:
    topo = small_topology(
        devices=2, links={"dev0": {"uplink_mbps": 10.0, "downlink_mbps": 20.0, "rtt_ms": 30.0}}
    )
    up = link_rate(topo, "dev0", "server")
    down = link_rate(topo, "server", "dev0")
    assert up == LinkRate(rate_mbps=10.0, latency_s=0.015)
    assert down == LinkRate(rate_mbps=20.0, latency_s=0.015)
    assert link_rate(topo, "dev1", "server") is None and link_rate(topo, "server", "coordinator") is None


@pytest.mark.asyncio
async def test_device_uplink_is_paced_end_to_end(zmq_ctx: zmq.asyncio.Context) -> None:
    topo = small_topology(devices=1, links={"dev0": {"uplink_mbps": 16.0, "rtt_ms": 20.0}})
    with actor_env(topo, zmq_ctx) as env:
        server, dev = ArrivalSink(topo.actor("server"), env), Idle(topo.actor("dev0"), env)
        async with serving(Idle(topo.actor("coordinator"), env), server, dev):
            await dev.ready()
            x = WireTensor.from_torch(torch.zeros(25_000))  # 100 kB: 50 ms at 16 Mb/s
            msg = Activations(
                device="dev0",
                round=0,
                step=0,
                cut=1,
                activations=x,
                labels=WireTensor.from_torch(torch.zeros(1)),
                n_samples=1,
                sent_at_ns=0,
            )
            server.expect = 16
            t0 = time.monotonic()
            for _ in range(server.expect):
                await dev.send("server", msg)
            await server.all_in.wait()
    first = server.arrivals[0][0] - t0
    assert first >= 0.05 + 0.01 - 0.02 - 0.005  # serialisation (less bucket credit) + one-way latency
    assert server.measured_mbps() == pytest.approx(16.0, rel=0.05)
