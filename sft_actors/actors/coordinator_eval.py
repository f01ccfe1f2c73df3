"""Held-out evaluation, the planner's prediction and the result files of a run."""

from __future__ import annotations

import asyncio
from typing import Any

from sft_actors.actors.coordinator_base import CoordinatorBase
from sft_actors.errors import SftError
from sft_actors.topology import CODED_MODES
from sft_actors.train.claims import check_eval
from sft_actors.train.summary import EvalRecord, eval_record, median_or_zero
from sft_actors.wire import (
    AdaptersUp,
    EvalRequest,
)
from sft_actors.wire.coded import unpack_tensor


class EvaluatingCoordinator(CoordinatorBase):
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
        for m in replies:
            if isinstance(m, BaseException) and not isinstance(m, SftError):
                raise m
        stats, failed = [], []
        for d, m in zip(active, replies, strict=True):
            try:
                if isinstance(m, BaseException):
                    raise m
                tokens = self.train.seq_len if m.stats.task == "lm" else 1
                check_eval(m.stats, device=d, train=self.train, tokens_per_sample=tokens)
                stats.append(m.stats)
            except SftError as exc:
                failed.append(d)
                self.log.warning(
                    "heldout_share_refused", round=r, device=d, why=f"{type(exc).__name__}: {exc}"
                )
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
