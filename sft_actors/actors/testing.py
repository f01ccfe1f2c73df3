"""Small actors for tests, benchmarks and smoke runs of the runtime (no model needed).

``EchoServer`` answers ``Activations`` with the same tensor as ``Gradients`` and pings with
``EvalResult``; ``PingDevice`` runs ``steps_per_round`` request/replies against every server
when a round starts; ``CollectorCoordinator`` starts the rounds, collects ``RoundDone`` and
finishes the run with a summary. Plug them in with ``TEST_ROLES`` (or
``--role-factory coordinator=sft_actors.actors.testing:CollectorCoordinator``, …).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import zmq.asyncio

from sft_actors.actors.base import Actor
from sft_actors.actors.env import ActorEnv, topology_schema_hash, wire_limits
from sft_actors.actors.handlers import MsgContext
from sft_actors.errors import ActorFailed
from sft_actors.topology import Topology, parse_topology
from sft_actors.transport.endpoints import Endpoints, Transport
from sft_actors.transport.link import fitted_mbps
from sft_actors.wire.messages import (
    Ack,
    Activations,
    EvalRequest,
    EvalResult,
    Gradients,
    Metrics,
    RoundDone,
    RoundStart,
)
from sft_actors.wire.tensors import WireTensor


class EchoServer(Actor):
    """Echoes activations back as gradients; ``Metrics`` with ``fail`` set raises in the handler."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metrics_seen: list[tuple[str, dict[str, Any]]] = []
        self.activations_seen = 0

    async def on_activations(self, msg: Activations, ctx: MsgContext) -> Gradients:
        self.activations_seen += 1
        return Gradients(
            device=msg.device,
            round=msg.round,
            step=msg.step,
            grad=msg.activations,
            loss=0.0,
            n_tokens=msg.n_samples,
        )

    async def on_eval_request(self, msg: EvalRequest, ctx: MsgContext) -> EvalResult:
        return EvalResult(node=self.name, round=msg.round, values={"peer": ctx.peer, "split": msg.split})

    async def on_metrics(self, msg: Metrics, ctx: MsgContext) -> Ack:
        if "fail" in msg.values:
            raise ValueError(f"asked to fail: {msg.values['fail']}")
        self.metrics_seen.append((ctx.peer, dict(msg.values)))
        return Ack(of_msg_id=ctx.msg_id)


class PingDevice(Actor):
    """On ``RoundStart`` sends ``steps_per_round`` small activations to each server, then reports."""

    payload_shape: tuple[int, ...] = (2, 4, 8)

    async def on_round_start(self, msg: RoundStart, ctx: MsgContext) -> None:
        t0 = time.perf_counter()
        tensor = torch.full(self.payload_shape, float(msg.round))
        for server in (s.name for s in self.topology.servers):
            for step in range(self.topology.run.train.steps_per_round):
                reply = await self.call(
                    server,
                    Activations(
                        device=self.name,
                        round=msg.round,
                        step=step,
                        cut=self.spec.cut or 0,
                        activations=WireTensor.from_torch(tensor),
                        labels=WireTensor.from_torch(torch.zeros(2)),
                        n_samples=2,
                        sent_at_ns=time.time_ns(),
                    ),
                )
                assert isinstance(reply, Gradients)
                if not torch.equal(reply.grad.to_torch(), tensor):
                    raise AssertionError("echo mismatch")
        await self.send(
            ctx.peer,
            RoundDone(
                device=self.name,
                round=msg.round,
                n_samples=2,
                loss=0.0,
                metrics={"round_s": time.perf_counter() - t0},
            ),
        )


