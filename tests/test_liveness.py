"""Liveness on the actor's clock: heartbeats, the silence watchdog, and offloaded work.

Liveness runs on ``ActorEnv.clock``: these tests move a ManualClock and order themselves with
events (asyncio and threading), so no assert depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import AsyncIterator

import pytest
import zmq
import zmq.asyncio

from sft_actors.actors.base import Actor
from sft_actors.actors.env import ActorEnv
from sft_actors.actors.handlers import MsgContext
from sft_actors.actors.testing import EchoServer, actor_env, serving, small_topology
from sft_actors.clock import ManualClock
from sft_actors.transport.sockets import SocketOptions, connect_dealer
from sft_actors.wire.envelope import Envelope, WireLimits, decode, encode
from sft_actors.wire.messages import EvalRequest, EvalResult, Heartbeat, Hello, Welcome
from sft_actors.wire.plans import EvalStats

pytestmark = pytest.mark.timeout(60)


class Coordinator(Actor):
    """Records the peers its watchdog reports lost."""

    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.lost: list[str] = []
        self.lost_event = asyncio.Event()

    async def on_peer_lost(self, peer: str) -> None:
        self.lost.append(peer)
        self.lost_event.set()


BEAT_S = 0.25  # binary-exact, so sums of intervals are exact too
SILENCE_S = 2.0
LIVENESS = {"heartbeat_interval_s": BEAT_S, "heartbeat_timeout_s": SILENCE_S}
LOOPS = 2  # clock sleepers of an actor without paced links: heartbeat loop and watchdog


@contextlib.asynccontextmanager
async def raw_peer(
    zmq_ctx: zmq.asyncio.Context, env: ActorEnv, actor: str, *, as_name: str = "dev0"
) -> AsyncIterator[zmq.asyncio.Socket]:
    """A bare DEALER that completes the handshake with ``actor`` as ``as_name``, then is
    silent unless the test sends on it."""
    raw = connect_dealer(zmq_ctx, await env.endpoints.resolve(actor), as_name, SocketOptions(linger_ms=0))
    try:
        hello = Hello(node=as_name, role="device", schema_hash=env.schema_hash)
        await raw.send_multipart(encode(hello, sender=as_name, msg_id=1))
        welcome = decode(await raw.recv_multipart(), env.limits)
        assert isinstance(welcome.msg, Welcome) and welcome.reply_to == 1
        yield raw
    finally:
        raw.close(linger=0)


@pytest.mark.asyncio
async def test_silent_peer_is_reported_lost(zmq_ctx: zmq.asyncio.Context) -> None:
    clock = ManualClock(start=50.0)
    topo = small_topology(devices=1, runtime=LIVENESS)
    with actor_env(topo, zmq_ctx) as system_env:
        env = dataclasses.replace(system_env, clock=clock)
        coord = Coordinator(topo.actor("coordinator"), env)
        async with serving(coord):
            await coord.ready()
            async with raw_peer(zmq_ctx, env, "coordinator"):  # it never answers heartbeats
                assert coord.peers == ["dev0"] and coord.link("dev0").last_seen == 50.0
                await clock.wait_for_sleepers(LOOPS)
                # Silent for exactly the timeout: not yet lost ("more than" the timeout).
                clock.advance(SILENCE_S)
                await clock.wait_for_sleepers(LOOPS)  # the watchdog has checked at t = 52.0
                assert coord.peers == ["dev0"] and coord.lost == []
                # The watchdog's next check (one period later) finds it silent too long.
                assert clock.next_deadline == 50.0 + SILENCE_S + min(BEAT_S, SILENCE_S / 4)
                clock.advance(BEAT_S)
                await coord.lost_event.wait()
                assert coord.lost == ["dev0"] and coord.peers == []


class GatedServer(EchoServer):
    """Offloads a function that blocks its worker thread until the test releases it."""

    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.started, self.release, self.finished = threading.Event(), threading.Event(), threading.Event()
        self.worker: int | None = None

    def blocking(self, n: int) -> int:
        self.worker = threading.get_ident()
        self.started.set()
        # The timeout only stops a broken test from leaking a stuck thread; it never passes one.
        self.release.wait(timeout=30)
        self.finished.set()
        return n * 2

    async def on_eval_request(self, msg: EvalRequest, ctx: MsgContext) -> EvalResult:
        doubled = await self.offload(self.blocking, msg.round)
        stats = EvalStats(task="lm", loss_sum=0.0, targets=doubled, correct=0, batches=1)
        return EvalResult(node=self.name, round=msg.round, stats=stats)


async def next_message(raw: zmq.asyncio.Socket, limits: WireLimits) -> Envelope:
    return decode(await raw.recv_multipart(), limits)


@pytest.mark.asyncio
async def test_offload_keeps_heartbeats_flowing(zmq_ctx: zmq.asyncio.Context) -> None:
    clock = ManualClock()
    topo = small_topology(devices=1, runtime=LIVENESS)
    with actor_env(topo, zmq_ctx) as system_env:
        server = GatedServer(topo.actor("server"), dataclasses.replace(system_env, clock=clock))
        coord = Coordinator(topo.actor("coordinator"), system_env)
        async with serving(coord, server):
            await server.ready()
            async with raw_peer(zmq_ctx, system_env, "server") as raw:
                await raw.send_multipart(encode(EvalRequest(round=21), sender="dev0", msg_id=7))
                await asyncio.to_thread(server.started.wait)  # the handler's function now blocks
                beats: list[int] = []
                for _ in range(3):
                    await clock.wait_for_sleepers(LOOPS)
                    clock.advance(BEAT_S)  # one heartbeat interval: exactly one beat per peer
                    env_ = await next_message(raw, system_env.limits)
                    assert isinstance(env_.msg, Heartbeat), env_.kind  # no reply while it blocks
                    beats.append(env_.msg.seq)
                assert beats == list(range(beats[0], beats[0] + 3))
                assert not server.finished.is_set() and server.worker != threading.get_ident()
                server.release.set()
                env_ = await next_message(raw, system_env.limits)
                while isinstance(env_.msg, Heartbeat):  # a beat sent before the first advance
                    env_ = await next_message(raw, system_env.limits)
                assert env_.reply_to == 7 and isinstance(env_.msg, EvalResult)
                assert env_.msg.stats.targets == 42  # the offloaded function's result
