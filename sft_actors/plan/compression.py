"""What compression buys (bytes) and costs (accuracy), from measured data the user can refit.

Bytes: a codec setting is ``(keep, bits, scope)`` — Top-K keep ratio κ, quantization bits and
sparsity scope (``none`` dense, ``tensor``/``token`` element-wise, ``tokens``/``channels``
structured, ``pca`` transform coding). Its *ratio* ρ = raw fp32 bytes ÷ encoded bytes comes
from ``data/codec_ratios.json``: measured entries first; a setting with no entry is estimated
as ``32 / (κ·b + index + scales)`` bits per element (index: binary entropy ``H(κ)`` for
element-wise scopes, ≈ 0 for structured ones; scales: two fp16 per token), times the median
measured/estimated factor of that scope. Refit from ``bench/codec.py --json`` output with
``python -m sft_actors.plan.refit codec`` (see ``refit.py``). A **rate-controlled** candidate
(one with ``ratio`` in the table: the transform family) needs no entry: its ratio is the target
rate control holds each frame to (±3 %, ``sft_actors/codec/rate.py``), both ways. A candidate
with ``preset`` takes its chains from :mod:`sft_actors.codec.presets` (``transform``,
``paper_topk``) instead of spelling them in ``chain``.

Accuracy: the relative loss Δ (0.25 = +25 % held-out perplexity) of a codec family at ratio ρ
is ``Δ(ρ) = a · (ρ − 1)^p`` (so Δ(1) = 0), fitted per family (``topk``: sparsify/quantize chains;
``transform``: rate-controlled transform coding, ``sft_actors.codec.presets``) and per basis
(``trained``: after LoRA training with the codec in the loop; ``untrained``) by least squares in
log space over measured points
(``accuracy.fit_accuracy_curve``; one point → exponent ``default_exponent``). Points and fits in
``data/accuracy_curve.json``. A plan's loss is the data-weighted mean of its devices' losses.

The planner chooses among a *menu* of settings; only Pareto-optimal ones (no other setting has
a higher ratio and no larger loss) are kept. For the relaxed problem the menu becomes the lower
convex hull of its points in (ln ρ, Δ): a convex, piecewise-linear ``Δ(s)`` of ``s = ln ρ``.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from sft_actors.codec import presets
from sft_actors.errors import ConfigError, PlanInfeasible
from sft_actors.plan.accuracy import AccuracyCurve, load_accuracy_curve
from sft_actors.plan.costs import AccuracyBasis

DATA_DIR = Path(__file__).parent / "data"
CODEC_TABLE_PATH = DATA_DIR / "codec_ratios.json"
SCOPES = ("none", "tensor", "token", "tokens", "channels", "pca")
FloatArray = npt.NDArray[np.float64]


def family_of(scope: str, bits: int | None) -> str:
    """Accuracy family of a setting: ``identity`` (lossless), ``transform`` or ``topk``."""
    if scope == "pca":
        return "transform"
    if scope == "none" and (bits is None or bits >= 32):
        return "identity"
    return "topk"


# --- bytes ----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, slots=True)
class CodecRatio:
    """One codec setting and its ratio (raw fp32 ÷ encoded); ``source`` says where it came from."""

    name: str
    keep: float
    bits: int | None
    scope: str
    ratio: float
    source: str = ""

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ConfigError(f"codec {self.name!r}: scope {self.scope!r}; use one of {', '.join(SCOPES)}")
        if not 0 < self.keep <= 1 or not self.ratio >= 1:
            raise ConfigError(f"codec {self.name!r}: need 0 < keep ≤ 1 and ratio ≥ 1")


def estimate_ratio(keep: float, bits: int | None, scope: str, hidden: int = 576) -> float:
    """Analytic ratio estimate (module doc) before the per-scope calibration."""
    if scope == "pca":
        raise ConfigError("transform coding (scope 'pca') has no analytic ratio; add a measured entry")
    b = 32 if bits is None else bits
    if scope == "none" and b >= 16:
        return 32.0 / b
    if scope in ("tensor", "token") and keep < 1:
        index = -(keep * math.log2(keep) + (1 - keep) * math.log2(1 - keep))
    elif scope in ("tokens", "channels"):
        index = 1.0 / hidden
    else:
        index = 0.0
    scales = 32.0 / hidden if b < 16 else 0.0
    return 32.0 / (keep * b + index + scales)


@dataclass(frozen=True, kw_only=True, slots=True)
class CodecTable:
    """Measured ratios, and the candidate settings (``candidates``) the planner chooses among."""

    entries: tuple[CodecRatio, ...]
    candidates: tuple[Mapping[str, Any], ...] = ()
    hidden: int = 576

    def calibration(self, scope: str) -> float:
        """Median measured ÷ estimated ratio over this scope's entries (1 with none)."""
        factors = [
            e.ratio / estimate_ratio(e.keep, e.bits, e.scope, self.hidden)
            for e in self.entries
            if e.scope == scope and e.scope != "pca" and family_of(e.scope, e.bits) != "identity"
        ]
        return float(np.median(factors)) if factors else 1.0

    def ratio(self, keep: float, bits: int | None, scope: str) -> float:
        """Ratio of a setting: the measured entry when there is one, else the calibrated estimate."""
        for e in self.entries:
            if e.scope == scope and math.isclose(e.keep, keep) and e.bits == bits:
                return e.ratio
        return max(1.0, estimate_ratio(keep, bits, scope, self.hidden) * self.calibration(scope))

    def to_json(self) -> dict[str, Any]:
        return {
            "hidden": self.hidden,
            "entries": [
                {
                    "name": e.name,
                    "keep": e.keep,
                    "bits": e.bits,
                    "scope": e.scope,
                    "ratio": e.ratio,
                    "source": e.source,
                }
                for e in self.entries
            ],
            "candidates": [dict(c) for c in self.candidates],
        }


