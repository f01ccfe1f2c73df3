"""Baselines the planner is measured against, each a :class:`PlanSolution` under the same models.

- :func:`equal_bandwidth_plan`: the planner's cuts and codecs, the band split equally;
- :func:`fixed_cut_plan`: one cut for every device (default: the deepest every device can
  hold), codecs and bandwidth optimised;
- :func:`no_compression_plan`: cuts and bandwidth optimised, every device sends raw fp32;
- :func:`exhaustive_plan`: every integer plan (all cuts × all menu codecs per device) scored
  exactly with the optimal bandwidth split — the optimum, for small instances only.
"""

from __future__ import annotations

import time

import numpy as np

from sft_actors.errors import ConfigError
from sft_actors.plan.channel import ChannelState
from sft_actors.plan.compression import CompressionMenu
from sft_actors.plan.model import PlanProblem, build_terms, score
from sft_actors.plan.planner import PlanSolution, allocate, assemble, channel_for, plan

IDENTITY = "identity"


def equal_bandwidth_plan(problem: PlanProblem, planned: PlanSolution, channel: ChannelState) -> PlanSolution:
    """``planned``'s cuts and codecs with ``B_total / N`` for each device."""
    terms = build_terms(problem, channel)
    names = [o.name for o in problem.menu.options]
    cuts = np.array(planned.cuts, dtype=np.int64)
    opts = np.array([names.index(c) for c in planned.codecs], dtype=np.int64)
    return assemble(
        problem,
        terms,
        cuts,
        opts,
        allocate(terms, cuts, opts, "equal"),
        method="equal-bandwidth",
        channel_seed=channel.seed,
    )


def fixed_cut_plan(problem: PlanProblem, channel: ChannelState, cut: int | None = None) -> PlanSolution:
    """Every device cut at ``cut`` (default: the deepest cut all devices can hold)."""
    if cut is None:
        cut = int(np.min(build_terms(problem, channel).cut_cap))
    return plan(problem, channel=channel, fixed_cut=cut)


def no_compression_plan(problem: PlanProblem, channel: ChannelState) -> PlanSolution:
    """The planner restricted to the identity codec."""
    identity = [o for o in problem.menu.options if o.name == IDENTITY or o.ratio == 1.0]
    if not identity:
        raise ConfigError("the menu has no identity codec (ratio 1) to run the no-compression baseline with")
    return plan(problem.with_menu(CompressionMenu(options=(identity[0],))), channel=channel)


def exhaustive_plan(
    problem: PlanProblem,
    channel: ChannelState | None = None,
    *,
    channel_seed: int | None = 0,
    max_plans: int = 500_000,
    chunk: int = 20_000,
) -> PlanSolution:
    """The best integer plan by enumeration (raises ConfigError beyond ``max_plans`` plans)."""
    start = time.perf_counter()
    state = channel_for(problem, channel, channel_seed)
    terms = build_terms(problem, state)
    k = len(terms.ratios)
    choices = [
        [(c, o) for c in range(int(terms.cut_lo[i]), int(terms.cut_cap[i]) + 1) for o in range(k)]
        for i in range(terms.n)
    ]
    radix = np.array([len(ch) for ch in choices], dtype=np.int64)
    total = int(np.prod(radix.astype(np.float64)))
    if total > max_plans:
        raise ConfigError(
            f"exhaustive search over {total} plans exceeds max_plans = {max_plans}; use fewer devices, "
            "blocks or codec options"
        )
    choice_cut = [np.array([c for c, _ in ch], dtype=np.int64) for ch in choices]
    choice_opt = [np.array([o for _, o in ch], dtype=np.int64) for ch in choices]
    strides = np.concatenate([[1], np.cumprod(radix)[:-1]])
    best_total, best_index = np.inf, -1
    for first in range(0, total, chunk):
        index = np.arange(first, min(first + chunk, total), dtype=np.int64)
        digits = (index[:, None] // strides[None, :]) % radix[None, :]
        cuts = np.stack([choice_cut[i][digits[:, i]] for i in range(terms.n)], axis=1)
        opts = np.stack([choice_opt[i][digits[:, i]] for i in range(terms.n)], axis=1)
        totals = score(terms, cuts, opts).total_s
        i = int(np.argmin(totals))
        if totals[i] < best_total:
            best_total, best_index = float(totals[i]), int(index[i])
    if best_index < 0:
        raise ConfigError("exhaustive search found no plan within the accuracy limit")
    digits = (best_index // strides) % radix
    cuts = np.array([choice_cut[i][digits[i]] for i in range(terms.n)], dtype=np.int64)
    opts = np.array([choice_opt[i][digits[i]] for i in range(terms.n)], dtype=np.int64)
    return assemble(
        problem,
        terms,
        cuts,
        opts,
        allocate(terms, cuts, opts, "newton"),
        method="exhaustive",
        channel_seed=state.seed,
        solve_s=time.perf_counter() - start,
        stats={"plans": total},
    )
