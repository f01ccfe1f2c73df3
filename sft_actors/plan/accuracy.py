"""Accuracy loss as a function of compression, fitted from measured runs (see ``compression``).

The relative loss Δ (0.25 = +25 % held-out perplexity) of a codec family at ratio ρ is
``Δ(ρ) = a · (ρ − 1)^p`` (so Δ(1) = 0), fitted per family (``topk``: sparsify/quantize chains;
``transform``: rate-controlled transform coding, ``sft_actors.codec.presets``) and per basis
(``trained``: after LoRA training with the codec in the loop; ``untrained``) by least squares in
log space (:func:`fit_accuracy_curve`). Points and fits live in ``data/accuracy_curve.json``;
refit with ``python -m sft_actors.plan.refit accuracy`` (``--from-bench`` takes the points of
``bench/compression.py``). A point's ``ratio`` is the activation (``up``) chain's ratio — the
planner's ρ; the menu's chains use ρ both ways, and the gradient ratio moves the loss little
(transform up 24×: down 16× or 24× lose 4.7 % or 5.1 %).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sft_actors.errors import ConfigError
from sft_actors.plan.costs import AccuracyBasis

ACCURACY_CURVE_PATH = Path(__file__).parent / "data" / "accuracy_curve.json"


@dataclass(frozen=True, kw_only=True, slots=True)
class AccuracyPoint:
    """A measured run: codec family, its ratio, and the relative loss (trained or untrained)."""

    family: str
    ratio: float
    loss: float
    basis: AccuracyBasis
    note: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class AccuracyFit:
    """``Δ(ρ) = a · (ρ − 1)^p`` for one family and basis."""

    family: str
    basis: AccuracyBasis
    a: float
    p: float

    def loss(self, ratio: float) -> float:
        return float(self.a * max(ratio - 1.0, 0.0) ** self.p)


@dataclass(frozen=True, kw_only=True, slots=True)
class AccuracyCurve:
    """Fitted accuracy loss per (family, basis), with the points it was fitted on."""

    fits: tuple[AccuracyFit, ...]
    points: tuple[AccuracyPoint, ...] = ()

    def loss(self, family: str, ratio: float, basis: AccuracyBasis = "trained") -> float:
        if family == "identity":
            return 0.0
        for f in self.fits:
            if f.family == family and f.basis == basis:
                return f.loss(ratio)
        raise ConfigError(
            f"no accuracy fit for codec family {family!r} ({basis}); add measured points and refit "
            "(python -m sft_actors.plan.refit accuracy)"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "model": "loss = a * (ratio - 1) ** p, per family and basis",
            "points": [
                {"family": p.family, "ratio": p.ratio, "loss": p.loss, "basis": p.basis, "note": p.note}
                for p in self.points
            ],
            "fits": [{"family": f.family, "basis": f.basis, "a": f.a, "p": f.p} for f in self.fits],
        }


def fit_accuracy_curve(points: Sequence[AccuracyPoint], *, default_exponent: float = 2.0) -> AccuracyCurve:
    """Fit ``Δ = a·(ρ−1)^p`` per (family, basis) by least squares on ``ln Δ`` vs ``ln(ρ−1)``.

    Points at ρ ≤ 1 or Δ ≤ 0 carry no slope information (the form passes through (1, 0)) and
    are kept but not fitted. A group with one usable point gets ``p = default_exponent``.
    """
    groups: dict[tuple[str, AccuracyBasis], list[AccuracyPoint]] = {}
    for pt in points:
        groups.setdefault((pt.family, pt.basis), []).append(pt)
    fits = []
    for (family, basis), pts in sorted(groups.items()):
        usable = [p for p in pts if p.ratio > 1.0 and p.loss > 0.0]
        if family == "identity" or not usable:
            continue
        x = np.log([p.ratio - 1.0 for p in usable])
        y = np.log([p.loss for p in usable])
        if len(usable) == 1 or np.ptp(x) == 0:
            p_exp = default_exponent
            ln_a = float(np.mean(y - p_exp * x))
        else:
            p_exp, ln_a = (float(v) for v in np.polyfit(x, y, 1))
        fits.append(AccuracyFit(family=family, basis=basis, a=math.exp(ln_a), p=p_exp))
    return AccuracyCurve(fits=tuple(fits), points=tuple(points))


def load_accuracy_curve(path: Path | str | None = None) -> AccuracyCurve:
    """Read ``accuracy_curve.json``; stored fits are used as they are, missing ones refitted."""
    p = Path(path) if path is not None else ACCURACY_CURVE_PATH
    try:
        raw = json.loads(p.read_text())
        points = tuple(AccuracyPoint(**pt) for pt in raw.get("points", ()))
        if raw.get("fits"):
            return AccuracyCurve(fits=tuple(AccuracyFit(**f) for f in raw["fits"]), points=points)
        return fit_accuracy_curve(points)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"accuracy curve {p}: {e}; refit it with python -m sft_actors.plan.refit accuracy"
        ) from e
