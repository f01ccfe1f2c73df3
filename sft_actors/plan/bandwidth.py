"""Fast timescale: split the band among devices so the slowest device finishes first.

Given each device's per-round delay as a function of its bandwidth ``B`` (Hz),

    D_n(B) = a_n + u_n / r(B, P↑_n) + v_n / r(B, P↓_n)        (seconds per round)

with ``a_n`` the compute time (s), ``u_n``/``v_n`` the bits sent up/down per round and
``r(B, P) = B·log2(1 + P/B)`` (see ``channel``), solve

    minimise max_n D_n(B_n)   s.t.  Σ B_n ≤ B_total,  B_n ≥ B_min.

:func:`slsqp_bandwidth` solves the epigraph form (min t s.t. D_n ≤ t) with scipy's SLSQP — the
general method, used for the plan's allocation. :func:`minmax_bandwidth` solves the same problem
exactly and fast for this structure, vectorised over a batch of plans: ``1/r`` is convex and
decreasing in ``B`` (``y/log2(1+P·y)`` is concave increasing in ``y = 1/B``), so each device's
required bandwidth at a delay level ``t`` comes from a Newton iteration that converges
monotonically from below, and the total required bandwidth is convex decreasing in ``t``, so a
second monotone Newton iteration finds the level where it equals ``B_total``. Given the split of
a nearby problem (``hint``), a Newton iteration on the whole system (all ``B_n`` and ``t``)
converges in a few steps instead; the monotone method is the fallback. The slow timescale and the
exhaustive baseline use it to score candidate plans; it also checks SLSQP's answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize

from sft_actors.errors import PlanInfeasible
from sft_actors.plan.channel import shannon_rate

FloatArray = npt.NDArray[np.float64]
LN2 = math.log(2.0)


def link_delay(
    bw: FloatArray, a: FloatArray, u: FloatArray, v: FloatArray, snr_up: FloatArray, snr_down: FloatArray
) -> FloatArray:
    """``D(B)`` of the module doc, elementwise (seconds)."""
    return a + u / shannon_rate(bw, snr_up) + v / shannon_rate(bw, snr_down)


def _rate_slope(bw: FloatArray, snr: FloatArray) -> FloatArray:
    """``dr/dB`` (bit/s per Hz)."""
    x = snr / bw
    return np.log2(1.0 + x) - x / ((1.0 + x) * LN2)


def link_delay_slope(
    bw: FloatArray, u: FloatArray, v: FloatArray, snr_up: FloatArray, snr_down: FloatArray
) -> FloatArray:
    """``dD/dB`` (seconds per Hz, negative)."""
    r_up, r_dn = shannon_rate(bw, snr_up), shannon_rate(bw, snr_down)
    return -u * _rate_slope(bw, snr_up) / r_up**2 - v * _rate_slope(bw, snr_down) / r_dn**2


def airtime(
    y: FloatArray, u: FloatArray, v: FloatArray, pu: FloatArray, pd: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Transmission time ``u/r + v/r`` at ``y = 1/B`` and its derivative in ``y``."""
    lu, ld = np.log2(1.0 + pu * y), np.log2(1.0 + pd * y)
    phi = u * y / lu + v * y / ld
    dlu = pu * y / ((1.0 + pu * y) * LN2)
    dld = pd * y / ((1.0 + pd * y) * LN2)
    dphi = u * (lu - dlu) / lu**2 + v * (ld - dld) / ld**2
    return phi, dphi


def solve_airtime(
    y: FloatArray,
    target: FloatArray,
    u: FloatArray,
    v: FloatArray,
    pu: FloatArray,
    pd: FloatArray,
    rtol: float,
    max_iter: int,
) -> tuple[FloatArray, FloatArray]:
    """Newton on ``φ(y) = target`` from ``y`` (≤ root): monotone because φ is concave increasing."""
    dphi = np.ones_like(y)
    for _ in range(max_iter):
        phi, dphi = airtime(y, u, v, pu, pd)
        gap = target - phi
        if np.all(gap <= rtol * np.abs(target)):
            break
        y = y + np.maximum(gap, 0.0) / dphi
    return y, dphi


