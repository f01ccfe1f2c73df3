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
from sft_actors.actors.budget import socket_options_unplanned
from sft_actors.actors.env import ActorEnv, topology_schema_hash, wire_limits
from sft_actors.actors.handlers import MsgContext
from sft_actors.actors.tasks import gather_owned
from sft_actors.errors import ActorFailed
from sft_actors.topology import Topology, parse_topology
from sft_actors.transport.endpoints import Endpoints, Transport
from sft_actors.transport.link import fitted_mbps
from sft_actors.wire.messages import (
    Activations,
    EvalRequest,
    EvalResult,
    Gradients,
    Metrics,
    RoundDone,
    RoundStart,
)
from sft_actors.wire.plans import EvalStats, RoundStats
from sft_actors.wire.tensors import WireTensor


class EchoServer(Actor):
    """Echoes activations back as gradients; an ``EvalRequest`` for a negative round raises in
    the handler (the caller gets a RemoteError); ``Metrics`` are recorded."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metrics_seen: list[tuple[str, Metrics]] = []
        self.evals_seen: list[tuple[str, int]] = []
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
        if msg.round < 0:
            raise ValueError(f"asked to fail: round {msg.round}")
        self.evals_seen.append((ctx.peer, msg.round))
        empty = EvalStats(task="lm", loss_sum=0.0, targets=0, correct=0, batches=0)
        return EvalResult(node=self.name, round=msg.round, stats=empty)

    async def on_metrics(self, msg: Metrics, ctx: MsgContext) -> None:
        self.metrics_seen.append((ctx.peer, msg))


class PingDevice(Actor):
    """On ``RoundStart`` sends ``steps_per_round`` small activations to each server, then answers."""

    payload_shape: tuple[int, ...] = (2, 4, 8)

    async def on_round_start(self, msg: RoundStart, ctx: MsgContext) -> RoundDone:
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
                if not torch.equal(reply.grad.to_torch(), tensor):
                    raise AssertionError("echo mismatch")
        stats = RoundStats(
            bytes_up=0,
            bytes_down=0,
            raw_up=0,
            raw_down=0,
            encode_ms=0.0,
            round_s=time.perf_counter() - t0,
            step_ms_median=0.0,
            targets=0,
        )
        return RoundDone(device=self.name, round=msg.round, n_samples=2, loss=0.0, stats=stats)


class CollectorCoordinator(Actor):
    """Runs ``[run.train] rounds`` rounds of RoundStart → RoundDone; the result is a summary."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.done: dict[int, set[str]] = {}

    async def run(self) -> dict[str, Any]:
        devices = [d.name for d in self.topology.devices]
        await self.wait_for_peers([a.name for a in self.topology.actors if a.name != self.name])
        for r in range(self.topology.run.train.rounds):
            replies = await gather_owned(*(self.call(d, RoundStart(round=r)) for d in devices))
            self.done[r] = {m.device for m in replies}
        return {"rounds": self.topology.run.train.rounds, "devices": sorted(devices)}


class ArrivalSink(Actor):
    """Records (arrival time, bytes) of every ``Activations``; ``all_in`` fires at ``expect``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arrivals: list[tuple[float, int]] = []
        self.all_in = asyncio.Event()
        self.expect = 0

    async def on_activations(self, msg: Activations, ctx: MsgContext) -> None:
        self.arrivals.append((self.clock.now(), ctx.nbytes))
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
    return parse_topology(doc, source="<test>", model_config=lambda _: None)


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
            sockets=socket_options_unplanned(topology),
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
