"""The same conformance suite over inproc, ipc and tcp: ordering, big frames, cancellation,
close while sending, ROUTER_MANDATORY, and actor request/reply with a 64 MB tensor."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
import zmq
import zmq.asyncio

from sft_actors.actors.peers import PeerLink
from sft_actors.actors.testing import EchoServer, Idle, actor_env, serving, small_topology
from sft_actors.errors import UnknownPeer
from sft_actors.transport.endpoints import TRANSPORTS, Endpoints, Transport
from sft_actors.transport.sockets import SocketOptions, bind_router, connect_dealer
from sft_actors.wire.messages import Activations, Gradients
from sft_actors.wire.tensors import WireTensor

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio, pytest.mark.parametrize("transport", TRANSPORTS)]
OPTS = SocketOptions(linger_ms=0)


@contextlib.asynccontextmanager
async def pair(
    ctx: zmq.asyncio.Context, transport: Transport, tmp_path: Path
) -> AsyncIterator[tuple[zmq.asyncio.Socket, zmq.asyncio.Socket]]:
    """A ROUTER ("server") and a DEALER ("dev0") connected to it, closed on exit."""
    endpoints = Endpoints(small_topology(), transport, ipc_dir=tmp_path)
    router, bound = bind_router(ctx, endpoints.bind_address("server"), OPTS)
    endpoints.publish("server", bound)
    dealer = connect_dealer(ctx, await endpoints.resolve("server"), "dev0", OPTS)
    try:
        yield router, dealer
    finally:
        dealer.close(linger=0)
        router.close(linger=0)


async def test_ordering_both_ways(zmq_ctx: zmq.asyncio.Context, transport: Transport, tmp_path: Path) -> None:
    async with pair(zmq_ctx, transport, tmp_path) as (router, dealer):
        n = 2000
        for i in range(n):
            await dealer.send_multipart([b"h", i.to_bytes(4, "little")])
        got = [int.from_bytes((await router.recv_multipart())[2], "little") for _ in range(n)]
        assert got == list(range(n))
        for i in range(n):
            await router.send_multipart([b"dev0", i.to_bytes(4, "little")])
        back = [int.from_bytes((await dealer.recv_multipart())[0], "little") for _ in range(n)]
        assert back == list(range(n))


async def test_cancel_while_receiving_loses_nothing(
    zmq_ctx: zmq.asyncio.Context, transport: Transport, tmp_path: Path
) -> None:
    async with pair(zmq_ctx, transport, tmp_path) as (router, dealer):
        got: list[bytes] = []
        cancelled = 0
        for i in range(50):
            waiting = asyncio.ensure_future(router.recv_multipart())
            await asyncio.sleep(0)  # let it start waiting (or complete, if a message is queued)
            if waiting.cancel():
                cancelled += 1
                with contextlib.suppress(asyncio.CancelledError):
                    await waiting
            else:  # it completed first: the message is ours, not lost
                got.append((await waiting)[1])
            await dealer.send_multipart([str(i).encode()])
        while len(got) < 50:
            got.append((await router.recv_multipart())[1])
        assert got == [str(i).encode() for i in range(50)]
        assert cancelled > 0


async def test_close_while_sending(
    zmq_ctx: zmq.asyncio.Context, transport: Transport, tmp_path: Path
) -> None:
    big = bytes(4 << 20)
    async with pair(zmq_ctx, transport, tmp_path) as (router, dealer):
        dealer.setsockopt(zmq.SNDHWM, 2)
        started = asyncio.Event()

        async def flood() -> int:
            sent = 0
            with contextlib.suppress(zmq.ZMQError, asyncio.CancelledError):
                while True:
                    await dealer.send_multipart([big], copy=False)
                    sent += 1
                    started.set()
            return sent

        task = asyncio.ensure_future(flood())
        await started.wait()
        task.cancel()  # the pending send is abandoned, then the socket closes under it
        dealer.close(linger=0)
        assert await task >= 1
        # The router side is unaffected: it can still receive what arrived and close cleanly.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await router.recv_multipart()
    # zmq_ctx's teardown fails the test if anything is left open or term() hangs


async def test_router_mandatory_reports_unknown_peers(
    zmq_ctx: zmq.asyncio.Context, transport: Transport, tmp_path: Path
) -> None:
    async with pair(zmq_ctx, transport, tmp_path) as (router, dealer):
        await dealer.send_multipart([b"hi"])
        await router.recv_multipart()
        link = PeerLink(peer="ghost", socket=router, route=[b"ghost"], dialled=False, window=1)
        with pytest.raises(UnknownPeer, match="'ghost' is not connected"):
            await link.send([b"x"])


async def test_actor_round_trip_of_a_64mb_tensor(
    zmq_ctx: zmq.asyncio.Context, transport: Transport, tmp_path: Path
) -> None:
    topo = small_topology(devices=1)
    with actor_env(topo, zmq_ctx, transport, ipc_dir=str(tmp_path)) as env:
        server, dev = EchoServer(topo.actor("server"), env), Idle(topo.actor("dev0"), env)
        async with serving(Idle(topo.actor("coordinator"), env), server, dev):
            await dev.ready()
            x = torch.randn(16 << 20)  # 64 MiB of float32
            reply = await dev.call(
                "server",
                Activations(
                    device="dev0",
                    round=0,
                    step=0,
                    cut=1,
                    activations=WireTensor.from_torch(x),
                    labels=WireTensor.from_torch(torch.zeros(1)),
                    n_samples=1,
                    sent_at_ns=0,
                ),
            )
            assert isinstance(reply, Gradients)
            assert torch.equal(reply.grad.to_torch(), x)
