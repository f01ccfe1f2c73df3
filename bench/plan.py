"""Benchmark the resource planner against its baselines and the exhaustive optimum.

Random seeded instances of ``--min-devices``..``--max-devices`` devices (SmolLM2-135M costs,
cut range and codec menu sized so that exhaustive search stays under ``--max-plans`` plans):

- ``gap_vs_exhaustive``: median over instances of (plan − optimum) / optimum total delay
  (target ≤ 0.05);
- ``delay_vs_equal_bandwidth`` / ``delay_vs_fixed_cut`` / ``delay_vs_no_compression``: median
  ratio of the plan's total delay to each baseline's (< 1: the plan is better);
- ``solve_s_100``: median wall time to plan ``--large`` devices (full cut range and menu;
  target ≤ 1 s), after a warm-up; ``solve_cpu_s_100`` the CPU time of the same solves (the
  number to compare on a shared machine, where wall time includes waiting for a core).

Prints machine info, a table per instance, and as the last line one JSON object.

    .venv/bin/python bench/plan.py [--instances 10] [--large 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from importlib import metadata

import numpy as np

from sft_actors import log
from sft_actors.plan import (
    PlanProblem,
    build_terms,
    channel_for,
    equal_bandwidth_plan,
    exhaustive_plan,
    fixed_cut_plan,
    no_compression_plan,
    plan,
    random_problem,
)

# Richest first: (largest device cut, codec menu); the first that fits --max-plans is used.
SIZES: list[tuple[int, list[str] | None]] = [
    (4, ["identity", "fp16", "int8-token", "transform-16x", "topk-0.1-b8"]),
    (3, ["identity", "int8-token", "transform-16x", "topk-0.1-b8"]),
    (3, ["identity", "int8-token", "transform-16x"]),
    (2, ["identity", "int8-token", "transform-16x"]),
    (2, ["identity", "transform-16x"]),
]


def version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "absent"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def instance(n: int, seed: int, max_plans: int) -> tuple[PlanProblem, int]:
    rng = np.random.default_rng(10_000 + seed)
    server_flops = float(np.exp(rng.uniform(np.log(5e11), np.log(5e12))))
    bandwidth = float(rng.uniform(10e6, 40e6))
    for blocks, codecs in SIZES:
        problem = random_problem(
            n,
            seed,
            codecs=codecs,
            max_device_blocks=blocks,
            server_flops=server_flops,
            bandwidth_hz=bandwidth,
            memory_mb=(300.0, 3000.0),
            device_flops=(1e10, 2e11),
        )
        terms = build_terms(problem, channel_for(problem, None, seed))
        plans = int(np.prod(((terms.cut_cap - terms.cut_lo + 1) * len(terms.ratios)).astype(np.float64)))
        if plans <= max_plans:
            return problem, plans
    raise SystemExit(f"no instance size of {n} devices fits --max-plans {max_plans}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=10)
    ap.add_argument("--min-devices", type=int, default=4)
    ap.add_argument("--max-devices", type=int, default=8)
    ap.add_argument("--max-plans", type=int, default=200_000)
    ap.add_argument("--large", type=int, default=100, help="devices in the solve-time instance")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    log.configure("console", level="warning")

    print(
        f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
        f"python={platform.python_version()} numpy={version('numpy')} scipy={version('scipy')} "
        f"torch={version('torch')} commit={git_commit()}"
    )
    header = (
        f"{'seed':>4} {'dev':>3} {'plans':>7} {'plan_s':>8} {'exh_s':>7} {'gap':>8} {'vs_eqbw':>8} "
        f"{'vs_fixcut':>9} {'vs_nocomp':>9}  cuts / codecs"
    )
    print(header)
    gaps, vs_eq, vs_fix, vs_none, plan_times = [], [], [], [], []
    span = args.max_devices - args.min_devices + 1
    for i in range(args.instances):
        seed = args.seed + i
        n = args.min_devices + i % span
        problem, plans = instance(n, seed, args.max_plans)
        channel = channel_for(problem, None, seed)
        t0 = time.perf_counter()
        ours = plan(problem, channel=channel)
        plan_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        best = exhaustive_plan(problem, channel, max_plans=args.max_plans)
        exh_s = time.perf_counter() - t0
        gaps.append(ours.total_delay_s / best.total_delay_s - 1.0)
        vs_eq.append(ours.total_delay_s / equal_bandwidth_plan(problem, ours, channel).total_delay_s)
        vs_fix.append(ours.total_delay_s / fixed_cut_plan(problem, channel).total_delay_s)
        vs_none.append(ours.total_delay_s / no_compression_plan(problem, channel).total_delay_s)
        print(
            f"{seed:>4} {n:>3} {plans:>7} {plan_times[-1]:>8.3f} {exh_s:>7.2f} {gaps[-1]:>8.4f} "
            f"{vs_eq[-1]:>8.3f} {vs_fix[-1]:>9.3f} {vs_none[-1]:>9.3f}  {ours.cuts} {ours.codecs}"
        )

    large = random_problem(
        args.large,
        args.seed,
        server_flops=2e13,
        bandwidth_hz=100e6,
        memory_mb=(300.0, 3000.0),
        device_flops=(1e10, 2e11),
    )
    large_channel = channel_for(large, None, args.seed)
    plan(large, channel=large_channel)  # warm-up
    times, cpu_times = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        big = plan(large, channel=large_channel)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    print(
        f"{args.large} devices: solve {np.median(times):.3f} s wall, {np.median(cpu_times):.3f} s CPU "
        f"(median of {args.repeats}; load average {os.getloadavg()[0]:.1f}; "
        f"ALM outer {big.stats['alm_outer']}, inner {big.stats['alm_inner']}, repair moves "
        f"{big.stats['repair_moves']}), total delay {big.total_delay_s:.1f} s, bottleneck {big.bottleneck}"
    )
    result = {
        "instances": args.instances,
        "gap_vs_exhaustive": float(np.median(gaps)),
        "gap_vs_exhaustive_max": float(np.max(gaps)),
        "delay_vs_equal_bandwidth": float(np.median(vs_eq)),
        "delay_vs_fixed_cut": float(np.median(vs_fix)),
        "delay_vs_no_compression": float(np.median(vs_none)),
        "plan_s_small_median": float(np.median(plan_times)),
        f"solve_s_{args.large}": float(np.median(times)),
        f"solve_cpu_s_{args.large}": float(np.median(cpu_times)),
        "large_devices": args.large,
        "cpus": os.cpu_count(),
        "commit": git_commit(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
