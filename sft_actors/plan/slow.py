"""Slow timescale: cuts and codecs by an augmented Lagrangian over the relaxed problem.

Relaxation (per device n): the cut ``c_n`` is real in ``[lo, hi]``; the codec becomes its log
ratio ``s_n = ln ρ_n ∈ [0, ln ρ_max]``, whose accuracy loss is the lower convex hull of the menu
(``compression``), so the relaxed loss is a convex mix of real options. The bandwidth split is
not a variable: for given (c, s) the optimal split's round time ``t*(c, s)`` comes from the exact
min-max solver (``bandwidth``), with its gradient from the implicit function theorem. With the
round time as an epigraph variable ``τ`` (scaled by a reference round time ``T_ref``):

    minimise  (1 + γ·Δ(s)) · τ
    s.t.      t*(c, s)/T_ref ≤ τ                (the slowest path fits in the round)
              F(c)/T_ref ≤ τ                    (the shared server's work fits in the round)
              M_n(c_n) ≤ memory_n                (memory, every device)
              Δ(s) ≤ Δ_max                       (accuracy)

with the models of ``model`` (γ = rounds_per_loss). The augmented Lagrangian
(Powell–Hestenes–Rockafellar, for inequalities) minimises
``f + Σ_i [max(0, λ_i + ρ·g_i)² − λ_i²] / 2ρ`` over the box with L-BFGS-B and analytic
gradients, updates ``λ_i ← max(0, λ_i + ρ·g_i)`` and raises ``ρ`` while the violation does not
halve. (Keeping the split inside ``t*`` rather than as N more variables with N epigraph
constraints matters: the min-max epigraph converged poorly under the penalty.)

Rounding and repair: cuts round to the nearest integer within ``[lo, memory cap]``; codecs to
the option on the hull nearest in ``ln ρ``; while the accuracy limit is exceeded, the device
whose step to a more accurate codec buys the most accuracy takes it. A local search then ranks
every single move (a cut ±1 block, a codec one step up or down the menu) by a first-order
estimate, scores the best few exactly (integer plan, optimal split) and takes the first that
gains more than ``min_gain``, until none does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize

from sft_actors.plan.bandwidth import Allocation, airtime, link_delay_slope, minmax_bandwidth, solve_airtime
from sft_actors.plan.channel import shannon_rate
from sft_actors.plan.model import IntArray, Score, Terms, rounds, score

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, kw_only=True, slots=True)
class Relaxed:
    """The relaxed optimum: real cuts, log ratios, bandwidth shares; and how the solve went."""

    cuts: FloatArray
    log_ratios: FloatArray
    shares: FloatArray
    objective: float
    violation: float
    outer_iterations: int
    inner_iterations: int


class _Relaxation:
    """Objective, constraints and gradients in normalised variables ``x = [xc, xs, τ]``.

    ``c = lo + span·xc``, ``s = s_max·xs``. The path constraint uses the exact min-max split
    ``t*(c, s)`` (``bandwidth.minmax_bandwidth``); its gradient follows from the implicit
    function theorem on ``Σ_n B_n(t) = B_total``: ``∂t*/∂θ_n = μ_n·∂D_n/∂θ_n`` with
    ``μ_n ∝ 1/|∂D_n/∂B|`` over devices above ``B_min`` (``Σ μ = 1``).
    """

    def __init__(
        self, terms: Terms, hull: tuple[FloatArray, FloatArray], cut_lo: FloatArray, cut_hi: FloatArray
    ) -> None:
        self.t = terms
        self.n = terms.n
        self.hull_s, self.hull_loss = hull
        self.s_max = float(self.hull_s[-1])
        self.c_lo, self.c_span = cut_lo, cut_hi - cut_lo
        self.acc_scale = max(terms.max_loss, 1e-2)
        self.gamma_down = 1.0 if terms.compress_down else 0.0
        self.t_ref = 1.0
        self.shares = np.full(self.n, 1.0 / self.n)
        self.last: Allocation | None = None  # warm start for the next split

    def unpack(self, x: FloatArray) -> tuple[FloatArray, FloatArray, float]:
        n = self.n
        return self.c_lo + self.c_span * x[:n], self.s_max * x[n : 2 * n], float(x[2 * n])

    def loss_curve(self, s: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Hull loss and its slope at ``s``."""
        if len(self.hull_s) == 1:
            return np.zeros_like(s), np.zeros_like(s)
        loss = np.interp(s, self.hull_s, self.hull_loss)
        seg = np.clip(np.searchsorted(self.hull_s, s, side="right") - 1, 0, len(self.hull_s) - 2)
        slope = (self.hull_loss[seg + 1] - self.hull_loss[seg]) / (self.hull_s[seg + 1] - self.hull_s[seg])
        return loss, slope

    def round_time(self, c: FloatArray, s: FloatArray) -> tuple[float, FloatArray, FloatArray]:
        """``t*`` (s), and its gradients in ``c`` and ``s``."""
        t = self.t
        x_up = t.act_bits * np.exp(-s)
        x_dn = t.act_bits * np.exp(-self.gamma_down * s)
        up, dn = x_up + t.lora_bits * c, x_dn + t.lora_bits * c
        alloc = minmax_bandwidth(
            t.a0 + t.a1 * c, up, dn, t.snr_up, t.snr_down, t.total_hz, t.min_hz, hint=self.last
        )
        self.last = alloc
        bw = alloc.bandwidth_hz
        self.shares = bw / t.total_hz
        phi_up, phi_dn = 1.0 / shannon_rate(bw, t.snr_up), 1.0 / shannon_rate(bw, t.snr_down)
        slope = link_delay_slope(bw, up, dn, t.snr_up, t.snr_down)
        free = bw > t.min_hz * (1 + 1e-9)
        weight = np.where(free, -1.0 / slope, 0.0)
        if weight.sum() > 0:
            mu = weight / weight.sum()
        else:  # every device at B_min: the slowest one sets the round
            mu = np.zeros(self.n)
            mu[int(np.argmax(alloc.delays_s))] = 1.0
        dd_dc = t.a1 + t.lora_bits * (phi_up + phi_dn)
        dd_ds = -x_up * phi_up - self.gamma_down * x_dn * phi_dn
        return float(alloc.max_delay_s), mu * dd_dc, mu * dd_ds

    def evaluate(self, x: FloatArray) -> tuple[float, float, FloatArray, FloatArray, FloatArray]:
        """Objective, accuracy loss, constraints ``g`` and the pieces of their gradients."""
        t = self.t
        c, s, tau = self.unpack(x)
        t_star, dt_dc, dt_ds = self.round_time(c, s)
        loss, slope = self.loss_curve(s)
        acc = float(np.dot(t.weights, loss))
        g = np.concatenate(
            [
                [t_star / self.t_ref - tau],
                [float(np.sum(t.server0 - t.server1 * c)) / self.t_ref - tau],
                (t.mem0 + t.mem1 * c) / t.mem_limit - 1.0,
                [(acc - t.max_loss) / self.acc_scale],
            ]
        )
        return (1.0 + t.rounds_per_loss * acc) * tau, acc, g, np.stack([dt_dc, dt_ds]), slope

    def constraints(self, x: FloatArray) -> FloatArray:
        return self.evaluate(x)[2]

    def lagrangian(self, x: FloatArray, lam: FloatArray, rho: float) -> tuple[float, FloatArray]:
        n, t = self.n, self.t
        _, _, tau = self.unpack(x)
        f, acc, g, dt, slope = self.evaluate(x)
        mu = np.maximum(0.0, lam + rho * g)
        value = f + float(np.sum(mu**2 - lam**2)) / (2.0 * rho)
        mu_t, mu_f, mu_m, mu_a = mu[0], mu[1], mu[2 : n + 2], mu[n + 2]
        grad_c = mu_t * dt[0] / self.t_ref - mu_f * t.server1 / self.t_ref + mu_m * t.mem1 / t.mem_limit
        grad_s = (t.rounds_per_loss * tau + mu_a / self.acc_scale) * t.weights * slope
        grad_s = grad_s + mu_t * dt[1] / self.t_ref
        grad_tau = 1.0 + t.rounds_per_loss * acc - mu_t - mu_f
        return value, np.concatenate([grad_c * self.c_span, grad_s * self.s_max, [grad_tau]])