def load_codec_table(path: Path | str | None = None) -> CodecTable:
    """Read ``codec_ratios.json`` (default: the packaged one)."""
    p = Path(path) if path is not None else CODEC_TABLE_PATH
    try:
        raw = json.loads(p.read_text())
        entries = tuple(CodecRatio(**e) for e in raw["entries"])
        return CodecTable(
            entries=entries, candidates=tuple(raw.get("candidates", ())), hidden=int(raw.get("hidden", 576))
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"codec ratio table {p}: {e}; refit it with python -m sft_actors.plan.refit codec"
        ) from e


def codec_entry_from_bench(
    record: Mapping[str, Any],
    *,
    name: str | None = None,
    keep: float | None = None,
    bits: int | None = None,
    scope: str | None = None,
) -> CodecRatio:
    """A table entry from one ``bench/codec.py --json`` result (its last line, parsed).

    The record must hold ``ratio``; ``keep``/``bits``/``scope`` come from the record or the
    arguments (arguments win, for benches that do not echo their flags).
    """
    if "ratio" not in record:
        raise ConfigError("bench record has no 'ratio'; pass the last line of bench/codec.py --json")
    k = float(keep if keep is not None else record.get("keep", 1.0))
    b = bits if bits is not None else record.get("bits")
    s = str(scope if scope is not None else record.get("scope", "tensor"))
    label = name or f"{s}-k{k:g}-b{b}"
    return CodecRatio(
        name=label,
        keep=k,
        bits=None if b is None else int(b),
        scope=s,
        ratio=float(record["ratio"]),
        source="measured: bench/codec.py",
    )


def refit_codec_table(table: CodecTable, new_entries: Iterable[CodecRatio]) -> CodecTable:
    """The table with ``new_entries`` added, replacing entries of the same (keep, bits, scope)."""
    entries = list(table.entries)
    for new in new_entries:
        entries = [
            e
            for e in entries
            if not (e.scope == new.scope and math.isclose(e.keep, new.keep) and e.bits == new.bits)
        ]
        entries.append(new)
    return CodecTable(entries=tuple(entries), candidates=table.candidates, hidden=table.hidden)


