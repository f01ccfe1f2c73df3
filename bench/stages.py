"""Asynchronous server stages: one server actor vs the server's blocks cut into two stage actors.

Same model, data, devices, seeds and samples; the only change is ``[[actors]] server1`` with
``start_block = --stage-start``. With two devices in flight, stage 1 can run one device's
micro-batch while stage 0 runs the other's. Reports the median round time of each layout and
``stage_gain`` (one-server time ÷ two-stage time; > 1 means the stages help).

    python bench/stages.py                                   # vit-small on Fashion-MNIST
    python bench/stages.py --model llama-tiny --dataset stdlib-docs --tiny
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from baselines import git_commit, topology_text

from sft_actors import log
from sft_actors.runtime import run_topology
from sft_actors.topology import load_topology


def run_layout(a: argparse.Namespace, stages: int, work: Path) -> dict[str, Any]:
    out = work / f"stages{stages}"
    out.mkdir(parents=True)
    text = topology_text(a, "sfl", out / "runs")
    if stages == 2:
        text = text.replace(
            '[[actors]]\nname = "server"\nrole = "server"\nport = 0\n',
            '[[actors]]\nname = "server"\nrole = "server"\nport = 0\n\n'
            f'[[actors]]\nname = "server1"\nrole = "server"\nport = 0\nstart_block = {a.stage_start}\n',
        )
    path = out / "topology.toml"
    path.write_text(text)
    t0 = time.perf_counter()
    result = asyncio.run(run_topology(load_topology(path), transport="inproc", timeout_s=a.timeout_s))
    if not result.ok:
        raise SystemExit(f"{stages}-stage run failed: {result.failures}")
    summary = json.loads(next((out / "runs").glob("sfl-*/summary.json")).read_text())
    rounds = [r["seconds"] for r in summary["rounds"]]
    return {
        "stages": stages,
        "round_s_median": statistics.median(rounds),
        "rounds_s": rounds,
        "wall_s": time.perf_counter() - t0,
        "final_loss": summary["rounds"][-1]["loss"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit-small")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-documents", type=int, default=100)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--cuts", type=lambda s: [int(x) for x in s.split(",")], default=[2, 3])
    p.add_argument("--stage-start", type=int, default=7)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-inflight", type=int, default=2)
    p.add_argument("--eval-batches", type=int, default=1)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads per process (1: stages use both cores)"
    )
    p.add_argument("--timeout-s", type=float, default=1800.0)
    p.add_argument("--tiny", action="store_true", help="llama-tiny, a few steps (CI)")
    a = p.parse_args(argv)
    # Fields topology_text expects but a stage comparison does not vary.
    a.codec, a.keep, a.bits, a.uplink_min, a.uplink_max, a.rtt_ms = "topk", 0.2, 8, 1000.0, 1000.0, 0.0
    if a.tiny:
        a.model, a.dataset, a.cuts, a.stage_start = "llama-tiny", "stdlib-docs", [1, 2], 3
        a.rounds, a.steps, a.batch, a.seq, a.max_documents = 2, 2, 2, 16, 20
    if a.dataset != "stdlib-docs":
        a.max_documents = 0  # image datasets take no options
    torch.set_num_threads(a.threads)
    log.configure("console", level="warning")
    print(
        f"# stages  {platform.platform()}  cpus={os.cpu_count()}  torch={torch.__version__}  "
        f"commit={git_commit()}  "
        f"model={a.model} devices={a.devices} cuts={a.cuts} second stage starts at {a.stage_start}"
    )
    with tempfile.TemporaryDirectory(prefix="sft-stages-") as tmp:
        one = run_layout(a, 1, Path(tmp))
        two = run_layout(a, 2, Path(tmp))
    for r in (one, two):
        print(f"{r['stages']} stage(s): median round {r['round_s_median']:.3f} s  rounds {r['rounds_s']}")
    out = {"one_stage": one, "two_stages": two, "stage_gain": one["round_s_median"] / two["round_s_median"]}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