def _check_band(n: int, total_hz: float, min_hz: float) -> None:
    if n * min_hz > total_hz * (1 + 1e-12):
        raise PlanInfeasible(
            f"{n} devices × b_min_hz {min_hz:g} Hz exceed the band of {total_hz:g} Hz; "
            "lower b_min_hz or add bandwidth"
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Allocation:
    """A bandwidth split: Hz per device, each device's delay (s), the max, and how it was found."""

    bandwidth_hz: FloatArray
    delays_s: FloatArray
    max_delay_s: FloatArray
    method: str
    iterations: int = 0


def minmax_bandwidth(
    a: FloatArray,
    u: FloatArray,
    v: FloatArray,
    snr_up: FloatArray,
    snr_down: FloatArray,
    total_hz: float,
    min_hz: float,
    *,
    rtol: float = 1e-9,
    max_iter: int = 100,
    hint: Allocation | None = None,
) -> Allocation:
    """Exact min-max split over the last axis; leading axes are independent plans (a batch).

    ``hint``, the split of a nearby problem (same shape), starts the iteration near the answer;
    it is used only where it provably lies below the answer, so the result does not depend on it.
    """
    a, u, v = (np.asarray(x, dtype=np.float64) for x in (a, u, v))
    pu, pd = np.broadcast_to(snr_up, a.shape), np.broadcast_to(snr_down, a.shape)
    n = a.shape[-1]
    _check_band(n, total_hz, min_hz)
    top = total_hz - (n - 1) * min_hz
    # At t_lo one device needs everything the others leave it: Σ required ≥ B_total there.
    t = np.max(link_delay(np.full(a.shape, top), a, u, v, pu, pd), axis=-1)
    y = np.full(a.shape, 1.0 / top)
    if hint is not None and a.ndim == 1:
        joint = _joint_newton(hint, a, u, v, pu, pd, total_hz, min_hz, rtol)
        if joint is not None:
            return _finish(joint[0], a, u, v, pu, pd, total_hz, min_hz, "newton(joint)", joint[1])
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 — reported below
        # The inner solve is kept 100x tighter than the outer test, or rounding stalls the outer one.
        y, dphi = solve_airtime(y, t[..., None] - a, u, v, pu, pd, rtol * 1e-2, max_iter)
        need = 1.0 / y
        clipped = need <= min_hz
        excess = np.sum(np.maximum(need, min_hz), axis=-1) - total_hz
        if np.all(excess <= rtol * total_hz):
            break
        # dB/dt = 1 / (dD/dB) = −1 / (φ'(y)·y²) for devices above B_min.
        slope = np.sum(np.where(clipped, 0.0, -1.0 / (dphi * y * y)), axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            step = np.where((excess > 0) & (slope < 0), -excess / slope, 0.0)
        if np.all(step <= 1e-14 * t):
            break
        t = t + step
    return _finish(y, a, u, v, pu, pd, total_hz, min_hz, "newton", iterations)


def _finish(
    y: FloatArray,
    a: FloatArray,
    u: FloatArray,
    v: FloatArray,
    pu: FloatArray,
    pd: FloatArray,
    total_hz: float,
    min_hz: float,
    method: str,
    iterations: int,
) -> Allocation:
    bw = np.maximum(1.0 / y, min_hz)
    # Hand the rounding slack to devices above B_min (their delay only drops).
    slack = total_hz - np.sum(bw, axis=-1, keepdims=True)
    free = bw > min_hz
    count = np.maximum(np.sum(free, axis=-1, keepdims=True), 1)
    bw = bw + np.where(free, np.maximum(slack, 0.0) / count, 0.0)
    delays = link_delay(bw, a, u, v, pu, pd)
    return Allocation(
        bandwidth_hz=bw,
        delays_s=delays,
        max_delay_s=np.max(delays, axis=-1),
        method=method,
        iterations=iterations,
    )


def _joint_newton(
    hint: Allocation,
    a: FloatArray,
    u: FloatArray,
    v: FloatArray,
    pu: FloatArray,
    pd: FloatArray,
    total_hz: float,
    min_hz: float,
    rtol: float,
    max_iter: int = 30,
) -> tuple[FloatArray, int] | None:
    """Newton on the whole system (``D_n(B_n) = t`` above ``B_min``, ``Σ B_n = B_total``) from a
    nearby split: one airtime evaluation per step. Returns ``(y = 1/B, steps)``, or None when it
    does not converge (the caller then runs the monotone method)."""
    y = 1.0 / np.maximum(np.asarray(hint.bandwidth_hz, dtype=np.float64), min_hz)
    t = float(np.max(link_delay(1.0 / y, a, u, v, pu, pd)))
    floor_delay = link_delay(np.full(a.shape, max(min_hz, 1e-9)), a, u, v, pu, pd) if min_hz > 0 else None
    for step in range(1, max_iter + 1):
        free = np.ones(a.shape, dtype=bool) if floor_delay is None else floor_delay > t
        y = np.where(free, y, 1.0 / min_hz) if floor_delay is not None else y
        phi, dphi = airtime(y, u, v, pu, pd)
        resid = np.where(free, phi + a - t, 0.0)
        excess = float(np.sum(1.0 / y)) - total_hz
        if np.max(np.abs(resid)) <= rtol * 1e-2 * t and abs(excess) <= rtol * total_hz:
            return y, step
        w = np.where(free, 1.0 / (y * y * dphi), 0.0)
        if w.sum() <= 0:
            return None
        dt = (excess + float(np.sum(w * resid))) / float(w.sum())
        dy = np.where(free, (dt - resid) / dphi, 0.0)
        y_new = y + dy
        if np.any(y_new <= 0):  # damp a step that would cross B = ∞
            y_new = np.where(y_new <= 0, 0.5 * y, y_new)
        y, t = y_new, t + dt
    return None


def equal_bandwidth(
    a: FloatArray, u: FloatArray, v: FloatArray, snr_up: FloatArray, snr_down: FloatArray, total_hz: float
) -> Allocation:
    """Every device gets ``B_total / N``."""
    bw = np.full(np.shape(a), total_hz / np.shape(a)[-1])
    delays = link_delay(bw, a, u, v, snr_up, snr_down)
    return Allocation(bandwidth_hz=bw, delays_s=delays, max_delay_s=np.max(delays, axis=-1), method="equal")


def slsqp_bandwidth(
    a: FloatArray,
    u: FloatArray,
    v: FloatArray,
    snr_up: FloatArray,
    snr_down: FloatArray,
    total_hz: float,
    min_hz: float,
    *,
    start_hz: FloatArray | None = None,
    max_iter: int = 300,
    ftol: float = 1e-10,
) -> Allocation:
    """SLSQP on ``min τ s.t. D_n(b_n·B_total)/T ≤ τ, Σ b_n ≤ 1, b_n ≥ B_min/B_total`` (one plan).

    Starts from ``start_hz`` (default: the equal split). Delays are scaled by the equal split's
    max delay ``T`` so that the solver sees numbers near 1.
    """
    n = len(a)
    _check_band(n, total_hz, min_hz)
    scale = float(equal_bandwidth(a, u, v, snr_up, snr_down, total_hz).max_delay_s)
    b0 = np.full(n, 1.0 / n) if start_hz is None else np.asarray(start_hz, dtype=np.float64) / total_hz
    b0 = np.maximum(b0, min_hz / total_hz)
    tau0 = float(np.max(link_delay(b0 * total_hz, a, u, v, snr_up, snr_down))) / scale
    result = minimize(
        _epigraph_objective,
        np.append(b0, tau0),
        jac=True,
        method="SLSQP",
        bounds=[(min_hz / total_hz, 1.0)] * n + [(0.0, None)],
        constraints=_epigraph_constraints(a, u, v, snr_up, snr_down, total_hz, scale),
        options={"maxiter": max_iter, "ftol": ftol},
    )
    b = np.clip(result.x[:n], min_hz / total_hz, 1.0)
    if b.sum() > 1.0:  # within SLSQP's tolerance; make the budget hold exactly
        b = b / b.sum()
    bw = b * total_hz
    delays = link_delay(bw, a, u, v, snr_up, snr_down)
    method = "slsqp" if result.success else f"slsqp({result.message})"
    return Allocation(
        bandwidth_hz=bw,
        delays_s=delays,
        max_delay_s=np.asarray(np.max(delays)),
        method=method,
        iterations=int(result.nit),
    )


def _epigraph_objective(z: FloatArray) -> tuple[float, FloatArray]:
    """τ, the last entry of ``z = [b_1 … b_N, τ]``, and its gradient."""
    g = np.zeros(z.size)
    g[-1] = 1.0
    return float(z[-1]), g


def _epigraph_constraints(
    a: FloatArray,
    u: FloatArray,
    v: FloatArray,
    snr_up: FloatArray,
    snr_down: FloatArray,
    total_hz: float,
    scale: float,
) -> list[dict[str, Any]]:
    """SLSQP constraints on z = [b, τ], with Jacobians: D_n(b_n·B_total)/scale ≤ τ, Σ b_n ≤ 1."""
    n = len(a)

    def delay_gap(z: FloatArray) -> FloatArray:  # τ − D_n/T ≥ 0
        return np.asarray(z[n] - link_delay(z[:n] * total_hz, a, u, v, snr_up, snr_down) / scale)

    def delay_gap_jac(z: FloatArray) -> FloatArray:
        jac = np.zeros((n, n + 1))
        jac[np.arange(n), np.arange(n)] = (
            -link_delay_slope(z[:n] * total_hz, u, v, snr_up, snr_down) * total_hz / scale
        )
        jac[:, n] = 1.0
        return jac

    budget_jac = np.append(-np.ones(n), 0.0)
    return [
        {"type": "ineq", "fun": delay_gap, "jac": delay_gap_jac},
        {
            "type": "ineq",
            "fun": lambda z: np.array([1.0 - np.sum(z[:n])]),
            "jac": lambda z: budget_jac[None, :],
        },
    ]