# --- the menu the planner chooses from --------------------------------------------------------
@dataclass(frozen=True, kw_only=True, slots=True)
class CompressionOption:
    """A codec setting with its ratio (up; ``down_ratio`` for gradients) and accuracy loss."""

    name: str
    family: str
    keep: float
    bits: int | None
    scope: str
    ratio: float
    loss: float
    chain: Mapping[str, Any] = field(default_factory=dict)  # the codec's chain table (ChainSpec.parse)
    # The gradient chain when it is not the activation chain less its ``project`` stage (presets).
    down_chain: Mapping[str, Any] | None = None
    rate_controlled: bool = False  # ``ratio`` is rate control's target, not a measured ratio
    down_ratio: float | None = None  # the gradients' ratio when it differs from ``ratio``

    @property
    def ratio_down(self) -> float:
        """Raw ÷ coded bytes of the gradients (``ratio`` unless the chain says otherwise)."""
        return self.ratio if self.down_ratio is None else self.down_ratio

    def tables(self) -> dict[str, dict[str, Any]]:
        """The ``{up, down}`` tables of this codec, as a topology's ``[run.codec]`` holds them."""
        up = copy.deepcopy(dict(self.chain))
        if self.down_chain is not None:
            return {"up": up, "down": copy.deepcopy(dict(self.down_chain))}
        # A basis is fitted on activations and means nothing for gradients (the codec refuses
        # a projected gradient chain): the gradients get the chain without ``project``.
        return {"up": up, "down": {k: v for k, v in copy.deepcopy(up).items() if k != "project"}}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "keep": self.keep,
            "bits": self.bits,
            "scope": self.scope,
            "ratio": self.ratio,
            "loss": self.loss,
            "rate_controlled": self.rate_controlled,
            "ratio_down": self.ratio_down,
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class CompressionMenu:
    """Pareto-optimal options sorted by ratio (ascending, so loss ascends too)."""

    options: tuple[CompressionOption, ...]

    def __post_init__(self) -> None:
        if not self.options:
            raise ConfigError("the compression menu is empty; keep at least the identity codec")

    @property
    def ratios(self) -> FloatArray:
        return np.array([o.ratio for o in self.options], dtype=np.float64)

    @property
    def down_ratios(self) -> FloatArray:
        return np.array([o.ratio_down for o in self.options], dtype=np.float64)

    @property
    def losses(self) -> FloatArray:
        return np.array([o.loss for o in self.options], dtype=np.float64)

    @property
    def log_ratios(self) -> FloatArray:
        return np.log(self.ratios)

    def hull(self) -> tuple[FloatArray, FloatArray]:
        """Vertices (s = ln ρ, Δ) of the lower convex hull, s ascending."""
        pts = sorted(zip(self.log_ratios.tolist(), self.losses.tolist(), strict=True))
        hull: list[tuple[float, float]] = []
        for p in pts:
            while len(hull) >= 2:
                (x1, y1), (x2, y2) = hull[-2], hull[-1]
                if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:  # not a left turn
                    hull.pop()
                else:
                    break
            hull.append(p)
        xs, ys = zip(*hull, strict=True)
        return np.array(xs, dtype=np.float64), np.array(ys, dtype=np.float64)

    def nearest(self, log_ratio: FloatArray) -> npt.NDArray[np.int64]:
        """Index of the option whose ln ρ is nearest to each ``log_ratio``."""
        s = self.log_ratios
        return np.asarray(np.argmin(np.abs(np.asarray(log_ratio)[..., None] - s), axis=-1), dtype=np.int64)

    def restricted(self, names: Iterable[str]) -> CompressionMenu:
        wanted = set(names)
        unknown = wanted - {o.name for o in self.options}
        if unknown:
            raise ConfigError(
                f"codec options {sorted(unknown)} are not in the menu {[o.name for o in self.options]}"
            )
        return CompressionMenu(options=tuple(o for o in self.options if o.name in wanted))


