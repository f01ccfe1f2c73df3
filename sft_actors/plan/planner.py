"""The planner: slow timescale (cuts, codecs), then fast timescale (bandwidth), into a PlanSolution.

:func:`plan` draws (or takes) the channel, solves the relaxed problem by the augmented
Lagrangian, rounds and repairs it (``slow``), splits the band by SLSQP (``bandwidth``) and
reports every device's cut, codec, bandwidth, rates, predicted per-round delay and memory.
SLSQP starts from the exact Newton split and is checked against it: should SLSQP end with a
worse max delay (by more than 1e-6, relative), the exact split is kept and
``bandwidth_method`` says so. (From a cold start SLSQP reaches the same split, at ~0.5 s for
100 devices: ``bandwidth.slsqp_bandwidth``.)

Two timescales: with ``slow_channel="mean"`` the cuts and codecs are chosen on the average
channel (no fading) and only the bandwidth follows the drawn channel — what a deployment does
when it keeps the cuts for many fading blocks and re-splits the band each block with
:func:`replan_bandwidth`. The default ``"instant"`` plans everything for the drawn channel.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from sft_actors.errors import PlanInfeasible
from sft_actors.log import get_logger
from sft_actors.plan.bandwidth import Allocation, equal_bandwidth, minmax_bandwidth, slsqp_bandwidth
from sft_actors.plan.channel import ChannelState, draw_channel, shannon_rate
from sft_actors.plan.compression import CompressionMenu, CompressionOption
from sft_actors.plan.model import MB, PlanProblem, Terms, build_terms, memory_bytes, path_terms, rounds
from sft_actors.plan.slow import local_search, round_plan, solve_relaxed

IntArray = npt.NDArray[np.int64]
SlowChannel = Literal["instant", "mean"]
BandwidthMethod = Literal["slsqp", "newton", "equal"]


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceChoice:
    """One device's share of the plan (seconds per round, bytes, Hz, bit/s)."""

    name: str
    cut: int
    codec: CompressionOption
    bandwidth_hz: float
    uplink_bps: float
    downlink_bps: float
    compute_s: float
    uplink_s: float
    downlink_s: float
    round_delay_s: float
    memory_bytes: float
    memory_limit_bytes: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cut": self.cut,
            "codec": self.codec.to_dict(),
            "bandwidth_hz": self.bandwidth_hz,
            "uplink_bps": self.uplink_bps,
            "downlink_bps": self.downlink_bps,
            "compute_s": self.compute_s,
            "uplink_s": self.uplink_s,
            "downlink_s": self.downlink_s,
            "round_delay_s": self.round_delay_s,
            "memory_mb": self.memory_bytes / MB,
            "memory_limit_mb": self.memory_limit_bytes / MB,
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanSolution:
    """A full plan and its predicted cost; ``total_delay_s = rounds · round_delay_s``."""

    devices: tuple[DeviceChoice, ...]
    round_delay_s: float
    server_floor_s: float
    rounds: float
    accuracy_loss: float
    total_delay_s: float
    bottleneck: str
    method: str
    bandwidth_method: str
    channel_seed: int | None
    solve_s: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def cuts(self) -> list[int]:
        return [d.cut for d in self.devices]

    @property
    def codecs(self) -> list[str]:
        return [d.codec.name for d in self.devices]

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "bandwidth_method": self.bandwidth_method,
            "channel_seed": self.channel_seed,
            "total_delay_s": self.total_delay_s,
            "round_delay_s": self.round_delay_s,
            "server_floor_s": self.server_floor_s,
            "rounds": self.rounds,
            "accuracy_loss": self.accuracy_loss,
            "bottleneck": self.bottleneck,
            "solve_s": self.solve_s,
            "stats": self.stats,
            "devices": [d.to_dict() for d in self.devices],
        }


def channel_for(problem: PlanProblem, channel: ChannelState | None, seed: int | None) -> ChannelState:
    if channel is not None:
        return channel
    return draw_channel(problem.devices, problem.server, problem.channel, seed)


