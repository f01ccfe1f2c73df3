"""Benchmark split model parts: step time per cut, memory estimate vs measured peak, shared-base parts.

    .venv/bin/python bench/model_split.py --spec smollm2-135m --batch 4 --seq 128 --cuts 2,4,8
    .venv/bin/python bench/model_split.py --spec llama-tiny --set dim=256 --set ffn_dim=768 --cuts 1,2,4

For each cut: median device forward+backward time, server forward+backward time, the bytes
autograd saves (``saved_tensors_hooks``) against the estimate's ``activation_bytes``, and the
peak memory of a device step against ``activation + workspace + grad`` of
:func:`estimate_device_memory`, measured two ways. Then ``--parts`` device parts built from one
loaded model (shared frozen base), each with its Adam state after one step: resident bytes per part.

``alloc_peak_bytes`` is exact and the same on every machine: the running sum of torch's CPU
allocator events (the profiler's ``[memory]`` records) over one step, at its highest. The
resident peak ``peak_bytes`` is what the device's OS sees: ``VmHWM`` after resetting it
(``/proc/self/clear_refs``), with glibc's mmap threshold pinned at 64 KiB so freed tensors return
to the OS (Linux only). It is approximate: the kernel updates the high-water mark only when RSS is
about to drop, from per-CPU RSS counters it has not summed, so its error grows with the number of
CPUs and with how the scheduler moved the process between them. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_info

from sft_actors.model import (
    LoraConfig,
    estimate_device_memory,
    load_model,
    make_device_part,
    resolve_spec,
    sample_batch,
    split_model,
)

M_MMAP_THRESHOLD = -3
MEMORY_EVENT = "[memory]"  # the profiler's name for an allocation (+bytes) or a free (-bytes)


def pin_mmap_threshold() -> bool:
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024))
    except OSError:
        return False


def proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def saved_bytes(fn: Any, exclude: set[int]) -> int:
    """Bytes of distinct storages autograd saves while running ``fn`` (parameters excluded)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(n for ptr, n in seen.items() if ptr not in exclude)