class CollectorCoordinator(Actor):
    """Runs ``[run.train] rounds`` rounds of RoundStart → RoundDone; the result is a summary."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.done: dict[int, set[str]] = {}
        self._round_done = asyncio.Event()

    async def on_round_done(self, msg: RoundDone, ctx: MsgContext) -> None:
        self.done.setdefault(msg.round, set()).add(msg.device)
        self._round_done.set()

    async def run(self) -> dict[str, Any]:
        devices = [d.name for d in self.topology.devices]
        await self.wait_for_peers([a.name for a in self.topology.actors if a.name != self.name])
        for r in range(self.topology.run.train.rounds):
            await self.broadcast(RoundStart(round=r), devices)
            while self.done.get(r, set()) != set(devices):
                self._round_done.clear()
                await self._round_done.wait()
        return {"rounds": self.topology.run.train.rounds, "devices": sorted(devices)}


class ArrivalSink(Actor):
    """Records (arrival time, bytes) of every ``Activations``; ``all_in`` fires at ``expect``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arrivals: list[tuple[float, int]] = []
        self.all_in = asyncio.Event()
        self.expect = 0

    async def on_activations(self, msg: Activations, ctx: MsgContext) -> None:
        self.arrivals.append((time.monotonic(), ctx.nbytes))
        if len(self.arrivals) >= self.expect:
            self.all_in.set()

    def measured_mbps(self) -> float:
        """Receive rate fitted over all arrivals (see ``transport.link.fitted_mbps``)."""
        return fitted_mbps(self.arrivals)


class Idle(Actor):
    """Connects, answers liveness, handles nothing: a peer that scripts drive directly."""


TEST_ROLES: dict[str, Any] = {"coordinator": CollectorCoordinator, "server": EchoServer, "device": PingDevice}
TEST_ROLE_REFS: dict[str, str] = {role: f"{__name__}:{cls.__name__}" for role, cls in TEST_ROLES.items()}


# --- helpers for tests that drive actors directly ---------------------------------------------


def small_topology(
    *,
    devices: int = 2,
    runtime: dict[str, Any] | None = None,
    links: dict[str, dict[str, float]] | None = None,
    lora_rank: int = 4,
    port: int | None = 0,
) -> Topology:
    """An in-memory topology: coordinator, server, ``devices`` devices (cuts 1, 2, 1, 2, …)."""
    rt = {
        "heartbeat_interval_s": 0.2,
        "heartbeat_timeout_s": 2.0,
        "connect_timeout_s": 10.0,
        "request_timeout_s": 10.0,
        "drain_timeout_s": 2.0,
        **(runtime or {}),
    }
    actors: list[dict[str, Any]] = [
        {"name": "coordinator", "role": "coordinator", "port": port},
        {"name": "server", "role": "server", "port": port},
    ]
    for i in range(devices):
        dev: dict[str, Any] = {"name": f"dev{i}", "role": "device", "cut": 1 + i % 2}
        if links and f"dev{i}" in links:
            dev["link"] = links[f"dev{i}"]
        actors.append(dev)
    if port is None:
        for a in actors[:2]:
            del a["port"]
    doc = {
        "run": {"name": "test", "model": "llama-tiny", "runtime": rt, "lora": {"rank": lora_rank}},
        "actors": actors,
    }
    return parse_topology(doc, source="<test>", num_blocks=lambda _: None)


@contextlib.contextmanager
def actor_env(
    topology: Topology,
    ctx: zmq.asyncio.Context,
    transport: Transport = "inproc",
    *,
    ipc_dir: str | None = None,
    endpoints: Endpoints | None = None,
) -> Iterator[ActorEnv]:
    """An :class:`ActorEnv` whose offload pool is shut down on exit (share ``endpoints`` between
    envs of differently configured topologies to make them meet)."""
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="sft-test-offload") as pool:
        yield ActorEnv(
            topology=topology,
            ctx=ctx,
            endpoints=endpoints or Endpoints(topology, transport, ipc_dir=ipc_dir),
            executor=pool,
            limits=wire_limits(topology),
            schema_hash=topology_schema_hash(topology),
        )


@contextlib.asynccontextmanager
async def serving(*actors: Actor) -> AsyncIterator[None]:
    """Serve ``actors`` for the body of the block (ready on entry, stopped on exit).

    Start-up failures are left on each actor (``state``, ``error``); ``ready()`` raises them.
    """
    async with asyncio.TaskGroup() as tg:
        for a in actors:
            tg.create_task(_serve_quietly(a))
        try:
            yield
        finally:
            for a in actors:
                a.stop("test finished")


async def _serve_quietly(actor: Actor) -> None:
    with contextlib.suppress(ActorFailed):
        await actor.serve()
