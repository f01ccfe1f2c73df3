"""The run summary (JSON) and the adapters written at the end of a run."""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sft_actors.train.files import atomic_write_bytes, safetensors_bytes, strict_json_bytes
from sft_actors.train.lora_average import AveragingStats
from sft_actors.wire.messages import RoundDone
from sft_actors.wire.plans import EvalStats


def median_or_zero(xs: list[float]) -> float:
    """The median of a possibly empty list of timings (0.0 when nothing was measured)."""
    return statistics.median(xs) if xs else 0.0


@dataclass(kw_only=True, slots=True)
class RoundRecord:
    round: int
    loss: float  # sample-weighted mean training loss over devices
    bytes_up: int
    bytes_down: int
    raw_up: int
    raw_down: int
    seconds: float
    step_ms_median: float
    encode_ms: float
    #: Transform-coding bases uploaded this round (first fits in a device's first round, then
    #: refits): their bytes are traffic too, counted in :attr:`ratio_total`.
    basis_bytes: int = 0
    basis_refits: int = 0
    per_device_loss: dict[str, float] = field(default_factory=dict)
    per_device_bytes_up: dict[str, int] = field(default_factory=dict)
    #: Devices dropped from this round (lost, late past the deadline, or failed) and why.
    devices_lost: dict[str, str] = field(default_factory=dict)
    #: Devices not in this round at all (lost or left before it began, not yet re-admitted).
    devices_absent: list[str] = field(default_factory=list)
    #: The LoRA averaging after this round (None: no averaging): see :func:`averaging_record`.
    averaging: dict[str, Any] | None = None

    @property
    def ratio_up(self) -> float:
        return self.raw_up / self.bytes_up if self.bytes_up else 1.0

    @property
    def ratio_down(self) -> float:
        return self.raw_down / self.bytes_down if self.bytes_down else 1.0

    @property
    def ratio_total(self) -> float:
        """Raw bytes both ways ÷ every byte sent: coded tensors both ways plus bases."""
        return _ratio(self.raw_up + self.raw_down, self.bytes_up + self.bytes_down + self.basis_bytes)


def _ratio(raw: int, sent: int) -> float:
    return raw / sent if sent else 1.0


def averaging_record(stats: AveragingStats) -> dict[str, Any]:
    """``rounds[i].averaging`` of ``summary.json``: ``method`` (fedavg | svd), ``projections``
    (LoRA pairs held by 2+ devices), ``refactorized`` (of those, re-factorized by SVD),
    ``svd_error`` / ``fedavg_error`` (‖ΔW − B'A'‖ / ‖ΔW‖ of the rank-r re-factorization and
    ‖B̄Ā − ΔW‖ / ‖ΔW‖ of FedAvg, over all those projections; ``*_max``: the worst one) and ``ms``."""
    return asdict(stats)


@dataclass(kw_only=True, slots=True)
class EvalRecord:
    round: int
    loss: float
    targets: int
    accuracy: float | None  # classification only
    perplexity: float | None  # language models only


def eval_record(round_: int, parts: Sequence[EvalStats]) -> EvalRecord:
    """Merge per-device held-out results (token- or sample-weighted)."""
    targets = sum(p.targets for p in parts)
    loss_sum = sum(p.loss_sum for p in parts)
    correct = sum(p.correct for p in parts)
    is_lm = any(p.task == "lm" for p in parts)
    loss = loss_sum / targets if targets else float("nan")
    return EvalRecord(
        round=round_,
        loss=loss,
        targets=targets,
        accuracy=None if is_lm else (correct / targets if targets else None),
        perplexity=math.exp(min(loss, 50.0)) if is_lm else None,
    )


def round_record(
    round_: int, done: Sequence[RoundDone], *, seconds: float, lost: dict[str, str] | None = None
) -> RoundRecord:
    """One round over the devices that finished it (``lost``: the others, and why):
    sample-weighted loss, summed bytes, median step time."""
    n = sum(m.n_samples for m in done)
    stats = [m.stats for m in done]
    return RoundRecord(
        round=round_,
        loss=sum(m.loss * m.n_samples for m in done) / max(1, n),
        bytes_up=sum(st.bytes_up for st in stats),
        bytes_down=sum(st.bytes_down for st in stats),
        raw_up=sum(st.raw_up for st in stats),
        raw_down=sum(st.raw_down for st in stats),
        seconds=seconds,
        step_ms_median=median_or_zero([st.step_ms_median for st in stats]),
        encode_ms=sum(st.encode_ms for st in stats),
        basis_bytes=sum(st.basis_bytes for st in stats),
        basis_refits=sum(st.basis_refits for st in stats),
        per_device_loss={m.device: round(m.loss, 5) for m in done},
        per_device_bytes_up={m.device: m.stats.bytes_up for m in done},
        devices_lost=dict(lost or {}),
    )


