"""Codec chains on a real split fine-tune, through the runtime, over an emulated 20 Mbit/s link.

The same short fine-tune — SmolLM2-135M cut after block 4 (``--cut``), one device, one edge
server, the coordinator, ``mode = "sft"``, one seed, one data split, ``--rounds`` ×
``--steps`` optimizer steps (≥ 40 by default and with ``--quick``) — is run once per codec
chain in ``CHAINS`` (``--chains`` picks), in-process over ``inproc://`` sockets, with the
device's link paced to 20 Mbit/s each way and 10 ms rtt by the runtime's link emulation (so
time on the wire is measured, not modelled). The coordinator evaluates held-out loss through
the chain after every round (a bench-side hook, :func:`per_round_eval`; the runtime itself
evaluates only before and after training). Per chain:

- ``ratio_up`` / ``ratio_down``: raw bytes ÷ coded bytes of the activations (up) and of the
  gradients (down) over all rounds; the one-time basis upload of a ``project`` chain counts as
  coded bytes up (``basis_bytes``: its tensor bytes, as the runtime counts them in
  summary.json's ``totals``; ``ratio_up_coded``: activations alone).
- ``ratio_total``: raw bytes both ways ÷ coded bytes both ways (basis included).
- ``ppl`` / ``ppl_raw``: held-out perplexity after training through the chain (what the
  deployed split model sees) and with uncompressed activations (the adapters alone).
- ``ppl_gap`` = ``ppl`` / ``ppl`` of the uncompressed run − 1; ``ppl_gap_raw`` = ``ppl_raw`` /
  ``ppl`` of the uncompressed run − 1 (0 for the uncompressed run itself).
- ``time_to_target_s``: training wall time (the sum of the run's per-round ``seconds``, from
  its summary.json; held-out evaluations not counted) until the held-out loss through the chain
  first reaches the target = the uncompressed run's final held-out loss × (1 + 2 %)
  (``--target-slack``); ``null`` if never reached. Round 0 (before training) counts as 0 s.
- ``train_s``, ``wall_s`` (the whole run, set-up and evaluations included), ``loss_curve``
  (held-out loss per round through the chain), bytes.

The uncompressed reference is the ``raw`` chain (identity codec), always run first.

    python bench/compression.py                        # every chain, SmolLM2-135M
    python bench/compression.py --quick                # ≤ 10 minutes on 2 cores (2 chains)
    python bench/compression.py --chains raw,topk0.2-b8 --default topk0.2-b8
    python bench/compression.py --model llama-tiny --cut 2 --rounds 2 --steps 2   # smoke test

Results, wall times and the settings they were measured with: BENCHMARKS.md "Compression".

Output: a header line, one table row per chain, and as the last line one JSON object: the
default chain's fields at the top level, ``uncompressed`` (the ``raw`` run), ``chains`` (every
chain's fields; a chain that failed has ``error``) and the settings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import header, machine_info
from sft_actors import log
from sft_actors.actors.coordinator_rounds import RoundsCoordinator
from sft_actors.codec import presets
from sft_actors.runtime import run_topology
from sft_actors.topology.loader import parse_topology

REFERENCE = "raw"

#: name -> the ``[run.codec]`` table ({"up": chain, "down": chain}; empty tables: identity).
#: Chains come from sft_actors.codec.presets (the planner prints the same tables).
CHAINS: dict[str, dict[str, dict[str, Any]]] = {
    "raw": {"up": {}, "down": {}},
    # The paper's chain, as topologies/local.toml has it.
    "topk0.2-b8": presets.paper_topk_tables(),
    # Transform coding with rate control (the default: activations 11x, gradients 32x).
    "transform-11/32": presets.transform_tables(*presets.DEFAULT_RATIOS),
    # Other rates: gradients tolerate more (see grads-*), activations less.
    "transform-10/96": presets.transform_tables(10.0, 96.0),
    "transform-12/32": presets.transform_tables(12.0, 32.0),
    "transform-12/24": presets.transform_tables(12.0, 24.0),
    "transform-12/96": presets.transform_tables(12.0, 96.0),
    "transform-16/48": presets.transform_tables(16.0, 48.0),
    # The KLT rotation instead of centring: its float16 basis is C·C·2 one-time bytes per device.
    "klt-12/32": presets.transform_tables(12.0, 32.0, transform="klt"),
    # What gradients tolerate: raw activations up, only the gradient chain compressed.
    "grads-32": {"up": {}, "down": presets.transform_tables(1.0, 32.0)["down"]},
    "grads-96": {"up": {}, "down": presets.transform_tables(1.0, 96.0)["down"]},
}
#: What ``--quick`` runs: the uncompressed reference and the default (≈ 3–4 min each on 2 cores).
QUICK_CHAINS = ("raw", "transform-11/32")


# --- bench-side hooks into the runtime (in-process only) ----------------------------------------


@contextlib.contextmanager
def per_round_eval() -> Iterator[None]:
    """While active (in this process): the coordinator evaluates held-out loss through the
    codec after every round, not only before and after training."""
    round_orig = RoundsCoordinator._round

    async def _round(self: RoundsCoordinator, r: int) -> None:
        await round_orig(self, r)
        if r < self.train.rounds:  # the last round's evaluation is the run's own "after"
            await self._evaluate(r)

    RoundsCoordinator._round = _round  # type: ignore[method-assign]
    try:
        yield
    finally:
        RoundsCoordinator._round = round_orig  # type: ignore[method-assign]


# --- one run ---------------------------------------------------------------------------------


def topology(a: argparse.Namespace, chain: str, out_dir: Path) -> dict[str, Any]:
    link = {"uplink_mbps": a.mbps, "downlink_mbps": a.mbps, "rtt_ms": a.rtt_ms}
    data: dict[str, Any] = {"dataset": a.dataset, "heldout_fraction": 0.1}
    if a.max_documents:
        data["options"] = {"max_documents": a.max_documents}
    return {
        "run": {
            "name": chain,
            "model": a.model,
            "seed": a.seed,
            "train": {
                "mode": "sft",
                "rounds": a.rounds,
                "steps_per_round": a.steps,
                "batch_size": a.batch,
                "seq_len": a.seq,
                "lr": a.lr,
                "aggregate_every": 1,
                "max_inflight": a.max_inflight,
                "eval_batches": a.eval_batches,
                "calibration_batches": a.calibration_batches,
            },
            "lora": {"rank": 8, "alpha": 16.0},
            "data": data,
            "codec": CHAINS[chain],
            "runtime": {"heartbeat_interval_s": 1.0, "heartbeat_timeout_s": 60.0, "request_timeout_s": 600.0},
            "output": {"dir": str(out_dir)},
        },
        "actors": [
            {"name": "coordinator", "role": "coordinator", "port": 0},
            {"name": "server", "role": "server", "port": 0},
            *(
                {"name": f"dev{i}", "role": "device", "cut": a.cut, "shard": i, "link": link}
                for i in range(a.devices)
            ),
        ],
    }


def run_chain(a: argparse.Namespace, chain: str, work: Path) -> dict[str, Any]:
    """One fine-tune with ``chain``; the fields of the docstring but the gaps (need the reference)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", chain)  # a run name and a directory name
    out = work / name
    out.mkdir(parents=True)
    doc = topology(a, chain, out / "runs")
    doc["run"]["name"] = name
    (out / "topology.json").write_text(json.dumps(doc, indent=2))
    t0 = time.perf_counter()
    try:
        with per_round_eval():
            result = asyncio.run(
                run_topology(parse_topology(doc, source=chain), transport="inproc", timeout_s=a.timeout_s)
            )
    except Exception as exc:  # one chain's failure is that chain's row, not the end of the bench
        error = f"{type(exc).__name__}: {exc}"[:2000]
        return {"chain": chain, "error": error, "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    found = sorted((out / "runs").glob(f"{name}-*/summary.json"))
    summary = json.loads(found[-1].read_text()) if found else {}
    if not result.ok or summary.get("status") != "completed":
        why = summary.get("reason") or str(result.failures) or "no summary"
        return {"chain": chain, "error": why[:2000], "wall_s": wall}
    rounds = summary["rounds"]
    raw_up = sum(r["raw_up"] for r in rounds)
    raw_down = sum(r["raw_down"] for r in rounds)
    basis_bytes = summary["totals"].get("basis_bytes", 0)  # first fits and refits
    coded_up = sum(r["bytes_up"] for r in rounds)
    up = coded_up + basis_bytes
    down = sum(r["bytes_down"] for r in rounds)
    after = summary["after"]
    after_raw = summary.get("after_raw") or after  # no codec: no separate uncompressed evaluation
    elapsed, at_end = 0.0, {0: 0.0}
    for r in rounds:
        elapsed += r["seconds"]
        at_end[r["round"]] = elapsed
    return {
        "chain": chain,
        "codec": CHAINS[chain],
        "ratio_up": raw_up / up if up else 1.0,
        "ratio_down": raw_down / down if down else 1.0,
        "ratio_total": (raw_up + raw_down) / (up + down) if up + down else 1.0,
        "ratio_up_coded": raw_up / coded_up if coded_up else 1.0,
        "raw_up": raw_up,
        "raw_down": raw_down,
        "bytes_up": up,
        "bytes_down": down,
        "basis_bytes": basis_bytes,
        "loss": after["loss"],
        "ppl": after["perplexity"],
        "loss_raw": after_raw["loss"],
        "ppl_raw": after_raw["perplexity"],
        "ppl_before": summary["before"]["perplexity"],
        "heldout_targets": after["targets"],
        "loss_curve": [[e["round"], e["loss"]] for e in summary["evals"]],
        "round_end_s": at_end,
        "train_s": elapsed,
        "setup_s": summary["setup_s"],
        "wall_s": wall,
        "train_loss_last": rounds[-1]["loss"],
    }


def time_to(row: dict[str, Any], target: float) -> float | None:
    """Training seconds until the held-out loss through the chain first reaches ``target``."""
    for r, loss in row["loss_curve"]:
        if loss is not None and math.isfinite(loss) and loss <= target:
            seconds: float = row["round_end_s"][r]
            return seconds
    return None


def finish(rows: dict[str, dict[str, Any]], target: float | None) -> None:
    """Fill in the fields relative to the uncompressed run (in place)."""
    ref = rows.get(REFERENCE)
    ref_ppl = ref["ppl"] if ref and "error" not in ref else None
    for row in rows.values():
        if "error" in row:
            continue
        row["ppl_gap"] = row["ppl"] / ref_ppl - 1.0 if ref_ppl else None
        row["ppl_gap_raw"] = row["ppl_raw"] / ref_ppl - 1.0 if ref_ppl else None
        row["time_to_target_s"] = time_to(row, target) if target is not None else None
        row.pop("round_end_s")


def fmt(x: Any, spec: str) -> str:
    """``format(x, spec)``, or "-" as wide as the spec's width where ``x`` is None."""
    if x is not None:
        return format(x, spec)
    width = re.match(r"[+-]?(\d*)", spec)
    return "-".rjust(int(width.group(1) or 0) if width else 0)


FIELDS = ("ratio_up", "ratio_down", "ratio_total", "ppl_gap", "ppl_gap_raw", "time_to_target_s")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument(
        "--chains",
        default=None,
        help=f"comma-separated, of {', '.join(CHAINS)} (default: all; --quick: {', '.join(QUICK_CHAINS)})",
    )
    p.add_argument(
        "--default", default="transform-11/32", help="the chain the JSON's top-level fields are of"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cut", type=int, default=4)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per device per round")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-inflight", type=int, default=2)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--calibration-batches", type=int, default=8)
    p.add_argument("--dataset", default="stdlib-docs")
    p.add_argument("--max-documents", type=int, default=600)
    p.add_argument("--mbps", type=float, default=20.0, help="emulated link rate, each way")
    p.add_argument("--rtt-ms", type=float, default=10.0)
    p.add_argument(
        "--target-slack", type=float, default=0.02, help="target = final uncompressed loss × (1 + this)"
    )
    p.add_argument("--timeout-s", type=float, default=1800.0)
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"only {', '.join(QUICK_CHAINS)}, 4 held-out batches; same steps and shapes",
    )
    a = p.parse_args(argv)
    if a.quick:  # the same fine-tune (40 steps of 4 × 64 tokens), fewer chains and a smaller held-out set
        a.eval_batches = 4
    chosen = a.chains if a.chains is not None else ",".join(QUICK_CHAINS if a.quick else CHAINS)
    chains = [c.strip() for c in chosen.split(",") if c.strip()]
    unknown = [c for c in chains if c not in CHAINS]
    if unknown:
        p.error(f"unknown chain(s) {unknown}; known: {', '.join(CHAINS)}")
    if REFERENCE in chains:
        chains.remove(REFERENCE)
    chains.insert(0, REFERENCE)  # the uncompressed run is the reference of the gaps and the target
    log.configure("console", level="warning")
    settings = {
        "model": a.model,
        "cut": a.cut,
        "devices": a.devices,
        "rounds": a.rounds,
        "steps_per_round": a.steps,
        "steps_per_device": a.rounds * a.steps,
        "batch": a.batch,
        "seq": a.seq,
        "lr": a.lr,
        "seed": a.seed,
        "eval_batches": a.eval_batches,
        "link_mbps": a.mbps,
        "rtt_ms": a.rtt_ms,
        "target_slack": a.target_slack,
        "quick": a.quick,
    }
    print(header("compression", **settings, chains=",".join(chains)), flush=True)
    rows: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sft-compression-") as tmp:
        for chain in chains:
            rows[chain] = run_chain(a, chain, Path(tmp))
            row = rows[chain]
            status = row.get("error", "ok")[:200]
            print(f"# {chain}: {status}  wall {row['wall_s']:.1f} s", file=sys.stderr, flush=True)
    total_s = time.perf_counter() - t0
    ref = rows[REFERENCE]
    target = ref["loss"] * (1 + a.target_slack) if "error" not in ref else None
    finish(rows, target)
    print(f"target held-out loss {fmt(target, '.4f')} (uncompressed final × {1 + a.target_slack:g})")
    print(
        f"{'chain':12} {'ratio_up':>9} {'ratio_dn':>9} {'ratio_tot':>9} {'basis_B':>8} {'ppl':>8} "
        f"{'ppl_raw':>8} {'ppl_gap':>8} {'gap_raw':>8} {'t_target':>9} {'train_s':>8} {'wall_s':>7}"
    )
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:12} failed: {r['error'][:300]}")
            continue
        print(
            f"{name:12} {r['ratio_up']:9.2f} {r['ratio_down']:9.2f} {r['ratio_total']:9.2f} "
            f"{r['basis_bytes']:8d} {r['ppl']:8.3f} {r['ppl_raw']:8.3f} {fmt(r['ppl_gap'], '+8.4f')} "
            f"{fmt(r['ppl_gap_raw'], '+8.4f')} {fmt(r['time_to_target_s'], '9.1f')} "
            f"{r['train_s']:8.1f} {r['wall_s']:7.1f}"
        )
    default = rows.get(a.default, {})
    out: dict[str, Any] = {
        "bench": "compression",
        "default": a.default,
        **{k: default.get(k) for k in FIELDS},
        "default_error": default.get("error") if default else f"{a.default} not run",
        "target_loss": target,
        "uncompressed": rows[REFERENCE],
        "chains": rows,
        **settings,
        "total_s": total_s,
        "machine": machine_info(),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