def assemble(
    problem: PlanProblem,
    terms: Terms,
    cuts: IntArray,
    opts: IntArray,
    allocation: Allocation,
    *,
    method: str,
    channel_seed: int | None,
    solve_s: float = 0.0,
    stats: dict[str, Any] | None = None,
) -> PlanSolution:
    """A PlanSolution for integer ``cuts``/``opts`` under a given bandwidth ``allocation``."""
    p = path_terms(terms, cuts, opts)
    bw = allocation.bandwidth_hz
    r_up, r_dn = shannon_rate(bw, terms.snr_up), shannon_rate(bw, terms.snr_down)
    up_s, dn_s = p.up_bits / r_up, p.down_bits / r_dn
    delays = p.a + up_s + dn_s
    floor = float(p.server_floor)
    round_s = max(float(np.max(delays)), floor)
    n_rounds = float(rounds(terms, p.accuracy_loss))
    mem = memory_bytes(terms, cuts)
    slowest = int(np.argmax(delays))
    devices = tuple(
        DeviceChoice(
            name=d.name,
            cut=int(cuts[i]),
            codec=problem.menu.options[int(opts[i])],
            bandwidth_hz=float(bw[i]),
            uplink_bps=float(r_up[i]),
            downlink_bps=float(r_dn[i]),
            compute_s=float(p.a[i]),
            uplink_s=float(up_s[i]),
            downlink_s=float(dn_s[i]),
            round_delay_s=float(delays[i]),
            memory_bytes=float(mem[i]),
            memory_limit_bytes=float(terms.mem_limit[i]),
        )
        for i, d in enumerate(problem.devices)
    )
    return PlanSolution(
        devices=devices,
        round_delay_s=round_s,
        server_floor_s=floor,
        rounds=n_rounds,
        accuracy_loss=float(p.accuracy_loss),
        total_delay_s=n_rounds * round_s,
        bottleneck="server" if floor >= float(np.max(delays)) else problem.devices[slowest].name,
        method=method,
        bandwidth_method=allocation.method,
        channel_seed=channel_seed,
        solve_s=solve_s,
        stats=stats or {},
    )


def allocate(terms: Terms, cuts: IntArray, opts: IntArray, method: BandwidthMethod = "slsqp") -> Allocation:
    """Fast timescale for fixed cuts and codecs."""
    p = path_terms(terms, cuts, opts)
    args = (p.a, p.up_bits, p.down_bits, terms.snr_up, terms.snr_down)
    if method == "equal":
        return equal_bandwidth(*args, terms.total_hz)
    exact = minmax_bandwidth(*args, terms.total_hz, terms.min_hz)
    if method == "newton":
        return exact
    sqp = slsqp_bandwidth(*args, terms.total_hz, terms.min_hz, start_hz=exact.bandwidth_hz)
    # SLSQP may stop with a line-search message at a point that is optimal to rounding; judge by
    # the result, and keep the exact split only when SLSQP's is measurably worse.
    if float(sqp.max_delay_s) > float(exact.max_delay_s) * (1 + 1e-6):
        get_logger(component="planner").warning(
            "slsqp_fell_short",
            slsqp=sqp.method,
            slsqp_max_s=float(sqp.max_delay_s),
            exact_max_s=float(exact.max_delay_s),
        )
        return dataclasses.replace(exact, method="newton(slsqp fell short)")
    return sqp