@dataclass(kw_only=True, slots=True)
class RunSummary:
    name: str
    mode: str
    model: str
    devices: dict[str, int]  # name -> cut
    rounds: list[RoundRecord] = field(default_factory=list)
    evals: list[EvalRecord] = field(default_factory=list)  # through the codec, as the system runs
    evals_raw: list[EvalRecord] = field(default_factory=list)  # activations uncompressed (sft only)
    wall_s: float = 0.0
    setup_s: float = 0.0
    run_dir: str = ""
    adapters: dict[str, str] = field(default_factory=dict)
    planner: dict[str, Any] = field(default_factory=dict)  # predicted vs measured round delay
    #: completed | interrupted | failed (``running`` in a checkpoint's copy), and why.
    status: str = "running"
    reason: str = ""
    #: Whether a rerun with the same seed gives the same bytes, and if not, why not.
    deterministic: bool = True
    nondeterminism: list[str] = field(default_factory=list)
    #: The last complete checkpoint: {"round": r, "path": …}.
    checkpoint: dict[str, Any] = field(default_factory=dict)
    #: Every ``--resume`` of this run, as the checkpoint round it continued after.
    resumes: list[int] = field(default_factory=list)
    #: Rounds aborted because a server was lost mid-round: {"round", "why", "rolled_back_to"}.
    rounds_aborted: list[dict[str, Any]] = field(default_factory=list)

    @property
    def resumed_from(self) -> int | None:
        """The round the last ``--resume`` continued after (None: never resumed)."""
        return self.resumes[-1] if self.resumes else None

    @property
    def devices_lost(self) -> int:
        """Device-rounds lost over the run (one device dropped from two rounds counts 2)."""
        return sum(len(r.devices_lost) for r in self.rounds)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSummary:
        """Inverse of :meth:`to_json` for the fields a resumed run continues from (history)."""
        names = {f for f in cls.__dataclass_fields__} - {"rounds", "evals", "evals_raw"}
        out = cls(**{k: v for k, v in data.items() if k in names})
        out.rounds = [RoundRecord(**r) for r in data.get("rounds", [])]
        out.evals = [EvalRecord(**e) for e in data.get("evals", [])]
        out.evals_raw = [EvalRecord(**e) for e in data.get("evals_raw", [])]
        return out

    @property
    def bytes_up(self) -> int:
        return sum(r.bytes_up for r in self.rounds)

    @property
    def bytes_down(self) -> int:
        return sum(r.bytes_down for r in self.rounds)

    def totals(self) -> dict[str, Any]:
        """``totals`` of ``summary.json``: bytes over the run and compression ratios (raw ÷ sent).

        ``ratio_up`` / ``ratio_down``: coded activations / gradients only; ``basis_bytes`` and
        ``basis_refits``: transform-coding bases uploaded (first fits and refits);
        ``ratio_up_with_basis``: activations with the bases; ``ratio_total``: both ways, bases
        included — the ratio a link actually saw."""
        raw_up = sum(r.raw_up for r in self.rounds)
        raw_down = sum(r.raw_down for r in self.rounds)
        basis = sum(r.basis_bytes for r in self.rounds)
        return {
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "basis_bytes": basis,
            "basis_refits": sum(r.basis_refits for r in self.rounds),
            "ratio_up": _ratio(raw_up, self.bytes_up),
            "ratio_down": _ratio(raw_down, self.bytes_down),
            "ratio_up_with_basis": _ratio(raw_up, self.bytes_up + basis),
            "ratio_total": _ratio(raw_up + raw_down, self.bytes_up + self.bytes_down + basis),
        }

    def headline(self) -> dict[str, Any]:
        """The few numbers a person reads first (``sft run`` prints them as one JSON line)."""
        full = self.to_json()
        keep = (
            "status",
            "reason",
            "devices_lost",
            "name",
            "mode",
            "model",
            "run_dir",
            "wall_s",
            "totals",
            "before",
            "after",
            "before_raw",
            "after_raw",
        )
        out_planner = {
            k: v for k, v in self.planner.items() if k in ("measured_round_s", "predicted_round_s")
        }
        out = {k: full[k] for k in keep if k in full}
        for key in ("before", "after", "before_raw", "after_raw"):
            if key in out:
                out[key] = {k: v for k, v in out[key].items() if k in ("loss", "perplexity", "accuracy")}
        if out_planner:
            out["planner"] = out_planner
        return out

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["devices_lost"] = self.devices_lost
        out["resumed_from"] = self.resumed_from
        out["totals"] = self.totals()
        # "after" is an evaluation after training: none yet in a run stopped before its end.
        if self.evals:
            out["before"] = asdict(self.evals[0])
            if self.evals[-1].round > self.evals[0].round:
                out["after"] = asdict(self.evals[-1])
        if self.evals_raw:
            out["before_raw"] = asdict(self.evals_raw[0])
            if self.evals_raw[-1].round > self.evals_raw[0].round:
                out["after_raw"] = asdict(self.evals_raw[-1])
        out["machine"] = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return out


def new_run_dir(base: str | Path, name: str) -> Path:
    """``base/name-YYYYmmdd-HHMMSS[-k]``: never overwrites an earlier run."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = Path(base) / f"{name}-{stamp}"
    path, k = root, 1
    while path.exists():
        path = Path(f"{root}-{k}")
        k += 1
    path.mkdir(parents=True)
    return path


def write_summary(summary: RunSummary, run_dir: Path) -> Path:
    """Write ``run_dir/summary.json`` atomically, as strict JSON: a non-finite number (a NaN
    loss, say) becomes ``null``. Returns the path."""
    data = strict_json_bytes(summary.to_json(), indent=2, sort_keys=False)
    return atomic_write_bytes(run_dir / "summary.json", data)


def write_adapters(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Write LoRA tensors and string metadata as safetensors, atomically and deterministically
    (equal tensors and metadata give byte-identical files). Returns ``path``."""
    return atomic_write_bytes(path, safetensors_bytes(tensors, metadata))
