"""One round: the active devices under a deadline, its close, averaging and checkpoint.

Parallel modes run every active device at once and close the round with those that finished
before ``round_deadline_s``; ``sl`` runs them one after the other, relaying the adapters. A
dropped device (lost, failed, late) is recorded with why; ROUND_CLOSE names the devices that
count, so servers discard the others' micro-batches.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tqdm import tqdm

from sft_actors.actors.coordinator_eval import EvaluatingCoordinator
from sft_actors.actors.handlers import MsgContext
from sft_actors.errors import NonFiniteLoss, ProtocolViolation, RemoteError, RoundFailed, SftError
from sft_actors.train import modes
from sft_actors.train.aggregate import Contribution
from sft_actors.train.claims import check_adapters_finite, check_round_done
from sft_actors.train.lora_average import average_lora
from sft_actors.train.summary import averaging_record, round_record
from sft_actors.wire import (
    AdaptersDown,
    Metrics,
    RoundClose,
    RoundDone,
    RoundStart,
    StateReport,
    StateRequest,
    WireTensor,
)
from sft_actors.wire.coded import unpack_tensor


class RoundsCoordinator(EvaluatingCoordinator):
    async def _round(self, r: int) -> None:
        """Round ``r`` over the active devices (the caller saw to the quorum)."""
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
        if not done:  # nothing to close, average or report: never a completed round
            causes = "; ".join(f"{d}: {why}" for d, why in lost.items()) or "no active device"
            raise RoundFailed(f"round {r}: no device finished it ({causes})")
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
        record.devices_absent = [d for d in self.devices if d not in active]
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
            basis_bytes=record.basis_bytes,
            ratio_total=round(record.ratio_total, 2),
            seconds=round(record.seconds, 2),
        )
        last = r == self.train.rounds
        in_step = [m.device for m in done]
        if done and not modes.sequential(self.train.mode) and (r % self.train.aggregate_every == 0 or last):
            in_step = await self._aggregate(r, in_step)
        if last or r % self.topology.run.checkpoint.every == 0:
            await self._checkpoint(r, in_step)

    async def _run_parallel(self, r: int, active: list[str]) -> tuple[list[RoundDone], dict[str, str]]:
        """Every active device's round at once, under the deadline; (finished, dropped → why)."""
        start = RoundStart(round=r)
        calls = {
            d: asyncio.ensure_future(self.call(d, start, timeout_s=self.round_timeout_s)) for d in active
        }
        deadline_s = self._deadline_s()
        deadline = asyncio.ensure_future(self.clock.sleep(deadline_s))
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
                lost[d] = f"late: not done {deadline_s:g}s after the round started"
            elif fut.exception() is not None:
                lost[d] = f"{type(fut.exception()).__name__}: {fut.exception()}"
            else:
                try:
                    check_round_done(fut.result(), device=d, round_=r, train=self.train)
                    done.append(fut.result())
                except ProtocolViolation as exc:
                    lost[d] = f"ProtocolViolation: {exc}"
        for d, why in lost.items():
            self.log.warning("device_dropped", round=r, device=d, why=why)
        for fut in calls.values():
            if not fut.cancelled():
                _raise_if_diverged(fut.exception())
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
                async with asyncio.timeout(self._deadline_s()):
                    reply = await self.call(d, RoundStart(round=r), timeout_s=self.round_timeout_s)
                check_round_done(reply, device=d, round_=r, train=self.train)
                done.append(reply)
                self._relay_from = d
            except (SftError, TimeoutError) as exc:
                _raise_if_diverged(exc)
                self._check_servers()
                lost[d] = f"{type(exc).__name__}: {exc}"
                self.log.warning("device_dropped", round=r, device=d, why=lost[d])
        return done, lost

    def _deadline_s(self) -> float:
        """This round's deadline: ``round_deadline_s``, or adaptive from the rounds so far."""
        return self.train.deadline_s([rec.seconds for rec in self.summary.rounds])

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

    async def _relay(self, src: str, dst: str, r: int) -> None:
        """Vanilla split learning: the next device starts from the previous device's adapters."""
        up = await self._collect(src, r)
        adapters = {k: unpack_tensor(v) for k, v in up.tensors.items()}
        check_adapters_finite(adapters, device=src, round_=r)
        held = self._held_by(dst, up.tensors)
        await self.call(dst, AdaptersDown(round=r, tensors=held), timeout_s=self.round_timeout_s)
        self.store.device_adapters = adapters

    async def _aggregate(self, r: int, devices: list[str]) -> list[str]:
        """FedAvg per block over the devices that finished round ``r`` (sample-weighted); a
        device lost meanwhile is left out (and resynchronised when it is back). Returns the
        devices whose adapters were averaged."""
        ups = await self._each_device(devices, r, "averaging", lambda d: self._collect(d, r))
        contributions = [
            Contribution(
                device=d,
                n_samples=u.n_samples,
                tensors={k: unpack_tensor(v) for k, v in u.tensors.items()},
            )
            for d, u in ups.items()
        ]
        for c in contributions:  # a diverged device fails the run before the average (an SVD)
            check_adapters_finite(c.tensors, device=c.device, round_=r)
        if not contributions:
            return []
        result = await self.offload(average_lora, contributions, self.train.lora_averaging)
        averaged, refactorized = result.tensors, set(result.refactorized)
        self.store.device_adapters = averaged
        if self.summary.rounds and self.summary.rounds[-1].round == r:
            self.summary.rounds[-1].averaging = averaging_record(result.stats)

        def send_back(d: str) -> Any:
            mine = {k: WireTensor.from_torch(averaged[k]) for k in ups[d].tensors if k in averaged}
            reset = sorted(k for k in mine if k in refactorized)
            down = AdaptersDown(round=r, tensors=mine, reset_moments=reset)
            return self.call(d, down, timeout_s=self.round_timeout_s)

        synced = await self._each_device(list(ups), r, "averaging", send_back)
        st = result.stats
        self.log.info(
            "adapters_averaged",
            round=r,
            tensors=len(averaged),
            devices=len(ups),
            method=st.method,
            projections=st.projections,
            refactorized=st.refactorized,
            svd_error=round(st.svd_error, 6),
            fedavg_error=round(st.fedavg_error, 6),
            fedavg_error_max=round(st.fedavg_error_max, 6),
            ms=round(st.ms, 2),
        )
        return list(synced)

    async def _checkpoint(self, r: int, devices: list[str] | None = None) -> None:
        """Every server's and the in-step devices' state, with the run's history, on disk."""
        members = self.members.active if devices is None else devices
        self.store.relay_from = self._relay_from
        servers = await self._server_calls(StateRequest(round=r))
        states = await self._each_device(members, r, "checkpointing", lambda d: self._state_of(d, r))
        await self.store.checkpoint(r, self, [*servers, *states.values()])
        self._check_servers()

    async def _state_of(self, device: str, r: int) -> StateReport:
        return await self.call(device, StateRequest(round=r), timeout_s=self.round_timeout_s)


def _raise_if_diverged(exc: BaseException | None) -> None:
    """A device's round failed on a NaN/inf training loss: the run diverged, and dropping the
    device would only hide it. Raises :class:`NonFiniteLoss` (the run ends ``failed``)."""
    if isinstance(exc, NonFiniteLoss):  # raised here (non-finite adapters relayed in ``sl``)
        raise exc
    if isinstance(exc, RemoteError) and exc.remote_type == NonFiniteLoss.__name__:
        raise NonFiniteLoss(exc.remote_message)