def solve_relaxed(
    terms: Terms,
    hull: tuple[FloatArray, FloatArray],
    *,
    cut_lo: IntArray | None = None,
    cut_hi: IntArray | None = None,
    max_outer: int = 20,
    inner_max_iter: int = 50,
    tol: float = 1e-4,
) -> Relaxed:
    """Augmented Lagrangian over the relaxed problem (module doc)."""
    lo = (terms.cut_lo if cut_lo is None else cut_lo).astype(np.float64)
    hi = (terms.cut_hi if cut_hi is None else cut_hi).astype(np.float64)
    prob = _Relaxation(terms, hull, lo, hi)
    x = _initial_point(prob, np.minimum(terms.cut_cap.astype(np.float64), hi))
    x, violation, outer, inner = _augmented_lagrangian(
        prob, x, max_outer=max_outer, inner_max_iter=inner_max_iter, tol=tol
    )
    c, s, _ = prob.unpack(x)
    t_star = prob.round_time(c, s)[0]
    round_s = max(t_star, float(np.sum(terms.server0 - terms.server1 * c)))
    loss, _ = prob.loss_curve(s)
    objective = (1.0 + terms.rounds_per_loss * float(np.dot(terms.weights, loss))) * round_s
    return Relaxed(
        cuts=c,
        log_ratios=s,
        shares=prob.shares,
        objective=objective * terms.rounds_base,
        violation=violation,
        outer_iterations=outer,
        inner_iterations=inner,
    )