def plan(
    problem: PlanProblem,
    *,
    channel_seed: int | None = 0,
    channel: ChannelState | None = None,
    slow_channel: SlowChannel = "instant",
    fixed_cut: int | None = None,
    bandwidth: BandwidthMethod = "slsqp",
    uniform_codec: bool = False,
) -> PlanSolution:
    """PlanSolution cuts, codecs and bandwidth for ``problem`` (see the module doc).

    ``fixed_cut`` pins every device's cut (the fixed-cut baseline); ``uniform_codec`` makes every
    device use the same codec (the best single menu option: what a topology file can hold).
    Raises PlanInfeasible when a device cannot hold the cut, or for any input no plan can satisfy.
    """
    if uniform_codec:
        state = channel_for(problem, channel, channel_seed)
        usable = [o for o in problem.menu.options if o.loss <= problem.training.max_accuracy_loss]
        if not usable:
            build_terms(problem, state)  # raises the accuracy PlanInfeasible with the details
        candidates = [
            plan(
                problem.with_menu(CompressionMenu(options=(o,))),
                channel=state,
                slow_channel=slow_channel,
                fixed_cut=fixed_cut,
                bandwidth=bandwidth,
            )
            for o in usable
        ]
        return min(candidates, key=lambda p: p.total_delay_s)
    with single_threaded_blas():
        return _plan(
            problem,
            channel_seed=channel_seed,
            channel=channel,
            slow_channel=slow_channel,
            fixed_cut=fixed_cut,
            bandwidth=bandwidth,
        )


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """The planner's dense algebra is tiny: BLAS threads only add contention (measured 2-3x slower)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # an optional speed-up
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _plan(
    problem: PlanProblem,
    *,
    channel_seed: int | None,
    channel: ChannelState | None,
    slow_channel: SlowChannel,
    fixed_cut: int | None,
    bandwidth: BandwidthMethod,
) -> PlanSolution:
    start = time.perf_counter()
    fast_channel = channel_for(problem, channel, channel_seed)
    slow_state = (
        fast_channel
        if slow_channel == "instant"
        else draw_channel(problem.devices, problem.server, problem.channel, mean=True)
    )
    terms = build_terms(problem, slow_state)
    lo, cap = terms.cut_lo, terms.cut_cap
    if fixed_cut is not None:
        _check_fixed_cut(problem, terms, fixed_cut)
        lo = np.full(terms.n, fixed_cut, dtype=np.int64)
        cap = lo.copy()
    relaxed = solve_relaxed(
        terms, problem.menu.hull(), cut_lo=lo, cut_hi=cap if fixed_cut is not None else terms.cut_hi
    )
    cuts, opts = round_plan(terms, relaxed, problem.menu.log_ratios, problem.menu.hull(), lo, cap)
    cuts, opts, _, moves = local_search(terms, cuts, opts, lo, cap)
    fast_terms = terms if slow_channel == "instant" else build_terms(problem, fast_channel)
    allocation = allocate(fast_terms, cuts, opts, bandwidth)
    elapsed = time.perf_counter() - start
    stats = {
        "relaxed_objective_s": relaxed.objective,
        "alm_outer": relaxed.outer_iterations,
        "alm_inner": relaxed.inner_iterations,
        "alm_violation": relaxed.violation,
        "repair_moves": moves,
    }
    result = assemble(
        problem,
        fast_terms,
        cuts,
        opts,
        allocation,
        method="alm" if fixed_cut is None else f"alm(fixed cut {fixed_cut})",
        channel_seed=fast_channel.seed,
        solve_s=elapsed,
        stats=stats,
    )
    get_logger(component="planner").info(
        "plan_solved",
        devices=terms.n,
        total_delay_s=result.total_delay_s,
        round_s=result.round_delay_s,
        accuracy_loss=result.accuracy_loss,
        solve_ms=elapsed * 1e3,
        **stats,
    )
    return result


def _check_fixed_cut(problem: PlanProblem, terms: Terms, cut: int) -> None:
    lo, hi = problem.cut_range
    if not lo <= cut <= hi:
        raise PlanInfeasible(
            f"fixed cut {cut} is outside the allowed range [{lo}, {hi}] of {problem.model.name}"
        )
    for d, cap in zip(problem.devices, terms.cut_cap, strict=True):
        if cap < cut:
            raise PlanInfeasible(
                f"device {d.name!r}: memory_mb = {d.memory_mb:g} holds at most {int(cap)} block(s), "
                f"not the fixed cut {cut}"
            )


def replan_bandwidth(
    problem: PlanProblem, current: PlanSolution, channel: ChannelState, method: BandwidthMethod = "slsqp"
) -> PlanSolution:
    """Fast timescale only: keep ``current``'s cuts and codecs, re-split the band for ``channel``."""
    terms = build_terms(problem, channel)
    names = [o.name for o in problem.menu.options]
    cuts = np.array(current.cuts, dtype=np.int64)
    opts = np.array([names.index(c) for c in current.codecs], dtype=np.int64)
    start = time.perf_counter()
    allocation = allocate(terms, cuts, opts, method)
    return assemble(
        problem,
        terms,
        cuts,
        opts,
        allocation,
        method=current.method,
        channel_seed=channel.seed,
        solve_s=time.perf_counter() - start,
        stats=dict(current.stats),
    )
