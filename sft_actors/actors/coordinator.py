"""The coordinator actor: plans the run, drives rounds that survive losses, keeps it durable.

Run: wait for the servers and the devices (all of them, or a quorum once ``connect_timeout_s``
passed) → SERVER_PLAN / PLAN → held-out evaluation → rounds → final evaluation → adapters
(safetensors) and ``summary.json`` in the run directory. ``run()``'s return value (the summary's
headline, with ``status``) ends the run.

Elastic rounds (``membership``): each round runs the *active* devices in parallel (``sl``: one
after the other, relaying adapters) under a deadline (``round_deadline_s``). A device that is
lost, fails or is late is dropped from that round; the round closes with the rest (ROUND_CLOSE
names them, so the server discards the others' micro-batches), averaging uses the devices that
finished, and the loss is counted in the summary. A device that (re)connects is re-admitted
between rounds: its plan, its last checkpointed state, the current averaged adapters. Fewer
active devices than the quorum: wait up to ``rejoin_timeout_s``, then stop (``failed``).

Durable (``durability``): a checkpoint after round 0 and every ``[run.checkpoint] every``
rounds. A server lost mid-round aborts the round: once the server is back (restarted), every
actor is restored from the last checkpoint and the run continues from there. ``--resume
RUN_DIR`` starts a coordinator from RUN_DIR's last checkpoint. Any ending — completed,
interrupted (a signal), failed — writes ``summary.json`` with an honest ``status``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from sft_actors.actors.coordinator_rounds import RoundsCoordinator
from sft_actors.actors.tasks import first_completed, gather_owned
from sft_actors.errors import PeerTimeout, RemoteError, RuntimeFault, ServerLost, SftError
from sft_actors.train import modes
from sft_actors.wire import AdaptersDown, Restore, Shutdown, WireTensor
from sft_actors.wire.coded import unpack_tensor


class SetupFailed(RuntimeFault):
    """Devices answered their plan with an error and too few are left to train."""


class CoordinatorActor(RoundsCoordinator):
    async def on_peer_joined(self, peer: str) -> None:
        if not self._running:
            return
        if peer in self._device_plans:
            self.members.joined(peer)
            self.log.info("device_joined", device=peer, **self.members.describe())
        elif peer in self.servers and self._planned and not self._recovering:
            # Back from a pause, or restarted before it was found silent: its state is unknown
            # (a restarted one has none), so the round in progress is aborted and rolled back.
            self.log.warning("server_rejoined", server=peer)
            self._server_down.set()

    async def on_peer_lost(self, peer: str) -> None:
        self._peer_gone(peer, "lost")

    async def on_peer_left(self, peer: str) -> None:
        self._peer_gone(peer, "left (BYE)")

    def _peer_gone(self, peer: str, why: str) -> None:
        if not self._running or self._ended:  # the run is over: nodes leaving is no loss
            return
        if peer in self._device_plans:
            self.members.link_lost(peer)
            self.log.warning("device_lost", device=peer, why=why, **self.members.describe())
        elif peer in self.servers:
            self.log.warning("server_lost", server=peer, why=why)
            self._server_down.set()

    async def run(self) -> dict[str, Any]:
        self._t0 = time.perf_counter()
        self._running = True
        try:
            await self._run()
        except SftError as exc:  # the run cannot go on: say so, keep the last checkpoint
            if not self._stop.is_set():
                self._end("failed", f"{type(exc).__name__}: {exc}")
                return self.summary.headline()
            # Stopping: our own SHUTDOWN sent the peers away mid-round; that is the stop.
            self.log.info("round_abandoned", why=f"{type(exc).__name__}: {exc}")
        if self._stop.is_set():
            self._end("interrupted", self._stop_reason or "stopped")
        else:
            self._end("completed", f"{self.train.rounds} rounds")
        return self.summary.headline()

    async def cleanup(self, exc: BaseException | None) -> None:
        """A stop that did not come from the run's end (a signal, a crash) still writes an
        honest summary; the last checkpoint stays for ``--resume``."""
        if self._running and not self._ended:
            if exc is None or isinstance(exc, asyncio.CancelledError):  # a signal; a second forces
                self._end("interrupted", self._stop_reason or "forced stop")
            else:
                self._end("failed", f"{type(exc).__name__}: {exc}")
            self.result = self.summary.headline()

    def _shutdown_message(self) -> Shutdown:
        """SHUTDOWN tells every node how the run ended: what ``_end`` recorded, or — a stop
        that came first (a signal) — interrupted."""
        if self._ended:
            return Shutdown(reason=self.summary.reason, status=self.summary.status)
        return Shutdown(reason=self._stop_reason or "stopped", status="interrupted")

    def _end(self, status: str, reason: str) -> None:
        self._ended = True
        self.summary.wall_s = time.perf_counter() - self._t0
        self.summary.status, self.summary.reason = status, reason
        log = self.log.info if status == "completed" else self.log.error
        log("run_ended", status=status, reason=reason, devices_lost=self.summary.devices_lost)
        self.store.write_summary()

    async def _run(self) -> None:
        await self._gather()
        resumed = self.store.open_run_dir()
        self._relay_from = self.store.relay_from
        self._stamp_plans(self.store.run_id)
        self.log.info(
            "run_started",
            mode=self.train.mode,
            devices=len(self.members.active) + len(self.members.pending),
            rounds=self.train.rounds,
            run_dir=str(self.store.run_dir),
            resumed_from=resumed,
        )
        await self._send_server_plans()
        self._planned = True  # from now on a server that (re)joins must be restored
        await self._admit(self.members.pending, rollback=resumed is not None)
        if not self.members.has_quorum and self._refused:  # set-up errors: waiting cannot help
            raise next(iter(self._refused_errors()))
        self.summary.setup_s = time.perf_counter() - self._t0
        if resumed is None:
            await self._evaluate(0)
            await self._evaluate_raw(0)
            await self._checkpoint(0)
        r = self.store.round + 1
        while r <= self.train.rounds:
            if self._stop.is_set():  # a signal: the last checkpoint is where --resume continues
                return
            try:
                await self._ensure_quorum(r)
                await self._round(r)
            except ServerLost as exc:
                if self._stop.is_set():
                    raise  # not a lost server: the stop sent it away
                self.log.warning("round_aborted", round=r, why=str(exc))
                await self._recover_servers()
                aborted = {"round": r, "why": str(exc), "rolled_back_to": self.store.round}
                self.summary.rounds_aborted.append(aborted)
                r = self.store.round + 1
                continue
            r += 1
        await self._finish()

    def _stamp_plans(self, run_id: str) -> None:
        """Every plan names the run: a node still holding another run's plan (its coordinator
        was restarted fresh) starts over instead of continuing that run's state."""
        self._device_plans = {d: dataclasses.replace(p, run_id=run_id) for d, p in self._device_plans.items()}
        self._server_plans = [dataclasses.replace(p, run_id=run_id) for p in self._server_plans]

    async def _finish(self) -> None:
        rounds = self.train.rounds
        if modes.sequential(self.train.mode) and self._relay_from is not None:
            final = await self._collect(self._relay_from, rounds)  # the adapters the relay ended with
            self.store.device_adapters = {k: unpack_tensor(v) for k, v in final.tensors.items()}
        await self._evaluate(rounds)
        await self._evaluate_raw(rounds)
        self.summary.planner = await self.offload(self._planner_prediction)
        await self._write_results()

    async def _gather(self) -> None:
        """Every server; every device, or — once ``connect_timeout_s`` passed — a quorum."""
        try:
            await self.wait_for_peers(self.devices + self.servers)
        except PeerTimeout as exc:
            missing = [s for s in self.servers if not self._is_up(s)]
            present = [d for d in self.devices if self._is_up(d)]
            if missing or len(present) < self.members.quorum:
                raise PeerTimeout(
                    f"{exc}; the run needs every server and {self.members.quorum} "
                    f"device{'s' if self.members.quorum != 1 else ''}"
                ) from None
            self.log.warning(
                "devices_missing_at_start", missing=[d for d in self.devices if d not in present]
            )
        for d in self.devices:
            if self._is_up(d):
                self.members.joined(d)

    async def _send_server_plans(self) -> None:
        """Servers first (devices send a basis to theirs while setting up); a server already
        planned (a coordinator restarted) confirms, a restarted one builds its part."""
        await gather_owned(
            *(self.call(p.server, p, timeout_s=self.round_timeout_s) for p in self._server_plans)
        )
        for p in self._server_plans:
            state = self.store.state_of(p.server)
            if state is not None:  # resumed: continue from the checkpoint
                await self.call(
                    p.server, Restore(round=self.store.round, **state), timeout_s=self.round_timeout_s
                )

    async def _admit(
        self, devices: list[str], *, rollback: bool = False, grace_s: float | None = None
    ) -> None:
        """Plan, state and adapters for ``devices``, in parallel; each becomes active. With
        ``rollback`` a device gets exactly its checkpointed state; otherwise (a rejoin) its last
        state, then the run's current averaged adapters. With ``grace_s`` (seconds on the
        clock) admissions still running then go on in the background: a device busy finishing
        a round it was dropped from never holds up the others; it joins a later round."""
        for d in devices:
            task = self._admitting.get(d)
            if task is None or task.done():
                self._admitting[d] = self._spawn(self._admit_logged(d, rollback))
        tasks = [self._admitting[d] for d in devices]
        if not tasks:
            return
        everyone = asyncio.gather(*(asyncio.shield(t) for t in tasks))
        if grace_s is None:
            await everyone
        else:
            await first_completed(everyone, self.clock.sleep(grace_s))
        self.log.info("devices_admitted", **self.members.describe())

    async def _admit_logged(self, device: str, rollback: bool) -> None:
        try:
            await self._admit_one(device, rollback=rollback)
        except SftError as exc:  # it answered with an error, or its link went: not admitted
            why = f"{type(exc).__name__}: {exc}"
            self.log.warning("device_not_admitted", device=device, error=why)
            if isinstance(exc, RemoteError):
                # It refused (say, its dataset is missing): retrying cannot help until it
                # comes back as a new session, fixed and restarted.
                self._refused[device] = why
                self.members.link_lost(device)
            elif not self._is_up(device):
                self.members.link_lost(device)
            return  # otherwise still pending: tried again at the next round
        self._refused.pop(device, None)
        self.members.admitted(device)

    async def _admit_one(self, device: str, *, rollback: bool) -> None:
        t = self.round_timeout_s
        await self.call(device, self._device_plans[device], timeout_s=t)
        state = self.store.state_of(device)
        if state is not None:
            await self.call(device, Restore(round=self.store.round, **state), timeout_s=t)
        if not rollback and self.store.device_adapters:
            held = self._held_by(device, self.store.device_adapters)
            mine = {k: WireTensor.from_torch(v) for k, v in held.items()}
            await self.call(device, AdaptersDown(round=self.store.round, tensors=mine), timeout_s=t)

    async def _ensure_quorum(self, r: int) -> None:
        """Admit devices that (re)joined; below quorum, wait up to ``rejoin_timeout_s`` for more."""
        await self._admit(self.members.pending, grace_s=self.settings.heartbeat_timeout_s)
        if self.members.has_quorum:
            return
        budget = self.settings.rejoin_timeout_s
        self.log.warning(
            "below_quorum", round=r, quorum=self.members.quorum, waiting_s=budget, **self.members.describe()
        )
        deadline = self.clock.now() + budget
        while not self.members.has_quorum:
            if self.clock.now() >= deadline:
                if self._refused:
                    raise next(iter(self._refused_errors()))
                raise PeerTimeout(
                    f"round {r}: {len(self.members.active)} active devices, fewer than the quorum "
                    f"min_devices = {self.members.quorum}, and none came back within rejoin_timeout_s = "
                    f"{budget}s; restart the lost devices and run again with --resume RUN_DIR"
                )
            self._peer_change.clear()
            tick = self.settings.heartbeat_interval_s
            await first_completed(self._peer_change.wait(), self.clock.sleep(tick))
            await self._admit(self.members.pending, grace_s=tick)

    def _refused_errors(self) -> list[SetupFailed]:
        quorum = self.members.quorum
        return [
            SetupFailed(
                f"{d} could not set up its plan ({why}); {len(self.members.active)} devices are "
                f"active, fewer than the quorum min_devices = {quorum}"
            )
            for d, why in self._refused.items()
        ]

    async def _recover_servers(self) -> None:
        """Wait (``rejoin_timeout_s`` each time) for lost servers to come back, then restore
        every actor from the last checkpoint and continue after its round. A server lost again
        meanwhile starts it over."""
        self._recovering = True
        try:
            while True:
                for s in self.servers:
                    if not self._is_up(s):
                        await self.await_return(s)
                try:
                    await self._roll_back()
                except (PeerTimeout, RuntimeFault) as exc:
                    if all(self._is_up(s) for s in self.servers):
                        raise
                    self.log.warning("recovery_interrupted", why=f"{type(exc).__name__}: {exc}")
                    continue
                if all(self._is_up(s) for s in self.servers):
                    self._server_down.clear()
                    return
        finally:
            self._recovering = False

    async def _roll_back(self) -> None:
        self.store.roll_back()
        self._relay_from = self.store.relay_from
        self.log.warning("rolled_back", to_round=self.store.round)
        await self._send_server_plans()
        self.members.resync_all()
        await self._admit(self.members.pending, rollback=True)