def _initial_point(prob: _Relaxation, cap: FloatArray) -> FloatArray:
    """Start x = [xc, xs, τ]: deepest cuts memory allows, no compression; sets ``prob.t_ref`` (s)."""
    n, terms = prob.n, prob.t
    xc0 = np.where(prob.c_span > 0, (cap - prob.c_lo) / np.maximum(prob.c_span, 1e-12), 0.0)
    x = np.concatenate([xc0, np.zeros(n), [0.0]])
    c, s, _ = prob.unpack(x)
    prob.t_ref = max(prob.round_time(c, s)[0], float(np.sum(terms.server0 - terms.server1 * c)))
    x[2 * n] = 1.0
    return x


def _box_bounds(prob: _Relaxation) -> list[tuple[float, float | None]]:
    """Bounds on ``x = [xc, xs, τ]``: [0, 1], pinned to 0 where a cut or the codec cannot move."""
    return (
        [(0.0, 1.0 if span > 0 else 0.0) for span in prob.c_span]
        + [(0.0, 1.0 if prob.s_max > 0 else 0.0)] * prob.n
        + [(0.0, None)]
    )


def _augmented_lagrangian(
    prob: _Relaxation, x: FloatArray, *, max_outer: int, inner_max_iter: int, tol: float
) -> tuple[FloatArray, float, int, int]:
    """PHR iterations from x: (x, max violation, outer iterations, L-BFGS-B iterations)."""
    bounds = _box_bounds(prob)
    lam = np.zeros(prob.n + 3)
    rho = 10.0
    violation = last_violation = np.inf
    inner = outer = 0
    for outer in range(1, max_outer + 1):
        res = minimize(
            prob.lagrangian,
            x,
            args=(lam, rho),
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": inner_max_iter, "ftol": 1e-10, "gtol": 1e-6},
        )
        x, inner = res.x, inner + int(res.nit)
        g = prob.constraints(x)
        violation = float(np.max(np.maximum(g, 0.0)))
        lam = np.maximum(0.0, lam + rho * g)
        if violation <= tol and outer > 1:
            break
        if violation > 0.5 * last_violation:
            rho = min(rho * 5.0, 1e7)
        last_violation = violation
    return x, violation, outer, inner


def round_plan(
    terms: Terms,
    relaxed: Relaxed,
    option_log_ratios: FloatArray,
    hull: tuple[FloatArray, FloatArray],
    cut_lo: IntArray,
    cut_cap: IntArray,
) -> tuple[IntArray, IntArray]:
    """Nearest integers within memory; the nearest menu option on the hull (the options the
    relaxation mixes); then restore the accuracy limit."""
    cuts = np.clip(np.rint(relaxed.cuts), cut_lo, cut_cap).astype(np.int64)
    hull_s, _ = hull
    on_hull = np.flatnonzero(np.isin(np.round(option_log_ratios, 12), np.round(hull_s, 12)))
    nearest = np.argmin(np.abs(relaxed.log_ratios[:, None] - option_log_ratios[None, on_hull]), axis=1)
    return cuts, restore_accuracy(terms, on_hull[nearest].astype(np.int64))


def restore_accuracy(terms: Terms, opts: IntArray) -> IntArray:
    """Step devices to more accurate codecs (greediest first) until the accuracy limit holds."""
    opts = opts.copy()
    while float(np.dot(terms.weights, terms.losses[opts])) > terms.max_loss * (1 + 1e-9) + 1e-12:
        movable = opts > 0
        gain = np.where(
            movable, terms.weights * (terms.losses[opts] - terms.losses[np.maximum(opts - 1, 0)]), -1.0
        )
        opts[int(np.argmax(gain))] -= 1
    return opts


