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
import time
from typing import Any

from tqdm import tqdm

from sft_actors.actors.base import Actor
from sft_actors.actors.durability import Durability, deterministic
from sft_actors.actors.env import ActorEnv
from sft_actors.actors.handlers import MsgContext
from sft_actors.actors.membership import Membership
from sft_actors.actors.peers import LinkState
from sft_actors.actors.tasks import first_completed, gather_owned
from sft_actors.errors import PeerTimeout, RuntimeFault, SftError
from sft_actors.plan.assign import device_plans, server_plans
from sft_actors.topology import CODED_MODES, ActorSpec
from sft_actors.train import modes
from sft_actors.train.aggregate import Contribution, average_per_block, block_of
from sft_actors.train.summary import EvalRecord, RunSummary, eval_record, median_or_zero, round_record
from sft_actors.wire import (
    AdaptersDown,
    AdaptersRequest,
    AdaptersUp,
    DevicePlan,
    EvalRequest,
    Metrics,
    Restore,
    RoundClose,
    RoundDone,
    RoundStart,
    WireTensor,
)
from sft_actors.wire.coded import unpack_tensor


class ServerLost(RuntimeFault):
    """A server stage was lost mid-round: the round is aborted and the run rolls back."""


class CoordinatorActor(Actor):
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
        self._relay_from: str | None = None  # sl: the device whose adapters the next one starts from
        self._t0 = 0.0
        # Raw (uncompressed) evaluation beside the coded one, when any device codes.
        self._codes = any(not p.codec.up.is_identity for p in self._device_plans.values())

    @property
    def round_timeout_s(self) -> float:
        return self.train.round_timeout_s

    # --- liveness: devices come and go; a server's loss aborts the round ----------------------
    async def on_peer_joined(self, peer: str) -> None:
        if not self._running:
            return
        if peer in self._device_plans:
            self.members.joined(peer)
            self.log.info("device_joined", device=peer, **self.members.describe())
        elif peer in self.servers and all(self._is_up(s) for s in self.servers):
            self._server_down.clear()

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

    def _is_up(self, peer: str) -> bool:
        link = self._links.get(peer)
        return link is not None and link.state is LinkState.ESTABLISHED

    # --- the run ---------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        self._t0 = time.perf_counter()
        self._running = True
        try:
            await self._run()
        except SftError as exc:  # the run cannot go on: say so, keep the last checkpoint
            self._end("failed", f"{type(exc).__name__}: {exc}")
            return self.summary.headline()
        self._end("completed", f"{self.train.rounds} rounds")
        return self.summary.headline()

    async def cleanup(self, exc: BaseException | None) -> None:
        """A stop that did not come from the run's end (a signal, a crash) still writes an
        honest summary; the last checkpoint stays for ``--resume``."""
        if self._running and not self._ended:
            status = "failed" if exc is not None else "interrupted"
            self._end(status, self._stop_reason if exc is None else f"{type(exc).__name__}: {exc}")
            self.result = self.summary.headline()

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
        self.log.info(
            "run_started",
            mode=self.train.mode,
            devices=len(self.members.active) + len(self.members.pending),
            rounds=self.train.rounds,
            run_dir=str(self.store.run_dir),
            resumed_from=resumed,
        )
        await self._send_server_plans()
        await self._admit(self.members.pending, rollback=resumed is not None)
        self.summary.setup_s = time.perf_counter() - self._t0
        if resumed is None:
            await self._evaluate(0)
            await self._evaluate_raw(0)
            await self._checkpoint(0)
        r = self.store.round + 1
        while r <= self.train.rounds:
            try:
                await self._round(r)
            except ServerLost as exc:
                self.log.warning("round_aborted", round=r, why=str(exc))
                await self._recover_servers()
                aborted = {"round": r, "why": str(exc), "rolled_back_to": self.store.round}
                self.summary.rounds_aborted.append(aborted)
                r = self.store.round + 1
                continue
            r += 1
        await self._finish()

    async def _finish(self) -> None:
        rounds = self.train.rounds
        if modes.sequential(self.train.mode) and self._relay_from is not None:
            final = await self._collect(self._relay_from, rounds)  # the adapters the relay ended with
            self.store.device_adapters = {k: unpack_tensor(v) for k, v in final.tensors.items()}
        await self._evaluate(rounds)
        await self._evaluate_raw(rounds)
        self.summary.planner = await self.offload(self._planner_prediction)
        await self._write_results()

    # --- set-up: who is here, plans, admission -------------------------------------------------
    async def _gather(self) -> None:
        """Every server; every device, or — once ``connect_timeout_s`` passed — a quorum."""
        try:
            await self.wait_for_peers(self.devices + self.servers)
        except PeerTimeout as exc:
            missing = [s for s in self.servers if not self._is_up(s)]
            present = [d for d in self.devices if self._is_up(d)]
            if missing or len(present) < self.members.quorum:
                raise PeerTimeout(
                    f"{exc}; the run needs every server and {self.members.quorum} devices"
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

    async def _admit(self, devices: list[str], *, rollback: bool = False) -> None:
        """Plan, state and adapters for ``devices`` (in parallel); each becomes active. With
        ``rollback`` a device gets exactly its checkpointed state; otherwise (a rejoin) its last
        state, then the run's current averaged adapters."""
        if not devices:
            return
        outcomes = await asyncio.gather(
            *(self._admit_one(d, rollback=rollback) for d in devices), return_exceptions=True
        )
        for d, out in zip(devices, outcomes, strict=True):
            if isinstance(out, BaseException):
                if not isinstance(out, SftError):
                    raise out
                self.log.warning("device_not_admitted", device=d, error=f"{type(out).__name__}: {out}")
                continue
            self.members.admitted(d)
        self.log.info("devices_admitted", **self.members.describe())

    async def _admit_one(self, device: str, *, rollback: bool) -> None:
        t = self.round_timeout_s
        await self.call(device, self._device_plans[device], timeout_s=t)
        state = self.store.state_of(device)
        if state is not None:
            await self.call(device, Restore(round=self.store.round, **state), timeout_s=t)
        if not rollback and self.store.device_adapters:
            cut = self._cuts[device]
            mine = {
                k: WireTensor.from_torch(v)
                for k, v in self.store.device_adapters.items()
                if (block_of(k) or 0) < cut or modes.whole_model_on_device(self.train.mode)
            }
            await self.call(device, AdaptersDown(round=self.store.round, tensors=mine), timeout_s=t)

    async def _ensure_quorum(self, r: int) -> None:
        """Admit devices that (re)joined; below quorum, wait up to ``rejoin_timeout_s`` for more."""
        await self._admit(self.members.pending)
        if self.members.has_quorum:
            return
        budget = self.settings.rejoin_timeout_s
        self.log.warning(
            "below_quorum", round=r, quorum=self.members.quorum, waiting_s=budget, **self.members.describe()
        )
        deadline = self.clock.now() + budget
        while not self.members.has_quorum:
            if self.clock.now() >= deadline:
                raise PeerTimeout(
                    f"round {r}: {len(self.members.active)} active devices, fewer than the quorum "
                    f"min_devices = {self.members.quorum}, and none came back within rejoin_timeout_s = "
                    f"{budget}s; restart the lost devices and run again with --resume RUN_DIR"
                )
            self._peer_change.clear()
            await first_completed(
                self._peer_change.wait(), self.clock.sleep(self.settings.heartbeat_interval_s)
            )
            await self._admit(self.members.pending)

    # --- rounds --------------------------------------------------------------------------
    async def _round(self, r: int) -> None:
        await self._ensure_quorum(r)
        active = self.members.active
        self._open_bar(r, len(active))
        started = time.perf_counter()
        try:
            if modes.sequential(self.train.mode):
                done, lost = await self._run_sequential(r, active)
            else:
                done, lost = await self._run_parallel(r, active)
        finally:
            if self._bar is not None:
                self._bar.close()
            self._bar = None
        self._check_servers()
        self.members.dropped(lost)
        steps = self.train.steps_per_round * len(done)  # training micro-batches this round
        close = RoundClose(
            round=r,
            n_samples=sum(m.n_samples for m in done),
            micro_batches=steps,
            devices=tuple(m.device for m in done),
        )
        await self._server_calls(close)
        record = round_record(r, done, seconds=time.perf_counter() - started, lost=lost)
        self.summary.rounds.append(record)
        self.log.info(
            "round_done",
            round=r,
            loss=round(record.loss, 4),
            devices=len(done),
            devices_lost=len(lost),
            bytes_up=record.bytes_up,
            bytes_down=record.bytes_down,
            ratio_up=round(record.ratio_up, 2),
            ratio_down=round(record.ratio_down, 2),
            seconds=round(record.seconds, 2),
        )
        last = r == self.train.rounds
        if done and not modes.sequential(self.train.mode) and (r % self.train.aggregate_every == 0 or last):
            await self._aggregate(r, [m.device for m in done])
        if last or r % self.topology.run.checkpoint.every == 0:
            # Not a device dropped while its adapters were averaged: its state is not this round's.
            await self._checkpoint(r, [m.device for m in done if m.device not in record.devices_lost])

    async def _run_parallel(self, r: int, active: list[str]) -> tuple[list[RoundDone], dict[str, str]]:
        """Every active device's round at once, under the deadline; (finished, dropped → why)."""
        start = RoundStart(round=r)
        calls = {
            d: asyncio.ensure_future(self.call(d, start, timeout_s=self.round_timeout_s)) for d in active
        }
        deadline = asyncio.ensure_future(self.clock.sleep(self.train.deadline_s))
        server_down = asyncio.ensure_future(self._server_down.wait())
        try:
            pending: set[asyncio.Future[Any]] = set(calls.values())
            while pending and not deadline.done() and not server_down.done():
                _, pending = await asyncio.wait(
                    pending | {deadline, server_down}, return_when=asyncio.FIRST_COMPLETED
                )
                pending -= {deadline, server_down}
        finally:
            late = [f for f in (*calls.values(), deadline, server_down) if not f.done()]
            for fut in late:
                fut.cancel()
            await asyncio.gather(*late, return_exceptions=True)  # settled before they are read
        self._check_servers()
        done: list[RoundDone] = []
        lost: dict[str, str] = {}
        for d, fut in calls.items():
            if fut.cancelled():
                lost[d] = f"late: not done {self.train.deadline_s}s after the round started"
            elif fut.exception() is not None:
                lost[d] = f"{type(fut.exception()).__name__}: {fut.exception()}"
            else:
                done.append(fut.result())
        for d, why in lost.items():
            self.log.warning("device_dropped", round=r, device=d, why=why)
        return done, lost

    async def _run_sequential(self, r: int, active: list[str]) -> tuple[list[RoundDone], dict[str, str]]:
        """Vanilla split learning: one device after the other, each starting from the adapters
        the previous one ended with; a device that fails is skipped."""
        done: list[RoundDone] = []
        lost: dict[str, str] = {}
        for d in active:
            try:
                if self._relay_from is not None and self._relay_from != d:
                    await self._relay(self._relay_from, d, r)
                async with asyncio.timeout(self.train.deadline_s):
                    done.append(await self.call(d, RoundStart(round=r), timeout_s=self.round_timeout_s))
                self._relay_from = d
            except (SftError, TimeoutError) as exc:
                self._check_servers()
                lost[d] = f"{type(exc).__name__}: {exc}"
                self.log.warning("device_dropped", round=r, device=d, why=lost[d])
        return done, lost

    def _open_bar(self, r: int, devices: int) -> None:
        self._bar_wire = self._bar_raw = 0
        self._bar = tqdm(
            total=self.train.steps_per_round * devices,
            desc=f"round {r}/{self.train.rounds}",
            unit="step",
            leave=True,
            disable=None,
        )

    async def on_metrics(self, msg: Metrics, ctx: MsgContext) -> None:
        """Per-step progress from devices (fire and forget)."""
        if self._bar is not None:
            self._bar_wire += msg.wire_bytes
            self._bar_raw += msg.raw_bytes
            ratio = self._bar_raw / self._bar_wire if self._bar_wire else 1.0
            self._bar.update(1)
            self._bar.set_postfix(
                loss=f"{msg.step_loss:.3f}",
                wire=f"{self._bar_wire / 1e6:.2f}MB",
                ratio=f"{ratio:.1f}x",
                refresh=False,
            )

    # --- servers: calls, loss, recovery ---------------------------------------------------------
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

    async def _recover_servers(self) -> None:
        """Wait (``rejoin_timeout_s``) for lost servers to come back, then restore every actor
        from the last checkpoint and continue after its round."""
        for s in self.servers:
            if not self._is_up(s):
                await self.await_return(s)
        self._server_down.clear()
        self.store.roll_back()
        self.log.warning("rolled_back", to_round=self.store.round)
        await self._send_server_plans()
        self.members.resync_all()
        await self._admit(self.members.pending, rollback=True)

    # --- adapters ------------------------------------------------------------------------
    async def _collect(self, peer: str, r: int) -> AdaptersUp:
        return await self.call(peer, AdaptersRequest(round=r), timeout_s=self.round_timeout_s)

    async def _relay(self, src: str, dst: str, r: int) -> None:
        """Vanilla split learning: the next device starts from the previous device's adapters."""
        up = await self._collect(src, r)
        cut = self._cuts[dst]
        held = {k: v for k, v in up.tensors.items() if (block_of(k) or 0) < cut}  # blocks dst holds
        await self.call(dst, AdaptersDown(round=r, tensors=held), timeout_s=self.round_timeout_s)
        self.store.device_adapters = {k: unpack_tensor(v) for k, v in up.tensors.items()}

    async def _aggregate(self, r: int, devices: list[str]) -> None:
        """FedAvg per block over the devices that finished round ``r`` (sample-weighted)."""
        ups = self._after_round(
            r, devices, await asyncio.gather(*(self._collect(d, r) for d in devices), return_exceptions=True)
        )
        if not ups:
            return
        contributions = [
            Contribution(
                device=u.device,
                n_samples=u.n_samples,
                tensors={k: unpack_tensor(v) for k, v in u.tensors.items()},
            )
            for u in ups
        ]
        averaged = await self.offload(average_per_block, contributions)
        self.store.device_adapters = averaged
        sends = []
        for u, c in zip(ups, contributions, strict=True):
            mine = {k: WireTensor.from_torch(averaged[k]) for k in c.tensors if k in averaged}
            sends.append(
                self.call(u.device, AdaptersDown(round=r, tensors=mine), timeout_s=self.round_timeout_s)
            )
        sent = await asyncio.gather(*sends, return_exceptions=True)
        self._after_round(r, [u.device for u in ups], sent)
        self.log.info("adapters_averaged", round=r, tensors=len(averaged), devices=len(ups))

    def _after_round(self, r: int, devices: list[str], outcomes: list[Any]) -> list[Any]:
        """The results of calls to ``devices`` once round ``r`` closed (averaging). A device
        whose call failed (lost since, or an error) is dropped as if from round ``r`` — counted
        there, re-admitted later if it is still or again connected — instead of failing the run."""
        kept = []
        for d, out in zip(devices, outcomes, strict=True):
            if not isinstance(out, BaseException):
                kept.append(out)
                continue
            if not isinstance(out, SftError):
                raise out
            why = f"{type(out).__name__}: {out}"
            self.members.dropped([d])
            self.summary.rounds[-1].devices_lost.setdefault(d, why)
            self.log.warning("device_dropped", round=r, device=d, why=why)
        return kept

    async def _checkpoint(self, r: int, devices: list[str] | None = None) -> None:
        """Every server's and the in-step devices' state, with the run's history, on disk."""
        members = self.members.active if devices is None else devices
        try:
            await self.store.checkpoint(r, self, devices=members, servers=self.servers)
        except (PeerTimeout, RuntimeFault) as exc:  # a device's failure is not raised (kept state)
            if self._server_down.is_set() or not all(self._is_up(s) for s in self.servers):
                raise ServerLost(f"{type(exc).__name__}: {exc}") from exc
            raise
        self._check_servers()

    # --- evaluation and results ----------------------------------------------------------------
    async def _evaluate_raw(self, r: int) -> None:
        """With a codec on, also measure the model alone (activations sent uncompressed)."""
        if self._codes:
            rec = await self._evaluate(r, through_codec=False)
            if rec is not None:
                self.summary.evals_raw.append(rec)

    async def _evaluate(self, r: int, *, through_codec: bool = True) -> EvalRecord | None:
        """Held-out evaluation over the active devices' shares (a lost device's share is
        missing from this one; ``targets`` says how much was evaluated)."""
        request = EvalRequest(round=r, through_codec=through_codec)
        active = self.members.active
        replies = await asyncio.gather(
            *(self.call(d, request, timeout_s=self.round_timeout_s) for d in active), return_exceptions=True
        )
        stats = [m.stats for m in replies if not isinstance(m, BaseException)]
        failed = [d for d, m in zip(active, replies, strict=True) if isinstance(m, BaseException)]
        for m in replies:
            if isinstance(m, BaseException) and not isinstance(m, SftError):
                raise m
        self._check_servers()
        if not stats:
            self.log.warning("heldout_skipped", round=r, why="no device answered")
            return None
        rec = eval_record(r, stats)
        if through_codec:
            self.summary.evals.append(rec)
        self.log.info(
            "heldout_evaluated",
            round=r,
            codec=through_codec and self._codes,
            loss=round(rec.loss, 4),
            perplexity=None if rec.perplexity is None else round(rec.perplexity, 3),
            accuracy=rec.accuracy,
            targets=rec.targets,
            devices_missing=failed or None,
        )
        return rec

    def _planner_prediction(self) -> dict[str, Any]:
        """The planner's per-round delay for this topology's cuts, codec and links, beside the
        measured one: how far the delay model is from what this run saw (assumed device FLOP/s
        and the shared CPU of a one-machine run make them differ; the gap is the point)."""
        from sft_actors.plan.from_topology import predict_topology, problem_from_topology

        measured = median_or_zero([r.seconds for r in self.summary.rounds])
        if self.train.mode not in CODED_MODES:
            why = (
                f"the delay model covers sft (parallel devices, coded tensors), not mode {self.train.mode!r}"
            )
            return {"measured_round_s": measured, "predicted_round_s": None, "why_not": why}
        try:
            problem, assumed = problem_from_topology(self.topology)
            pred = predict_topology(self.topology, problem)
        except SftError as exc:
            return {"measured_round_s": measured, "predicted_round_s": None, "why_not": str(exc)}
        return {
            "measured_round_s": measured,
            "predicted_round_s": pred.round_delay_s,
            "predicted_device_round_s": pred.device_round_s,
            "assumed": assumed,
        }

    async def _write_results(self) -> None:
        server_states: dict[str, AdaptersUp] = {}
        for s in self.servers:
            server_states[s] = await self._collect(s, self.train.rounds)
        self.store.write_adapters(
            {s: {k: unpack_tensor(v) for k, v in up.tensors.items()} for s, up in server_states.items()}
        )
