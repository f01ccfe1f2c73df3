"""What LoRA averaging costs and how far FedAvg of the factors is from the average of products.

Synthetic adapters on SmolLM2-135M shapes (d = 576, GQA: k/v project to 192; q, k, v, o), device
*n* of N holding blocks ``[0, cut_n)`` with cuts spread up to ``--blocks`` (as
``topologies/local.toml``: 2/4/6/8). Every device starts from one shared A (as a run does: one
seed) and moves it by ``--drift`` (relative), with its own B. Per aggregation, medians over
``--repeats`` after ``--warmup``:

- ``fedavg``: ``average_per_block`` (A and B averaged separately, no error metrics);
- ``fedavg+errors`` / ``svd``: ``average_lora`` (both errors; svd also re-factorizes), which works
  on the stacked factors (thin QRs + an (N·r)² SVD, ΔW never formed);
- ``dense_svd``: the textbook way, for reference: form ΔW (out × in, fp64) and
  ``torch.linalg.svd`` it; ``svd_lowrank``: ``torch.svd_lowrank`` of the dense ΔW (q = r + 8,
  2 power iterations) — with its error against the exact truncation.

The last line is one JSON object. ``--quick`` is for CI (tiny sizes, one repeat).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import header, machine_info
from sft_actors.train.aggregate import Contribution, average_per_block
from sft_actors.train.lora_average import average_lora

PROJECTIONS = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576)}  # (out, in)


def contributions(
    *, blocks: int, devices: int, rank: int, drift: float, scale: float, seed: int
) -> list[Contribution]:
    """Device n holds blocks [0, cut_n), cuts evenly up to ``blocks``; equal sample counts."""
    g = torch.Generator().manual_seed(seed)
    shapes = {k: (round(o * scale), round(i * scale)) for k, (o, i) in PROJECTIONS.items()}
    shared = {
        (b, p): torch.randn(rank, i, generator=g) / i**0.5
        for b in range(blocks)
        for p, (_, i) in shapes.items()
    }
    out = []
    for n in range(devices):
        cut = max(1, round(blocks * (n + 1) / devices))
        tensors: dict[str, torch.Tensor] = {}
        for b in range(cut):
            for p, (o, _) in shapes.items():
                a0 = shared[(b, p)]
                tensors[f"blocks.{b}.{p}.lora_A"] = a0 + drift * a0.std() * torch.randn(a0.shape, generator=g)
                tensors[f"blocks.{b}.{p}.lora_B"] = 0.01 * torch.randn(o, rank, generator=g)
        out.append(Contribution(device=f"dev{n}", n_samples=16, tensors=tensors))
    return out


def pairs_of(cs: list[Contribution]) -> dict[str, list[tuple[float, torch.Tensor, torch.Tensor]]]:
    """Per projection held by 2+ devices: [(weight, B, A)] in fp64."""
    by: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for c in cs:
        for k in c.tensors:
            if k.endswith(".lora_A"):
                p = k[: -len(".lora_A")]
                b, a = c.tensors[p + ".lora_B"].double(), c.tensors[k].double()
                by.setdefault(p, []).append((c.n_samples, b, a))
    return {p: [(n / sum(x[0] for x in v), b, a) for n, b, a in v] for p, v in by.items() if len(v) > 1}


def dense_svd(
    pairs: dict[str, list[tuple[float, torch.Tensor, torch.Tensor]]], rank: int
) -> dict[str, torch.Tensor]:
    out = {}
    for p, items in pairs.items():
        dw = sum(w * b @ a for w, b, a in items)  # (out, in)
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)
        out[p] = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return out


def lowrank_svd(
    pairs: dict[str, list[tuple[float, torch.Tensor, torch.Tensor]]], rank: int
) -> dict[str, torch.Tensor]:
    out = {}
    for p, items in pairs.items():
        dw = sum(w * b @ a for w, b, a in items)
        u, s, v = torch.svd_lowrank(dw, q=rank + 8, niter=2)
        out[p] = (u[:, :rank] * s[:rank]) @ v[:, :rank].T
    return out


def timed(fn: Callable[[], Any], warmup: int, repeats: int) -> tuple[float, Any]:
    result = None
    for _ in range(warmup):
        result = fn()
    ms = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        ms.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ms), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--drift", type=float, default=0.3, help="per-device change of A, relative to its std")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink the projections (quick runs)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="CI: 2 blocks, 2 devices, 1/8 size, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.blocks, args.devices, args.scale, args.repeats, args.warmup = 2, 2, 0.125, 1, 1
    print(
        header("lora_averaging", blocks=args.blocks, devices=args.devices, rank=args.rank, drift=args.drift)
    )
    cs = contributions(
        blocks=args.blocks,
        devices=args.devices,
        rank=args.rank,
        drift=args.drift,
        scale=args.scale,
        seed=args.seed,
    )
    pairs = pairs_of(cs)
    w, r = args.warmup, args.repeats
    ms: dict[str, float] = {}
    ms["fedavg"], _ = timed(lambda: average_per_block(cs), w, r)
    ms["fedavg+errors"], fed = timed(lambda: average_lora(cs, "fedavg"), w, r)
    ms["svd"], svd = timed(lambda: average_lora(cs, "svd"), w, r)
    ms["dense_svd"], dense = timed(lambda: dense_svd(pairs, args.rank), w, r)
    ms["svd_lowrank"], low = timed(lambda: lowrank_svd(pairs, args.rank), w, r)

    def rel(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((x - y).norm() / y.norm())

    got = {p: svd.tensors[p + ".lora_B"].double() @ svd.tensors[p + ".lora_A"].double() for p in pairs}
    vs_dense = max(rel(got[p], dense[p]) for p in pairs)  # fp32 output: ~1e-7
    lowrank_err = max(rel(low[p], dense[p]) for p in pairs)
    st = svd.stats
    for name, value in ms.items():
        print(f"{name:>14}  {value:9.2f} ms per aggregation")
    print(
        f"projections {st.projections} (held by 2+ devices); errors: fedavg {st.fedavg_error:.4f} "
        f"(max {st.fedavg_error_max:.4f}), rank-{args.rank} svd {st.svd_error:.4f} "
        f"(max {st.svd_error_max:.4f}); "
        f"factored vs dense SVD {vs_dense:.1e}, svd_lowrank vs exact {lowrank_err:.1e}"
    )
    result = {
        "blocks": args.blocks,
        "devices": args.devices,
        "rank": args.rank,
        "drift": args.drift,
        "scale": args.scale,
        "repeats": args.repeats,
        "projections": st.projections,
        "refactorized": st.refactorized,
        "ms": ms,
        "svd_vs_fedavg_ms_ratio": ms["svd"] / ms["fedavg"] if ms["fedavg"] else None,
        "dense_vs_factored_ms_ratio": ms["dense_svd"] / ms["svd"] if ms["svd"] else None,
        "fedavg_error": st.fedavg_error,
        "fedavg_error_max": st.fedavg_error_max,
        "svd_error": st.svd_error,
        "svd_error_max": st.svd_error_max,
        "fedavg_stats_equal": fed.stats.fedavg_error == st.fedavg_error,
        "factored_vs_dense_rel": vs_dense,
        "svd_lowrank_vs_exact_rel": lowrank_err,
        "machine": machine_info(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
