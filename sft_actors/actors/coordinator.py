"""The coordinator actor: plans the run, drives rounds, averages device LoRA, writes results.

Run: wait for every device and server → PLAN to each device (cut, shard, codec policy) →
held-out evaluation → rounds (parallel devices; ``sl`` runs them one at a time, relaying the
device adapters from one to the next) → every ``aggregate_every`` rounds, per-block averaging
of device adapters weighted by samples → final evaluation → adapters (safetensors) and a
``summary.json`` in a fresh run directory. ``run()``'s return value (the summary) ends the run.
"""

from __future__ import annotations

import time
from typing import Any

from tqdm import tqdm

from sft_actors.actors.base import Actor
from sft_actors.actors.env import ActorEnv
from sft_actors.actors.handlers import MsgContext
from sft_actors.actors.tasks import gather_owned
from sft_actors.errors import ActorFailed, PeerTimeout, SftError
from sft_actors.plan.assign import device_plans, server_plans
from sft_actors.topology import CODED_MODES, ActorSpec
from sft_actors.train import modes
from sft_actors.train.aggregate import Contribution, average_per_block, block_of
from sft_actors.train.summary import (
    EvalRecord,
    RunSummary,
    eval_record,
    median_or_zero,
    new_run_dir,
    round_record,
    write_adapters,
    write_summary,
)
from sft_actors.wire import (
    AdaptersDown,
    AdaptersRequest,
    AdaptersUp,
    DevicePlan,
    EvalRequest,
    Metrics,
    RoundClose,
    RoundDone,
    RoundStart,
    WireTensor,
)
from sft_actors.wire.coded import unpack_tensor


