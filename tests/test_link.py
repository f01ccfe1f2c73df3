"""Link emulation on a manual clock: exact bookings and deliveries, latency pipelined, links
independent, wired into actors."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
import torch
import zmq.asyncio

from sft_actors.actors.peers import link_rate
from sft_actors.actors.testing import ArrivalSink, Idle, actor_env, serving, small_topology
from sft_actors.clock import ManualClock
from sft_actors.transport.link import LinkRate, PacedSender, Pacer, fitted_mbps
from sft_actors.wire.messages import Activations
from sft_actors.wire.tensors import WireTensor

pytestmark = pytest.mark.timeout(60)


def test_pacer_books_a_virtual_clock() -> None:
    clock = ManualClock(start=100.0)
    pacer = Pacer(LinkRate(rate_mbps=8.0, latency_s=0.01), clock, burst_s=0.0)  # 1 MB/s
    assert pacer.reserve(1000) == pytest.approx((100.0, 100.001, 100.011))
    assert pacer.reserve(1000) == pytest.approx((100.001, 100.002, 100.012))  # behind the first
    clock.advance_to(200.0)  # idle link, no bucket depth: no credit accumulates
    assert pacer.reserve(2000) == pytest.approx((200.0, 200.002, 200.012))
    unpaced = Pacer(LinkRate(latency_s=0.5), clock, burst_s=0.0)
    assert unpaced.reserve(10**9) == (200.0, 200.0, 200.5)
    bucket = Pacer(LinkRate(rate_mbps=8.0), clock, burst_s=0.005)
    clock.advance_to(300.0)
    assert bucket.reserve(1000)[0] == pytest.approx(299.995)  # a late sender may use 5 ms of credit
    assert bucket.reserve(1000)[0] == pytest.approx(299.996)  # …but never more than the rate allows


class Recorder:
    """A link's far end: the clock time and size of each delivery."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.times: list[float] = []
        self.sizes: list[int] = []

    async def __call__(self, frames: Sequence[Any]) -> None:
        self.times.append(self.clock.now())
        self.sizes.append(sum(len(f) for f in frames))


async def pump(sender: PacedSender, n: int, size: int, returned_at: list[float] | None = None) -> None:
    """Send ``n`` messages of ``size`` bytes, noting the clock time each ``send`` returned;
    without ``returned_at``, then wait until all were delivered."""
    payload = bytes(size)
    for _ in range(n):
        await sender.send([payload])
        if returned_at is not None:
            returned_at.append(sender.pacer.clock.now())
    if returned_at is None:
        await sender.drain()


@pytest.mark.asyncio
async def test_paced_schedule_is_exact() -> None:
    """50 × 100 kB at 40 Mb/s (20 ms each) + 5 ms latency, on a manual clock: every send returns
    when its transmission starts and every message arrives when it ends plus the latency."""
    clock = ManualClock(start=10.0)
    n, size, tx_s, latency_s = 50, 100_000, 0.02, 0.005
    rec, returned_at = Recorder(clock), []
    sender = PacedSender(LinkRate(rate_mbps=40.0, latency_s=latency_s), rec, clock=clock)
    assert sender.pacer.burst_s == 0.02  # the default bucket: an idle link may start 20 ms back
    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(sender.run())
        # One message more than measured keeps the runner asleep on the clock after the last
        # measured delivery (instead of waiting for work), so the loop can always wait for it.
        pumping = tg.create_task(pump(sender, n + 1, size, returned_at))
        while len(rec.times) < n:
            # Advance only once the pump (until its next start) and the runner (until its next
            # delivery) are asleep, so no booking or delivery sees a clock that ran ahead.
            await clock.wait_parked(pumping, runner)
            deadline = clock.next_deadline
            assert deadline is not None
            clock.advance_to(deadline)
        await pumping
        runner.cancel()
    # Transmissions start back to back from 9.98 (the bucket's 20 ms of credit), so the first
    # two sends return at once and each later one when its predecessor has left.
    starts = [9.98 + tx_s * i for i in range(n)]
    assert returned_at[:n] == pytest.approx([10.0, 10.0, *starts[2:]], abs=1e-9)
    assert rec.times == pytest.approx([10.0 + tx_s * i + latency_s for i in range(n)], abs=1e-9)
    assert rec.sizes == [size] * n
    assert measured_mbps(rec) == pytest.approx(40.0, rel=1e-9)


