"""The base actor: handler tables, request/reply, remote errors, garbage, handshake, liveness."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import AsyncIterator

import msgpack
import pytest
import torch
import zmq
import zmq.asyncio

from sft_actors.actors.base import Actor, ActorState
from sft_actors.actors.env import ActorEnv
from sft_actors.actors.handlers import MsgContext
from sft_actors.actors.testing import EchoServer, actor_env, serving, small_topology
from sft_actors.clock import ManualClock
from sft_actors.errors import ActorFailed, PeerTimeout, RemoteError, SchemaMismatch
from sft_actors.transport.sockets import SocketOptions, connect_dealer
from sft_actors.wire.envelope import Envelope, WireLimits, decode, encode
from sft_actors.wire.messages import (
    Ack,
    Activations,
    Error,
    EvalRequest,
    EvalResult,
    Gradients,
    Heartbeat,
    Hello,
    Metrics,
    RoundStart,
    Shutdown,
    Welcome,
)
from sft_actors.wire.tensors import WireTensor

pytestmark = pytest.mark.timeout(60)


class Device(Actor):
    pass


class Coordinator(Actor):
    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.lost: list[str] = []
        self.lost_event = asyncio.Event()

    async def on_peer_lost(self, peer: str) -> None:
        self.lost.append(peer)
        self.lost_event.set()


ECHO = [0.0, 1.0, 2.0, 3.0]  # EchoServer's gradient for act(): the activations themselves


def act(n: int = 4) -> Activations:
    t = torch.arange(n, dtype=torch.float32)
    return Activations(
        device="dev0",
        round=0,
        step=0,
        cut=1,
        activations=WireTensor.from_torch(t),
        labels=WireTensor.from_torch(torch.zeros(1)),
        n_samples=1,
        sent_at_ns=0,
    )


# --- handler tables -------------------------------------------------------------------------


def test_handlers_are_checked_when_the_class_is_built() -> None:
    with pytest.raises(TypeError, match="annotate 'msg'"):

        class NoAnnotation(Actor):
            async def on_x(self, msg, ctx: MsgContext) -> None:  # type: ignore[no-untyped-def]
                pass

    with pytest.raises(TypeError, match="both handle ROUND_START"):

        class Duplicate(Actor):
            async def on_a(self, msg: RoundStart, ctx: MsgContext) -> None:
                pass

            async def on_b(self, msg: RoundStart, ctx: MsgContext) -> None:
                pass

    with pytest.raises(TypeError, match="handled by the runtime"):

        class Reserved(Actor):
            async def on_hb(self, msg: Heartbeat, ctx: MsgContext) -> None:
                pass

    with pytest.raises(TypeError, match="async def"):

        class Sync(Actor):
            def on_sync(self, msg: RoundStart, ctx: MsgContext) -> None:
                pass

    with pytest.raises(TypeError, match="returns"):

        class BadReturn(Actor):
            async def on_r(self, msg: RoundStart, ctx: MsgContext) -> int:
                return 1

    with pytest.raises(TypeError, match="not a wire message class"):

        class NotAMessage(Actor):
            async def on_r(self, msg: int, ctx: MsgContext) -> None:
                pass

    class Base(Actor):
        async def on_round(self, msg: RoundStart, ctx: MsgContext) -> None:
            pass

    class Override(Base):
        async def on_round(self, msg: RoundStart, ctx: MsgContext) -> Ack | None:
            return None

    with pytest.raises(TypeError, match="both handle"):

        class Conflict(Base):
            async def on_other(self, msg: RoundStart, ctx: MsgContext) -> None:
                pass

    assert Override._handlers[RoundStart.KIND].owner == "Override"
    assert EchoServer._handlers[Activations.KIND].method == "on_activations"


# --- request / reply ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_call_reply_remote_error_and_keeps_serving(zmq_ctx: zmq.asyncio.Context) -> None:
    topo = small_topology(devices=1)
    with actor_env(topo, zmq_ctx) as env:
        server, coord, dev = (
            EchoServer(topo.actor("server"), env),
            Coordinator(topo.actor("coordinator"), env),
            Device(topo.actor("dev0"), env),
        )
        async with serving(coord, server, dev):
            await dev.ready()
            reply = await dev.call("server", act())
            assert isinstance(reply, Gradients) and reply.grad.to_torch().tolist() == [0.0, 1.0, 2.0, 3.0]
            with pytest.raises(RemoteError) as info:
                await dev.call("server", Metrics(node="dev0", round=0, values={"fail": "boom"}))
            assert info.value.remote_type == "ValueError" and "asked to fail: boom" in str(info.value)
            assert info.value.peer == "server"
            with pytest.raises(RemoteError) as info:
                await dev.call("server", RoundStart(round=1))
            assert info.value.remote_type == "UnknownMessageKind"
            ok = await dev.call("server", Metrics(node="dev0", round=0, values={"x": 1.0}))
            assert isinstance(ok, Ack) and server.metrics_seen == [("dev0", {"x": 1.0})]
            # The addressed side can call back over its ROUTER.
            with pytest.raises(RemoteError, match="UnknownMessageKind"):
                await server.call("dev0", EvalRequest(round=0, split="val"))
            await dev.broadcast(Metrics(node="dev0", round=1, values={"y": 2.0}), ["server"])
            evaluated = await dev.call("server", EvalRequest(round=2, split="val"))
            assert isinstance(evaluated, EvalResult) and evaluated.round == 2
            assert evaluated.values == {"peer": "dev0", "split": "val"}
            assert server.metrics_seen[-1] == ("dev0", {"y": 2.0})  # in order, before the call's reply


class SlowServer(EchoServer):
    handler_concurrency = 16  # every arriving request enters a handler: arrivals are countable

    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.gate = asyncio.Event()
        self.arrived = 0
        self.window_full = asyncio.Event()

    async def on_eval_request(self, msg: EvalRequest, ctx: MsgContext) -> EvalResult:
        gate = self.gate
        self.arrived += 1
        if self.arrived >= self.settings.link_window:
            self.window_full.set()
        await gate.wait()
        return EvalResult(node=self.name, round=msg.round, values={})


@pytest.mark.asyncio
async def test_timeout_and_credit_window(zmq_ctx: zmq.asyncio.Context) -> None:
    topo = small_topology(devices=1, runtime={"link_window": 3})
    with actor_env(topo, zmq_ctx) as env:
        server, dev = SlowServer(topo.actor("server"), env), Device(topo.actor("dev0"), env)
        coord = Coordinator(topo.actor("coordinator"), env)
        async with serving(coord, server, dev):
            await dev.ready()
            with pytest.raises(PeerTimeout, match=r"did not reply to EvalRequest within 0\.1s"):
                await dev.call("server", EvalRequest(round=0, split="val"), timeout_s=0.1)
            assert dev._pending == {}  # the credit came back with the timeout
            server.gate.set()  # the late reply is dropped
            server.gate, server.arrived = asyncio.Event(), 0
            calls = [
                asyncio.ensure_future(dev.call("server", EvalRequest(round=i, split="v"))) for i in range(10)
            ]
            await server.window_full.wait()
            for _ in range(50):
                await asyncio.sleep(0)  # give any window-violating request a chance to arrive
            assert len(dev._pending) == 3 and server.arrived == 3
            server.gate.set()
            replies = await asyncio.gather(*calls)
            assert sorted(r.round for r in replies) == list(range(10))  # type: ignore[attr-defined]


# --- garbage from a peer --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_garbage_gets_error_frames_and_others_are_served(zmq_ctx: zmq.asyncio.Context) -> None:
    topo = small_topology(devices=2, runtime={"max_message_mb": 1.0})
    with actor_env(topo, zmq_ctx) as env:
        server, dev0 = EchoServer(topo.actor("server"), env), Device(topo.actor("dev0"), env)
        coord = Coordinator(topo.actor("coordinator"), env)
        async with serving(coord, server, dev0):
            await dev0.ready()
            raw = connect_dealer(
                zmq_ctx, await env.endpoints.resolve("server"), "dev1", SocketOptions(linger_ms=0)
            )
            try:

                async def answer(frames: list[bytes]) -> Error:
                    await raw.send_multipart(frames)
                    env_ = decode(await raw.recv_multipart(), env.limits)
                    assert isinstance(env_.msg, Error)
                    return env_.msg

                assert (await answer([b"\xc1not msgpack"])).code == "MalformedFrame"
                header = msgpack.unpackb(encode(RoundStart(round=0), sender="dev1", msg_id=1)[0])
                header["k"] = 99
                assert (await answer([msgpack.packb(header)])).code == "UnknownMessageKind"
                header["k"], header["v"] = int(RoundStart.KIND), [9, 0]
                assert (await answer([msgpack.packb(header)])).code == "VersionMismatch"
                assert [(p, type(e).__name__) for p, e in server.refused] == [("dev1", "VersionMismatch")]
                big = encode(act(400_000), sender="dev1", msg_id=2)
                assert (await answer([bytes(f) for f in big])).code == "FrameTooLarge"
                # Well-formed, but before HELLO.
                assert (await answer(encode(act(), sender="dev1", msg_id=3))).code == "ProtocolError"
                echoed = await dev0.call("server", act())  # still serving others
                assert isinstance(echoed, Gradients) and echoed.grad.to_torch().tolist() == ECHO
                assert server.state is ActorState.READY
            finally:
                raw.close(linger=0)


# --- handshake ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_schema_mismatch_is_refused_on_both_sides(zmq_ctx: zmq.asyncio.Context) -> None:
    ours, theirs = small_topology(devices=1), small_topology(devices=1, lora_rank=16)
    with actor_env(ours, zmq_ctx) as env, actor_env(theirs, zmq_ctx, endpoints=env.endpoints) as other_env:
        server, coord = EchoServer(ours.actor("server"), env), Coordinator(ours.actor("coordinator"), env)
        stranger = Device(theirs.actor("dev0"), other_env)
        async with serving(coord, server):
            await server.ready()
            async with serving(stranger):
                with pytest.raises(ActorFailed, match="SchemaMismatch"):
                    await stranger.ready()
            assert isinstance(stranger.error, SchemaMismatch)
            assert "refused dev0's handshake" in str(stranger.error)
            assert "start both from the same topology file" in str(stranger.error)
            assert [p for p, _ in coord.refused] == ["dev0"]
            assert isinstance(coord.refused[0][1], SchemaMismatch)


# --- liveness -------------------------------------------------------------------------------
# Liveness runs on the actor's clock (ActorEnv.clock): these tests move a ManualClock and
# order themselves with events, so no assert depends on how fast the machine is.
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
        return EvalResult(node=self.name, round=msg.round, values={"doubled": doubled})


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
                await raw.send_multipart(encode(EvalRequest(round=21, split="val"), sender="dev0", msg_id=7))
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
                assert env_.msg.values == {"doubled": 42}


# --- lifecycle ------------------------------------------------------------------------------


class DiesBeforeReady(Actor):
    cleaned: list[BaseException | None]

    async def on_start(self) -> None:
        raise RuntimeError("no GPU here")

    async def cleanup(self, exc: BaseException | None) -> None:
        DiesBeforeReady.cleaned = [exc]


@pytest.mark.asyncio
async def test_failure_before_ready_reaches_the_owner(zmq_ctx: zmq.asyncio.Context) -> None:
    topo = small_topology(devices=1)
    with actor_env(topo, zmq_ctx) as env:
        coord, server = Coordinator(topo.actor("coordinator"), env), EchoServer(topo.actor("server"), env)
        dead = DiesBeforeReady(topo.actor("dev0"), env)
        async with serving(coord, server, dead):
            with pytest.raises(ActorFailed, match="no GPU here"):
                await dead.ready()
            assert dead.state is ActorState.FAILED
            assert isinstance(DiesBeforeReady.cleaned[0], RuntimeError)
            await server.ready()
            # The coordinator learns the device left only through liveness, never by hanging.
            assert server.state is ActorState.READY


@pytest.mark.asyncio
async def test_shutdown_only_from_the_coordinator(zmq_ctx: zmq.asyncio.Context) -> None:
    topo = small_topology(devices=1)
    with actor_env(topo, zmq_ctx) as env:
        coord, server = Coordinator(topo.actor("coordinator"), env), EchoServer(topo.actor("server"), env)
        dev = Device(topo.actor("dev0"), env)
        async with serving(coord, server, dev):
            await dev.ready()
            await dev.send("server", Shutdown(reason="not yours"))
            echoed = await dev.call("server", act())  # the server ignored the SHUTDOWN and still serves
            assert isinstance(echoed, Gradients) and echoed.grad.to_torch().tolist() == ECHO
            coord.stop_run({"done": True})
            await asyncio.wait_for(asyncio.gather(*(a._stop.wait() for a in (server, dev))), 5)
        assert {a.state for a in (coord, server, dev)} == {ActorState.STOPPED}
        assert coord.result == {"done": True}
