"""The base actor: handler tables, request/reply, remote errors, garbage, handshake, lifecycle
(liveness on a manual clock: test_liveness.py)."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import torch
import zmq
import zmq.asyncio

from sft_actors.actors.base import Actor, ActorState
from sft_actors.actors.handlers import MsgContext
from sft_actors.actors.tasks import first_error, task_group
from sft_actors.actors.testing import EchoServer, actor_env, serving, small_topology
from sft_actors.errors import ActorFailed, PeerTimeout, ProtocolViolation, RemoteError, SchemaMismatch
from sft_actors.transport.sockets import SocketOptions, connect_dealer
from sft_actors.wire.envelope import decode, encode
from sft_actors.wire.messages import (
    Ack,
    Activations,
    Error,
    EvalRequest,
    EvalResult,
    Gradients,
    Heartbeat,
    Metrics,
    RoundDone,
    RoundStart,
    Shutdown,
)
from sft_actors.wire.plans import EvalStats
from sft_actors.wire.tensors import WireTensor

pytestmark = pytest.mark.timeout(60)


class Device(Actor):
    pass


class Coordinator(Actor):
    pass


EMPTY_EVAL = EvalStats(task="lm", loss_sum=0.0, targets=0, correct=0, batches=0)
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
        async def on_round(self, msg: RoundStart, ctx: MsgContext) -> RoundDone | None:
            return None

    with pytest.raises(TypeError, match="both handle"):

        class Conflict(Base):
            async def on_other(self, msg: RoundStart, ctx: MsgContext) -> None:
                pass

    with pytest.raises(TypeError, match="RoundStart is answered with RoundDone"):

        class WrongReply(Actor):
            async def on_r(self, msg: RoundStart, ctx: MsgContext) -> Ack:
                return Ack(of_msg_id=ctx.msg_id)

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
                await dev.call("server", EvalRequest(round=-1))  # EchoServer's handler raises
            assert info.value.remote_type == "ValueError" and "asked to fail: round -1" in str(info.value)
            assert info.value.peer == "server"
            with pytest.raises(RemoteError) as info:
                await dev.call("server", RoundStart(round=1))
            assert info.value.remote_type == "UnknownMessageKind"
            # The addressed side can call back over its ROUTER.
            with pytest.raises(RemoteError, match="UnknownMessageKind"):
                await server.call("dev0", EvalRequest(round=0))
            progress = Metrics(node="dev0", round=1, step_loss=2.5, wire_bytes=10, raw_bytes=40)
            await dev.broadcast(progress, ["server"])
            evaluated = await dev.call("server", EvalRequest(round=2))
            assert isinstance(evaluated, EvalResult) and evaluated.round == 2 and evaluated.stats.batches == 0
            assert server.evals_seen == [("dev0", 2)]
            assert server.metrics_seen == [("dev0", progress)]  # in order, before the call's reply


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
        return EvalResult(node=self.name, round=msg.round, stats=EMPTY_EVAL)


@pytest.mark.asyncio
async def test_timeout_and_credit_window(zmq_ctx: zmq.asyncio.Context) -> None:
    topo = small_topology(devices=1, runtime={"link_window": 3})
    with actor_env(topo, zmq_ctx) as env:
        server, dev = SlowServer(topo.actor("server"), env), Device(topo.actor("dev0"), env)
        coord = Coordinator(topo.actor("coordinator"), env)
        async with serving(coord, server, dev):
            await dev.ready()
            with pytest.raises(PeerTimeout, match=r"did not reply to EvalRequest within 0\.1s"):
                await dev.call("server", EvalRequest(round=0), timeout_s=0.1)
            assert dev._pending == {}  # the credit came back with the timeout
            server.gate.set()  # the late reply is dropped
            server.gate, server.arrived = asyncio.Event(), 0
            calls = [asyncio.ensure_future(dev.call("server", EvalRequest(round=i))) for i in range(10)]
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
                assert (await answer(encode(act(), sender="dev1", msg_id=3))).code == "NotWelcomed"
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


class FailingRoundDevice(Actor):
    """A round handler whose child task fails after the TaskGroup's body ended (as a device's
    last micro-batch refused by the server): the error must reach the caller as ERROR."""

    async def on_round_start(self, msg: RoundStart, ctx: MsgContext) -> RoundDone:
        async def refused_later() -> None:
            # The body below never awaits, so this child first runs (and fails) only once the
            # body has ended and the group is waiting to exit: no timing involved.
            raise ProtocolViolation(f"micro-batch of round {msg.round} refused")

        try:
            async with task_group() as tg:
                tg.create_task(refused_later())
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        raise AssertionError("the child failed")


@pytest.mark.asyncio
async def test_a_round_handler_whose_task_group_fails_answers_error(zmq_ctx: zmq.asyncio.Context) -> None:
    """Python 3.11's TaskGroup leaves its cancel request on the handler's task when a child
    fails after the body ended; the handler then looked cancelled and never answered (the
    coordinator hung until round_timeout_s). Each failing round answers ERROR, and the device
    keeps serving."""
    topo = small_topology(devices=1)
    with actor_env(topo, zmq_ctx) as env:
        server, coord, dev = (
            EchoServer(topo.actor("server"), env),
            Coordinator(topo.actor("coordinator"), env),
            FailingRoundDevice(topo.actor("dev0"), env),
        )
        async with serving(coord, server, dev):
            await dev.ready()
            await coord.wait_for_peers(["dev0"])
            for r in (1, 2, 3):
                with pytest.raises(RemoteError) as info:
                    await coord.call("dev0", RoundStart(round=r), timeout_s=10)
                assert info.value.remote_type == "ProtocolViolation"
                assert f"round {r} refused" in info.value.remote_message