def measured_mbps(rec: Recorder) -> float:
    return fitted_mbps(list(zip(rec.times, rec.sizes, strict=True)))


@pytest.mark.asyncio
async def test_latency_is_pipelined_and_links_are_independent() -> None:
    clock = ManualClock()
    slow, fast = Recorder(clock), Recorder(clock)
    slow_link = PacedSender(LinkRate(rate_mbps=1.0, latency_s=0.0), slow, clock=clock)  # 100 kB = 0.8 s
    fast_link = PacedSender(LinkRate(latency_s=0.1), fast, clock=clock)
    async with asyncio.TaskGroup() as tg:
        runners = [tg.create_task(slow_link.run()), tg.create_task(fast_link.run())]
        slow_task = tg.create_task(pump(slow_link, 1, 100_000))
        fast_task = tg.create_task(pump(fast_link, 20, 10))
        await clock.wait_for_sleepers(2)  # each runner waits for its first delivery
        assert clock.deadlines == pytest.approx([0.1, 0.8])
        clock.advance_to(0.1)
        await fast_task
        # 20 messages with 100 ms one-way latency arrive together, not one after another, and
        # the slow link did not hold the fast one back.
        assert fast.times == [0.1] * 20
        assert slow.times == [] and not slow_task.done()
        clock.advance_to(0.8)
        await slow_task
        assert slow.times == [0.8]
        for r in runners:
            r.cancel()


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
    """A device actor paces its uplink on its env's clock: handshake and data ride the emulated
    link, and the deliveries fall exactly on the booked times (16 Mb/s, 10 ms one way)."""
    clock = ManualClock(start=100.0)
    topo = small_topology(devices=1, links={"dev0": {"uplink_mbps": 16.0, "rtt_ms": 20.0}})
    up = LinkRate(rate_mbps=16.0, latency_s=0.01)
    with actor_env(topo, zmq_ctx) as env:
        server, dev = (
            ArrivalSink(topo.actor("server"), env),
            Idle(topo.actor("dev0"), replace(env, clock=clock)),
        )
        async with serving(Idle(topo.actor("coordinator"), env), server, dev):
            await clock.wait_for_sleepers(2)  # HELLO to the server and to the coordinator, on the uplink
            assert clock.deadlines == pytest.approx([100.0 + up.latency_s] * 2, abs=1e-9)
            clock.advance_to(clock.deadlines[-1])
            await dev.ready()
            paced, coord_paced = dev.link("server").paced, dev.link("coordinator").paced
            assert paced is not None and coord_paced is not None
            assert paced.pacer is coord_paced.pacer and paced.pacer.clock is clock  # one radio, env's clock
            loops = [clock.now() + topo.run.runtime.heartbeat_interval_s] * 2  # heartbeat, watchdog
            msg = Activations(
                device="dev0",
                round=0,
                step=0,
                cut=1,
                activations=WireTensor.from_torch(torch.zeros(25_000)),  # 100 kB: 50 ms at 16 Mb/s
                labels=WireTensor.from_torch(torch.zeros(1)),
                n_samples=1,
                sent_at_ns=0,
            )
            server.expect = 2
            hello_bytes = paced.bytes_sent
            await dev.send("server", msg)  # starts 20 ms back (the idle link's bucket): returns at once
            nbytes = paced.bytes_sent - hello_bytes
            tx_s = up.serialisation_s(nbytes)
            start0 = clock.now() - paced.pacer.burst_s
            second = asyncio.ensure_future(dev.send("server", msg))
            await clock.wait_for_sleepers(4)  # + the second send and the delivery of the first
            start1, deliver0, *rest = clock.deadlines
            expected = [start0 + tx_s, start0 + tx_s + up.latency_s, *loops]
            assert [start1, deliver0, *rest] == pytest.approx(expected, abs=1e-9)
            clock.advance_to(start1)
            await second  # its transmission has begun
            clock.advance_to(deliver0)
            await clock.wait_for_sleepers(3)  # the runner waits for the second delivery
            deliver1, *rest = clock.deadlines
            assert [deliver1, *rest] == pytest.approx([start1 + tx_s + up.latency_s, *loops], abs=1e-9)
            clock.advance_to(deliver1)
            await server.all_in.wait()
    assert [n for _, n in server.arrivals] == [nbytes] * 2
    # The rate of the schedule the actor's link kept: back to back at 16 Mb/s.
    assert fitted_mbps([(deliver0, nbytes), (deliver1, nbytes)]) == pytest.approx(16.0, rel=1e-9)
