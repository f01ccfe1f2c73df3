"""The coordinator's state and the requests it makes of servers and devices.

:class:`CoordinatorBase` holds what the coordinator knows (plans, membership, summary, the run's
durable store) and the two ways it calls out: to every server (a lost server aborts the round:
:class:`~sft_actors.errors.ServerLost`) and to a set of devices (a device that fails is dropped
and counted, never fatal). Evaluation, rounds and the run's lifecycle build on it
(``coordinator_eval``, ``coordinator_rounds``, ``coordinator``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from tqdm import tqdm

from sft_actors.actors.base import Actor
from sft_actors.actors.durability import Durability, deterministic
from sft_actors.actors.env import ActorEnv
from sft_actors.actors.membership import Membership
from sft_actors.actors.peers import LinkState
from sft_actors.actors.tasks import gather_owned
from sft_actors.errors import PeerTimeout, RuntimeFault, ServerLost, SftError
from sft_actors.plan.assign import device_plans, server_plans
from sft_actors.topology import ActorSpec
from sft_actors.train import modes
from sft_actors.train.aggregate import block_of
from sft_actors.train.claims import check_adapters_up
from sft_actors.train.summary import RunSummary
from sft_actors.wire import (
    AdaptersRequest,
    AdaptersUp,
    DevicePlan,
)


class CoordinatorBase(Actor):
    def __init__(self, spec: ActorSpec, env: ActorEnv) -> None:
        super().__init__(spec, env)
        run = self.topology.run
        self.train = run.train
        self.devices = [d.name for d in self.topology.devices]
        # The one place a run's configuration becomes what each actor does.
        self._device_plans: dict[str, DevicePlan] = {p.device: p for p in device_plans(self.topology)}
        # fedlora trains whole models on the devices: a server in the file takes no part.
        whole = modes.whole_model_on_device(run.train.mode)
        self._server_plans = [] if whole else server_plans(self.topology)
        self.servers = [p.server for p in self._server_plans]
        self._cuts = {d: p.cut for d, p in self._device_plans.items()}
        self.summary = RunSummary(
            name=run.name, mode=run.train.mode, model=run.model, devices={} if whole else dict(self._cuts)
        )
        self.summary.deterministic, self.summary.nondeterminism = deterministic(self.topology)
        self.members = Membership(devices=self.devices, quorum=run.train.quorum(len(self.devices)))
        self.store = Durability(self.topology, env, self.summary)
        self._bar: tqdm[Any] | None = None
        self._bar_wire = self._bar_raw = 0  # bytes on the wire / raw, this round (progress bar)
        self._running = False
        self._ended = False
        self._server_down = asyncio.Event()  # set while a server is lost mid-run
        self._recovering = False  # restoring servers and devices from the last checkpoint
        self._planned = False  # the servers have their plans (the run has started)
        self._relay_from: str | None = None  # sl: the device whose adapters the next one starts from
        self._refused: dict[str, str] = {}  # device → why its last admission failed
        self._admitting: dict[str, asyncio.Task[None]] = {}
        self._t0 = 0.0
        # Raw (uncompressed) evaluation beside the coded one, when any device codes.
        self._codes = any(not p.codec.up.is_identity for p in self._device_plans.values())

    @property
    def round_timeout_s(self) -> float:
        return self.train.round_timeout_s

    def _held_by(self, device: str, tensors: dict[str, Any]) -> dict[str, Any]:
        """The adapter tensors of the blocks ``device`` holds (below its cut; every block in
        fedlora), out of a per-block set keyed ``blocks.{i}.…``."""
        if modes.whole_model_on_device(self.train.mode):
            return dict(tensors)
        cut = self._cuts[device]
        return {k: v for k, v in tensors.items() if (block_of(k) or 0) < cut}

    def _is_up(self, peer: str) -> bool:
        link = self._links.get(peer)
        return link is not None and link.state is LinkState.ESTABLISHED

    def _check_servers(self) -> None:
        if self._server_down.is_set():
            down = [s for s in self.servers if not self._is_up(s)]
            raise ServerLost(f"server {', '.join(down) or 'stage'} was lost during the round")

    async def _server_calls(self, msg: Any) -> list[Any]:
        """The same request to every server; a lost server aborts the round (ServerLost)."""
        try:
            return list(
                await gather_owned(*(self.call(s, msg, timeout_s=self.round_timeout_s) for s in self.servers))
            )
        except (PeerTimeout, RuntimeFault) as exc:
            if self._server_down.is_set() or not all(self._is_up(s) for s in self.servers):
                raise ServerLost(f"{type(exc).__name__}: {exc}") from exc
            raise

    async def _collect(self, peer: str, r: int) -> AdaptersUp:
        """``peer``'s adapters for round ``r`` (ProtocolViolation for a device's claim beyond its
        plan; a server's weight is the micro-batches it served)."""
        up = await self.call(peer, AdaptersRequest(round=r), timeout_s=self.round_timeout_s)
        if peer in self.devices:
            check_adapters_up(up, device=peer, round_=r, train=self.train)
        return up

    async def _each_device(self, devices: list[str], r: int, stage: str, request: Any) -> dict[str, Any]:
        """``request(device)`` for each device at once; the replies of those that answered.
        A device that fails here is dropped (counted as lost in round ``r``'s record)."""
        replies = await asyncio.gather(*(request(d) for d in devices), return_exceptions=True)
        out: dict[str, Any] = {}
        for d, rep in zip(devices, replies, strict=True):
            if not isinstance(rep, BaseException):
                out[d] = rep
                continue
            if not isinstance(rep, SftError):
                raise rep
            why = f"lost during {stage}: {type(rep).__name__}: {rep}"
            self.log.warning("device_dropped", round=r, device=d, why=why)
            self.members.dropped([d])
            if self.summary.rounds and self.summary.rounds[-1].round == r:
                self.summary.rounds[-1].devices_lost.setdefault(d, why)
        return out