class CoordinatorActor(Actor):
    def __init__(self, spec: ActorSpec, env: ActorEnv) -> None:
        super().__init__(spec, env)
        run = self.topology.run
        self.train = run.train
        self.devices = [d.name for d in self.topology.devices]
        # The one place a run's configuration becomes what each actor does.
        self._device_plans: list[DevicePlan] = device_plans(self.topology)
        # fedlora trains whole models on the devices: a server in the file takes no part.
        whole = modes.whole_model_on_device(run.train.mode)
        self._server_plans = [] if whole else server_plans(self.topology)
        self.servers = [p.server for p in self._server_plans]
        self._cuts = {p.device: p.cut for p in self._device_plans}
        self.summary = RunSummary(
            name=run.name,
            mode=run.train.mode,
            model=run.model,
            devices={} if whole else dict(self._cuts),
        )
        self._bar: tqdm[Any] | None = None
        self._bar_wire = self._bar_raw = 0  # bytes on the wire / raw, this round (progress bar)
        self._device_adapters: dict[str, Any] = {}
        self._running = False
        # Raw (uncompressed) evaluation beside the coded one, when any device codes.
        self._codes = any(not p.codec.up.is_identity for p in self._device_plans)

    @property
    def round_timeout_s(self) -> float:
        return self.train.round_timeout_s

    async def on_peer_lost(self, peer: str) -> None:
        """A device or server went silent mid-run: fail the run now instead of waiting for the
        round timeout (there is no recovery policy yet: the operator restarts the run)."""
        if self._running and peer in (*self.devices, *self.servers):
            raise PeerTimeout(
                f"{peer} was lost during round work (its connection dropped, or it was silent for "
                f"more than heartbeat_timeout_s = {self.settings.heartbeat_timeout_s}s); stopping "
                f"the run. Check that {peer} is alive and reachable, then restart the run"
            )

    async def on_peer_left(self, peer: str) -> None:
        if self._running and peer in (*self.devices, *self.servers):
            raise ActorFailed(f"{peer} left (BYE) in the middle of the run; stopping the run")

    async def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self._running = True
        await self.wait_for_peers(self.devices + [s.name for s in self.topology.servers])
        await self._send_plans()
        self.summary.setup_s = time.perf_counter() - t0
        self.log.info(
            "run_started", mode=self.train.mode, devices=len(self.devices), rounds=self.train.rounds
        )
        await self._evaluate(0)
        await self._evaluate_raw(0)
        for r in range(1, self.train.rounds + 1):
            await self._round(r)
            last = r == self.train.rounds
            if not modes.sequential(self.train.mode) and (r % self.train.aggregate_every == 0 or last):
                await self._aggregate(r)
        if modes.sequential(self.train.mode):  # the adapters the relay ended with
            final = await self._collect(self.devices[-1], self.train.rounds)
            self._device_adapters = {k: unpack_tensor(v) for k, v in final.tensors.items()}
        await self._evaluate(self.train.rounds)
        await self._evaluate_raw(self.train.rounds)
        self.summary.wall_s = time.perf_counter() - t0
        self._running = False
        self.summary.planner = await self.offload(self._planner_prediction)
        await self._write_results()
        return self.summary.headline()

    # --- set-up --------------------------------------------------------------------------
    async def _send_plans(self) -> None:
        """Servers first (devices send a basis to theirs while setting up), then devices; each
        loads its model and data now (in-process actors share one copy of the base)."""
        await gather_owned(
            *(self.call(p.server, p, timeout_s=self.round_timeout_s) for p in self._server_plans)
        )
        await gather_owned(
            *(self.call(p.device, p, timeout_s=self.round_timeout_s) for p in self._device_plans)
        )

    # --- rounds --------------------------------------------------------------------------
    async def _run_devices(self, r: int) -> list[RoundDone]:
        """Every device's round: one after the other with the adapters relayed (``sl``), else
        all in parallel."""
        start = RoundStart(round=r)
        if not modes.sequential(self.train.mode):
            calls = (self.call(dev, start, timeout_s=self.round_timeout_s) for dev in self.devices)
            return list(await gather_owned(*calls))
        done = []
        for i, dev in enumerate(self.devices):
            if i > 0 or r > 1:
                await self._relay(self.devices[i - 1], dev, r)
            done.append(await self.call(dev, start, timeout_s=self.round_timeout_s))
        return done

    async def _round(self, r: int) -> None:
        total = self.train.steps_per_round * len(self.devices)
        self._bar_wire = self._bar_raw = 0
        self._bar = tqdm(
            total=total, desc=f"round {r}/{self.train.rounds}", unit="step", leave=True, disable=None
        )
        started = time.perf_counter()
        try:
            done = await self._run_devices(r)
        finally:
            self._bar.close()
            self._bar = None
        steps = self.train.steps_per_round * len(done)  # training micro-batches this round
        close = RoundClose(round=r, n_samples=sum(m.n_samples for m in done), micro_batches=steps)
        await gather_owned(*(self.call(s, close, timeout_s=self.round_timeout_s) for s in self.servers))
        record = round_record(r, done, seconds=time.perf_counter() - started)
        self.summary.rounds.append(record)
        self.log.info(
            "round_done",
            round=r,
            loss=round(record.loss, 4),
            bytes_up=record.bytes_up,
            bytes_down=record.bytes_down,
            ratio_up=round(record.ratio_up, 2),
            ratio_down=round(record.ratio_down, 2),
            seconds=round(record.seconds, 2),
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

    # --- adapters ------------------------------------------------------------------------
    async def _collect(self, peer: str, r: int) -> AdaptersUp:
        return await self.call(peer, AdaptersRequest(round=r), timeout_s=self.round_timeout_s)

    async def _relay(self, src: str, dst: str, r: int) -> None:
        """Vanilla split learning: the next device starts from the previous device's adapters."""
        up = await self._collect(src, r)
        cut = self._cuts[dst]
        held = {k: v for k, v in up.tensors.items() if (block_of(k) or 0) < cut}  # blocks dst holds
        await self.call(dst, AdaptersDown(round=r, tensors=held), timeout_s=self.round_timeout_s)
        self._device_adapters = {k: unpack_tensor(v) for k, v in up.tensors.items()}

    async def _aggregate(self, r: int) -> None:
        ups = await gather_owned(*(self._collect(d, r) for d in self.devices))
        contributions = [
            Contribution(
                device=u.device,
                n_samples=u.n_samples,
                tensors={k: unpack_tensor(v) for k, v in u.tensors.items()},
            )
            for u in ups
        ]
        averaged = await self.offload(average_per_block, contributions)
        self._device_adapters = averaged
        sends = []
        for u, c in zip(ups, contributions, strict=True):
            mine = {k: WireTensor.from_torch(averaged[k]) for k in c.tensors if k in averaged}
            sends.append(
                self.call(u.device, AdaptersDown(round=r, tensors=mine), timeout_s=self.round_timeout_s)
            )
        await gather_owned(*sends)
        self.log.info("adapters_averaged", round=r, tensors=len(averaged), devices=len(ups))

    # --- evaluation and results ----------------------------------------------------------------
    async def _evaluate_raw(self, r: int) -> None:
        """With a codec on, also measure the model alone (activations sent uncompressed)."""
        if self._codes:
            self.summary.evals_raw.append(await self._evaluate(r, through_codec=False))

    async def _evaluate(self, r: int, *, through_codec: bool = True) -> EvalRecord:
        request = EvalRequest(round=r, through_codec=through_codec)
        replies = await gather_owned(
            *(self.call(d, request, timeout_s=self.round_timeout_s) for d in self.devices)
        )
        rec = eval_record(r, [m.stats for m in replies])
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
        run = self.topology.run
        run_dir = new_run_dir(run.output.dir, run.name)
        self.summary.run_dir = str(run_dir)
        meta = {"model": run.model, "mode": run.train.mode, "run": run.name}
        if self._device_adapters:
            path = write_adapters(self._device_adapters, run_dir / "adapters_devices.safetensors", meta)
            self.summary.adapters["devices"] = str(path)
        for s in self.servers:
            up = await self._collect(s, run.train.rounds)
            if up.tensors:
                tensors = {k: unpack_tensor(v) for k, v in up.tensors.items()}
                path = write_adapters(tensors, run_dir / f"adapters_{s}.safetensors", meta)
                self.summary.adapters[s] = str(path)
        path = write_summary(self.summary, run_dir)
        self.log.info("run_written", run_dir=str(run_dir), summary=str(path))