def pareto(options: Iterable[CompressionOption]) -> tuple[CompressionOption, ...]:
    """Options no other beats (higher ratio with no larger loss, or equal ratio and lower loss)."""
    ordered = sorted(options, key=lambda o: (-o.ratio, o.loss))
    kept: list[CompressionOption] = []
    best_loss = math.inf
    for o in ordered:  # ratio descending: keep an option only if it lowers the best loss so far
        if o.loss < best_loss:
            kept.append(o)
            best_loss = o.loss
    return tuple(reversed(kept))


def _down_target(tables: Mapping[str, Any]) -> float | None:
    """The gradient chain's rate-control target, if it has one."""
    ratio = tables.get("down", {}).get("quantize", {}).get("ratio")
    return None if ratio is None else float(ratio)


def candidate_tables(candidate: Mapping[str, Any], ratio: float) -> dict[str, dict[str, Any]]:
    """``{up[, down]}`` chain tables of a table candidate: its ``preset``'s (at ``ratio`` for a
    rate-controlled one) or its ``chain`` (``up`` only; ``down`` is derived, see ``tables``)."""
    preset = candidate.get("preset")
    if preset is None:
        return {"up": dict(candidate.get("chain", {}))}
    if preset == "transform":
        return presets.transform_tables(ratio)
    if preset == "paper_topk":
        return presets.paper_topk_tables()
    raise ConfigError(
        f"codec candidate {candidate.get('name')!r}: preset {preset!r}; use 'transform' or 'paper_topk'"
    )


def build_menu(
    table: CodecTable | None = None,
    curve: AccuracyCurve | None = None,
    *,
    basis: AccuracyBasis = "trained",
    names: Iterable[str] | None = None,
    max_loss: float | None = None,
    pareto_only: bool = True,
) -> CompressionMenu:
    """The planner's menu: the table's candidates with ratios and losses, Pareto-filtered.

    ``names`` restricts the candidates; ``max_loss`` drops options whose own loss exceeds it.
    """
    table = table or load_codec_table()
    curve = curve or load_accuracy_curve()
    wanted = set(names) if names is not None else None
    options = []
    for c in table.candidates:
        if wanted is not None and c["name"] not in wanted:
            continue
        bits = c.get("bits")
        scope = str(c.get("scope", "none"))
        target = c.get("ratio")  # rate-controlled: the target is the ratio (±3 %)
        ratio = float(target) if target is not None else table.ratio(float(c.get("keep", 1.0)), bits, scope)
        family = family_of(scope, bits)
        loss = curve.loss(family, ratio, basis)
        if max_loss is not None and loss > max_loss:
            continue
        tables = candidate_tables(c, ratio)
        options.append(
            CompressionOption(
                name=str(c["name"]),
                family=family,
                keep=float(c.get("keep", 1.0)),
                bits=bits,
                scope=scope,
                ratio=ratio,
                loss=loss,
                chain=tables["up"],
                down_chain=tables.get("down"),
                rate_controlled=target is not None,
                down_ratio=_down_target(tables),
            )
        )
    if wanted is not None:
        missing = wanted - {c["name"] for c in table.candidates}
        if missing:
            raise ConfigError(f"codec candidates {sorted(missing)} are not in the codec table")
    if not options:
        raise PlanInfeasible(
            "no codec candidate is left in the menu; add the identity codec to the candidates"
        )
    if not pareto_only:  # every candidate, by ratio (to price a given codec, not to choose one)
        return CompressionMenu(options=tuple(sorted(options, key=lambda o: (o.ratio, o.loss))))
    return CompressionMenu(options=pareto(options))