def allocated_peak_bytes(fn: Any) -> int:
    """Highest bytes held through torch's CPU allocator while ``fn`` runs, above what was held
    before it: the running sum of the allocator's events, in the order they happened."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # kineto_results keeps every allocation event; prof.events() folds those inside an op into
    # the op's net usage, which hides the peak within it.
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == MEMORY_EVENT]
    if not events:
        raise RuntimeError("the profiler recorded no allocator events; cannot measure the peak")
    events.sort(key=lambda e: e.start_ns())  # stable: same-ns events stay in recorded order
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def timed(fn: Any, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_cut(model: Any, cut: int, args: argparse.Namespace, lora: LoraConfig) -> dict[str, Any]:
    device, server = split_model(model, cut, lora=lora, seed=0)
    inputs, labels = sample_batch(model, args.batch, args.seq, seed=1)

    def device_step() -> None:
        hidden = device(inputs)
        hidden.backward(torch.ones_like(hidden))

    def server_step() -> None:
        with torch.no_grad():
            hidden = device(inputs)
        x = hidden.requires_grad_()
        server.loss(server(x, cut), labels).backward()

    params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *device.trainable_parameters()]}
    est = estimate_device_memory(model.config, cut, args.batch, args.seq, lora)
    # The hidden state at the cut is held until its gradient returns: the estimate counts it.
    with torch.no_grad():
        cut_bytes = device(inputs).nbytes if cut > 0 else 0
    saved = saved_bytes(lambda: device(inputs), params) + cut_bytes
    device_s = timed(device_step, args.warmup, args.repeats)
    server_s = timed(server_step, args.warmup, args.repeats)
    peaks = []
    for _ in range(max(1, args.repeats)):
        gc.collect()
        reset_peak()
        base = proc_status("VmRSS")
        device_step()
        peaks.append(proc_status("VmHWM") - base)
    peak = statistics.median(peaks)
    alloc_peak = allocated_peak_bytes(device_step)
    predicted = est.activation_bytes + est.workspace_bytes + est.grad_bytes
    return {
        "cut": cut,
        "device_step_ms": device_s * 1e3,
        "server_step_ms": server_s * 1e3,
        "saved_bytes": saved,
        "est_activation_bytes": est.activation_bytes,
        "saved_ratio": saved / max(est.activation_bytes, 1),
        "peak_bytes": peak,
        "est_step_bytes": predicted,
        "peak_ratio": peak / max(predicted, 1),
        "alloc_peak_bytes": alloc_peak,
        "alloc_peak_ratio": alloc_peak / max(predicted, 1),
        "est_total_bytes": est.total_bytes,
    }


def bench_parts(model: Any, n: int, cut: int, args: argparse.Namespace, lora: LoraConfig) -> dict[str, Any]:
    """Resident bytes per device part (shared base + own adapters + Adam state after one small step)."""
    inputs, _ = sample_batch(model, 1, min(args.seq, 32), seed=2)  # one small step: allocates Adam state
    gc.collect()
    before = proc_status("VmRSS")
    parts, optims = [], []
    for i in range(n):
        part = make_device_part(model, cut, lora, seed=i)
        opt = torch.optim.Adam(part.trainable_parameters(), lr=1e-3)
        hidden = part(inputs)
        hidden.backward(torch.ones_like(hidden))
        opt.step()
        opt.zero_grad(set_to_none=True)
        del hidden
        parts.append(part)
        optims.append(opt)
    gc.collect()
    after = proc_status("VmRSS")
    shared = all(p.model is model for p in parts)
    return {"parts": n, "rss_per_part_bytes": (after - before) / max(n, 1), "shared_base": shared}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default="llama-tiny")
    ap.add_argument(
        "--set", action="append", default=[], metavar="FIELD=INT", help="config override, e.g. dim=256"
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--cuts", default="1,2,4")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--mlp", action="store_true")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--parts", type=int, default=64, help="device parts for the shared-base measurement (0: skip)"
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    pinned = pin_mmap_threshold()
    overrides = {k: int(v) for k, v in (s.split("=", 1) for s in args.set)}
    info = machine_info()
    t0 = time.perf_counter()
    model = load_model(resolve_spec(args.spec, **overrides))
    load_s = time.perf_counter() - t0
    lora = LoraConfig(rank=args.rank, mlp=args.mlp)
    cuts = [int(c) for c in args.cuts.split(",")]
    print(f"machine: {info}")
    print(
        f"model {args.spec} {overrides or ''}: {model.num_blocks} blocks, load {load_s:.2f} s; "
        f"batch {args.batch}, seq {args.seq}, LoRA r={args.rank} mlp={args.mlp}; "
        f"mmap threshold pinned: {pinned}"
    )
    rows = [bench_cut(model, c, args, lora) for c in cuts]
    print(
        f"{'cut':>4} {'device ms':>10} {'server ms':>10} {'saved MiB':>10} {'est MiB':>9} {'ratio':>6} "
        f"{'peak MiB':>9} {'alloc MiB':>9} {'est MiB':>9} {'ratio':>6} {'alloc':>6}"
    )
    for r in rows:
        print(
            f"{r['cut']:>4} {r['device_step_ms']:>10.2f} {r['server_step_ms']:>10.2f} "
            f"{r['saved_bytes'] / 2**20:>10.2f} {r['est_activation_bytes'] / 2**20:>9.2f} "
            f"{r['saved_ratio']:>6.3f} {r['peak_bytes'] / 2**20:>9.2f} {r['alloc_peak_bytes'] / 2**20:>9.2f} "
            f"{r['est_step_bytes'] / 2**20:>9.2f} {r['peak_ratio']:>6.3f} {r['alloc_peak_ratio']:>6.3f}"
        )
    parts = bench_parts(model, args.parts, min(cuts), args, lora) if args.parts > 0 else None
    if parts:
        print(
            f"{parts['parts']} device parts (cut {min(cuts)}, shared base): "
            f"{parts['rss_per_part_bytes'] / 2**20:.3f} MiB resident each"
        )
    print(
        json.dumps(
            {
                "spec": args.spec,
                "overrides": overrides,
                "load_s": load_s,
                "batch": args.batch,
                "seq": args.seq,
                "mmap_threshold_pinned": pinned,
                "cuts": rows,
                "parts": parts,
                "machine": info,
            }
        )
    )


if __name__ == "__main__":
    main()
