"""Server step throughput on an accelerator: SmolLM2-135M's server part in bfloat16 on CUDA.

    .venv/bin/python bench/gpu_server.py                          # smollm2-135m, cuda, bf16 + fp32
    .venv/bin/python bench/gpu_server.py --device cpu --quick     # CI smoke: llama-tiny, seconds

Drives the head server's pure state machine (:class:`~sft_actors.train.server_trainer.ServerTrainer`)
with synthetic cut activations, through the same wire path a real server takes: the device's
activations are packed as raw wire tensors in the run's dtype (bfloat16: 16-bit words), decoded
on the host, moved to the server's device from a pinned buffer (``to_compute``), trained on
(forward from the cut, float32 loss, backward, AdamW step on float32 adapters), and the cut
gradient is copied back into a pinned host buffer and packed for the wire. Each dtype gets
``--warmup`` untimed steps and ``--repeats`` timed ones (CUDA synchronised per step); reported:
median step ms, micro-batches/s and tokens/s (both from the median), peak device memory.
The last line is one JSON object (``rows`` per dtype, ``bf16_speedup`` = fp32 median / bf16
median when both ran).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import header, machine_info

from sft_actors.dtypes import torch_dtype
from sft_actors.model import LoraConfig, load_model, resolve_spec, split_model
from sft_actors.placement import resolve_device
from sft_actors.train.server_trainer import ServerTrainer
from sft_actors.wire.coded import pack_tensor, unpack_tensor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model spec (default smollm2-135m; --quick: llama-tiny)")
    p.add_argument("--device", default="cuda", help='where the server computes: "cpu", "cuda", "cuda:N"')
    p.add_argument("--dtypes", default="bfloat16,float32", help="base dtypes to time, comma-separated")
    p.add_argument("--cut", type=int, default=None, help="the device's cut (default 2; --quick: 1)")
    p.add_argument("--batch", type=int, default=None, help="micro-batch (default 8; --quick: 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sample (default 256; --quick: 16)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5; --quick: 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps (default 30; --quick: 3)")
    p.add_argument("--quick", action="store_true", help="tiny defaults for a CI smoke run")
    a = p.parse_args(argv)
    quick = a.quick
    defaults = {
        "model": "llama-tiny" if quick else "smollm2-135m",
        "cut": 1 if quick else 2,
        "batch": 2 if quick else 8,
        "seq": 16 if quick else 256,
        "warmup": 1 if quick else 5,
        "repeats": 3 if quick else 30,
    }
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    return a


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_dtype(a: argparse.Namespace, device: torch.device, dtype_name: str) -> dict[str, Any]:
    """Load the model in ``dtype_name`` on ``device`` and time ``a.repeats`` server steps."""
    dtype = torch_dtype(dtype_name)
    t0 = time.perf_counter()
    model = load_model(resolve_spec(a.model), dtype=dtype)
    model = model if device.type == "cpu" else model.to(device)
    load_s = time.perf_counter() - t0
    _, part = split_model(model, a.cut, lora=LoraConfig(rank=a.rank, alpha=2.0 * a.rank))
    trainer = ServerTrainer(part, lr=1e-4)
    cfg = model.config
    vocab = getattr(cfg, "vocab_size", 256)
    gen = torch.Generator().manual_seed(0)
    # What a device would send: cut activations of a plausible scale, in the run's dtype.
    hidden = (torch.randn(a.batch, a.seq, cfg.dim, generator=gen) * 0.5).to(dtype)
    labels = torch.randint(0, vocab, (a.batch, a.seq), generator=gen)
    act_wire, _ = pack_tensor(hidden, None, seed=0)
    label_wire, _ = pack_tensor(labels, None, seed=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_ms: list[float] = []
    losses: list[float] = []
    for i in range(a.warmup + a.repeats):
        _sync(device)
        t = time.perf_counter()
        x = unpack_tensor(act_wire, max_shape=hidden.shape)  # host, run dtype
        y = unpack_tensor(label_wire)
        res = trainer.train_step(x, y, a.cut)  # moves x to the device (pinned, non_blocking)
        assert res.grad is not None
        grad_wire, _ = pack_tensor(res.grad, None, seed=i)  # back into a pinned host buffer
        _sync(device)
        if i >= a.warmup:
            step_ms.append((time.perf_counter() - t) * 1e3)
            losses.append(res.loss)
    med = statistics.median(step_ms)
    tokens = a.batch * a.seq
    adapters = {p.dtype for p in trainer.params.values()}
    return {
        "dtype": dtype_name,
        "wire_dtype": act_wire.desc.dtype,
        "grad_wire_dtype": grad_wire.desc.dtype,
        "activation_bytes": act_wire.desc.nbytes,
        "adapter_dtypes": sorted(str(d).removeprefix("torch.") for d in adapters),
        "load_s": round(load_s, 3),
        "step_ms_median": round(med, 3),
        "step_ms_min": round(min(step_ms), 3),
        "step_ms_max": round(max(step_ms), 3),
        "micro_batches_per_s": round(1e3 / med, 3),
        "tokens_per_s": round(tokens * 1e3 / med, 1),
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "peak_mem_mib": (
            round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None
        ),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    device = resolve_device(a.device, actor="bench")
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    info = {"device": str(device), "model": a.model, "cut": a.cut, "batch": a.batch, "seq": a.seq}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    print(header("gpu_server", **info))
    rows = []
    for name in dtypes:
        row = time_dtype(a, device, name)
        rows.append(row)
        print(
            f"{name:>9}: step {row['step_ms_median']:.2f} ms (median of {a.repeats}), "
            f"{row['micro_batches_per_s']:.2f} micro-batches/s, {row['tokens_per_s']:.0f} tokens/s, "
            f"wire {row['wire_dtype']} {row['activation_bytes']} B, "
            f"loss {row['loss_first']}→{row['loss_last']}"
        )
    by = {r["dtype"]: r for r in rows}
    speedup = None
    if "bfloat16" in by and "float32" in by:
        speedup = round(by["float32"]["step_ms_median"] / by["bfloat16"]["step_ms_median"], 3)
    result = {
        "bench": "gpu_server",
        "machine": machine_info(),
        **info,
        "warmup": a.warmup,
        "repeats": a.repeats,
        "rows": rows,
        "bf16_speedup": speedup,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