def _candidates(
    terms: Terms, cuts: IntArray, opts: IntArray, cut_lo: IntArray, cut_cap: IntArray
) -> tuple[IntArray, IntArray, IntArray]:
    """Every single move: (device, new cut, new codec index)."""
    n, k = terms.n, len(terms.ratios)
    dev = np.repeat(np.arange(n), 4)
    new_c = cuts[dev] + np.tile([-1, 1, 0, 0], n)
    new_k = opts[dev] + np.tile([0, 0, -1, 1], n)
    ok = (new_c >= cut_lo[dev]) & (new_c <= cut_cap[dev]) & (new_k >= 0) & (new_k < k)
    return dev[ok], new_c[ok], new_k[ok]


def _screen(
    terms: Terms,
    current: Score,
    cuts: IntArray,
    opts: IntArray,
    dev: IntArray,
    new_c: IntArray,
    new_k: IntArray,
) -> FloatArray:
    """First-order estimate of each move's total delay, without re-solving the bandwidth split.

    Around the current split (level t*, device needs g_m*, slopes g_m' = dB/dt), a device whose
    need at t* becomes g_new moves the level by ``(g_new − g_n*) / −(Σ_{m≠n} g_m' + g_new')``.
    """
    alloc, paths = current.allocation, current.paths
    bw = alloc.bandwidth_hz
    t_star = float(alloc.max_delay_s)
    clipped = bw <= terms.min_hz * (1 + 1e-9)
    slope = np.where(
        clipped, 0.0, 1.0 / link_delay_slope(bw, paths.up_bits, paths.down_bits, terms.snr_up, terms.snr_down)
    )
    ratio = terms.ratios[new_k]
    down_ratio = terms.down_ratios[new_k] if terms.compress_down else np.ones_like(ratio)
    a = terms.a0[dev] + terms.a1[dev] * new_c
    up = terms.act_bits / ratio + new_c * terms.lora_bits
    dn = terms.act_bits / down_ratio + new_c * terms.lora_bits
    pu, pd = terms.snr_up[dev], terms.snr_down[dev]
    target = t_star - a
    y, dphi = solve_airtime(np.full(dev.shape, 1.0 / terms.total_hz), target, up, dn, pu, pd, 1e-9, 50)
    phi_y = airtime(y, up, dn, pu, pd)[0]
    reachable = (target > 0) & (phi_y <= target * (1 + 1e-6))
    need = np.maximum(1.0 / y, terms.min_hz)
    new_slope = np.where(need > terms.min_hz, -1.0 / (dphi * y * y), 0.0)
    rest = np.sum(slope) - slope[dev]
    total_slope = rest + new_slope
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.where(total_slope < 0, (need - bw[dev]) / -total_slope, 0.0)
    level = np.where(reachable, t_star + shift, np.inf)
    floor = float(paths.server_floor) - terms.server1 * (new_c - cuts[dev])
    acc = float(paths.accuracy_loss) + terms.weights[dev] * (terms.losses[new_k] - terms.losses[opts[dev]])
    total = rounds(terms, acc) * np.maximum(level, floor)
    return np.asarray(np.where(acc <= terms.max_loss * (1 + 1e-9) + 1e-12, total, np.inf))


def local_search(
    terms: Terms,
    cuts: IntArray,
    opts: IntArray,
    cut_lo: IntArray,
    cut_cap: IntArray,
    *,
    max_moves: int = 10_000,
    verify: int = 6,
    min_gain: float = 1e-5,
) -> tuple[IntArray, IntArray, float, int]:
    """Improve by single moves (cut ±1, codec ±1) until none helps; returns the moves taken.

    Moves are ranked by :func:`_screen`; the ``verify`` best are scored exactly, in order, and
    the first that shortens the total delay by more than ``min_gain`` (relative) is taken.
    """
    current = score(terms, cuts, opts)
    best = float(current.total_s)
    moves = 0
    while moves < max_moves:
        dev, new_c, new_k = _candidates(terms, cuts, opts, cut_lo, cut_cap)
        if dev.size == 0:
            break
        estimates = _screen(terms, current, cuts, opts, dev, new_c, new_k)
        improved = False
        for i in np.argsort(estimates)[:verify]:
            if not np.isfinite(estimates[i]):
                break
            trial_c, trial_k = cuts.copy(), opts.copy()
            trial_c[dev[i]], trial_k[dev[i]] = new_c[i], new_k[i]
            trial = score(terms, trial_c, trial_k)
            if float(trial.total_s) < best * (1 - min_gain):
                cuts, opts, current, best = trial_c, trial_k, trial, float(trial.total_s)
                moves += 1
                improved = True
                break
        if not improved:
            break
    return cuts, opts, best, moves
