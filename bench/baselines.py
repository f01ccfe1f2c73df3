"""Split fine-tuning vs its baselines, side by side, in the same runtime.

Modes ``sl`` (vanilla split learning: one device at a time, uncompressed), ``sfl`` (parallel,
uncompressed) and ``sft`` (parallel + codec), plus ``fedlora`` (whole model on every device)
for memory, on the same model, data, seeds, cuts and emulated wireless links, each run to the
same number of training samples. Reports per mode: wall-clock delay, bytes up/down, held-out
metric before/after, device peak memory (the model layer's estimate for the largest device
part), and the paper's headline ratios.

Devices share the machine's CPU cores, so in-process "parallel" devices do not compute in
parallel here; with emulated links the delay gain of ``sfl``/``sft`` over ``sl`` comes from
overlapping link time, which is what the emulated wireless network is for.

    python bench/baselines.py                 # 8 devices, llama-tiny, links 10–50 Mbit/s, rtt 20 ms
    python bench/baselines.py --tiny          # CI: < 1 minute
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import git_commit  # noqa: E402

from sft_actors import log  # noqa: E402
from sft_actors.model import load_config, resolve_spec  # noqa: E402
from sft_actors.model.lora import LoraConfig  # noqa: E402
from sft_actors.model.memory import estimate_device_memory  # noqa: E402
from sft_actors.runtime import run_topology  # noqa: E402
from sft_actors.topology import load_topology  # noqa: E402

MODES = ("sl", "sfl", "sft", "fedlora")

CODEC = """
[run.codec.up]
sparsify = {{ keep = {keep}, scope = "tensor" }}
quantize = {{ bits = {bits}, scale = "token" }}
lossless = {{ positions = "bitmap", zstd_level = 3 }}
[run.codec.down]
sparsify = {{ keep = {keep}, scope = "tensor" }}
quantize = {{ bits = {bits}, scale = "token" }}
lossless = {{ positions = "bitmap", zstd_level = 3 }}
"""

# Transform coding up (a PCA basis per device, fitted on its own activations and sent once),
# Top-K down (gradients have no calibration data for a basis).
PCA_CODEC = """
[run.codec.up]
outliers = {{ first_tokens = 1 }}
project = {{ basis = "pca" }}
quantize = {{ bits = {bits}, scale = "channel" }}
lossless = {{ zstd_level = 3 }}
[run.codec.down]
sparsify = {{ keep = {keep}, scope = "tensor" }}
quantize = {{ bits = 8, scale = "token" }}
lossless = {{ positions = "bitmap", zstd_level = 3 }}
"""


def codec_tables(a: argparse.Namespace) -> str:
    template = PCA_CODEC if a.codec == "pca" else CODEC
    return template.format(keep=a.keep, bits=a.bits)


def data_options(a: argparse.Namespace) -> str:
    """Text corpora take a size cap; image datasets take no options."""
    if a.dataset == "stdlib-docs" and a.max_documents:
        return f"options = {{ max_documents = {a.max_documents} }}"
    return ""


def topology_text(a: argparse.Namespace, mode: str, out_dir: Path) -> str:
    devices = []
    for i in range(a.devices):
        cut = a.cuts[i % len(a.cuts)]
        up = a.uplink_min + (a.uplink_max - a.uplink_min) * (i / max(1, a.devices - 1))
        devices.append(
            f'[[actors]]\nname = "dev{i}"\nrole = "device"\ncut = {cut}\nshard = {i}\n'
            f"link = {{ uplink_mbps = {up:.1f}, downlink_mbps = {2 * up:.1f}, rtt_ms = {a.rtt_ms} }}\n"
        )
    return f"""
[run]
name = "{mode}"
model = "{a.model}"
seed = {a.seed}

[run.train]
mode = "{mode}"
rounds = {a.rounds}
steps_per_round = {a.steps}
batch_size = {a.batch}
seq_len = {a.seq}
lr = {a.lr}
aggregate_every = 1
max_inflight = {a.max_inflight}
eval_batches = {a.eval_batches}

[run.lora]
rank = 8
alpha = 16.0

[run.data]
dataset = "{a.dataset}"
{data_options(a)}

{codec_tables(a)}

[run.runtime]
heartbeat_interval_s = 1.0
heartbeat_timeout_s = 30.0
request_timeout_s = 300.0

[run.output]
dir = "{out_dir}"

[[actors]]
name = "coordinator"
role = "coordinator"
port = 0

[[actors]]
name = "server"
role = "server"
port = 0

{"".join(devices)}
"""


def peak_device_memory_mb(a: argparse.Namespace, mode: str) -> float:
    cfg = load_config(resolve_spec(a.model))
    cut = cfg.num_blocks if mode == "fedlora" else max(a.cuts)
    est = estimate_device_memory(cfg, cut, a.batch, a.seq, LoraConfig(rank=8, alpha=16.0))
    total = est.total_bytes
    if mode == "fedlora":  # the device also holds the final norm and head
        total += est.head_params * 4
    return total / 2**20


def run_mode(a: argparse.Namespace, mode: str, work: Path) -> dict[str, Any]:
    out = work / mode
    out.mkdir(parents=True)
    path = out / "topology.toml"
    path.write_text(topology_text(a, mode, out / "runs"))
    t0 = time.perf_counter()
    result = asyncio.run(run_topology(load_topology(path), transport=a.transport, timeout_s=a.timeout_s))
    wall = time.perf_counter() - t0
    if not result.ok:
        raise SystemExit(f"mode {mode} failed: {result.failures}")
    summary = json.loads(next((out / "runs").glob(f"{mode}-*/summary.json")).read_text())
    after = summary["after"]
    train_s = sum(r["seconds"] for r in summary["rounds"])
    return {
        "mode": mode,
        "delay_s": train_s,
        "wall_s": wall,
        "bytes_up": summary["totals"]["bytes_up"],
        "bytes_down": summary["totals"]["bytes_down"],
        "metric": after["perplexity"] if after["perplexity"] is not None else after["accuracy"],
        "metric_before": summary["before"]["perplexity"] or summary["before"]["accuracy"],
        "metric_raw": (summary.get("after_raw") or after)["perplexity"],
        "device_peak_mb": peak_device_memory_mb(a, mode),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", default="stdlib-docs")
    p.add_argument("--max-documents", type=int, default=200)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--cuts", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--max-inflight", type=int, default=1)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--codec", choices=["topk", "pca"], default="topk", help="the sft mode's activation chain")
    p.add_argument("--keep", type=float, default=0.2)
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--uplink-min", type=float, default=10.0)
    p.add_argument("--uplink-max", type=float, default=50.0)
    p.add_argument("--rtt-ms", type=float, default=20.0)
    p.add_argument("--transport", default="inproc", choices=["inproc", "ipc", "tcp"])
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--timeout-s", type=float, default=1800.0)
    p.add_argument("--tiny", action="store_true", help="a few steps on 3 devices, for CI")
    a = p.parse_args(argv)
    if a.tiny:
        a.devices, a.rounds, a.steps, a.batch, a.seq, a.eval_batches, a.max_documents = 3, 1, 2, 2, 32, 2, 30
    torch.set_num_threads(1)
    log.configure("console", level="warning")
    print(
        f"# baselines  {platform.platform()}  cpus={os.cpu_count()}  torch={torch.__version__}  "
        f"commit={git_commit()}  model={a.model} devices={a.devices} cuts={a.cuts} "
        f"links {a.uplink_min}-{a.uplink_max} Mbit/s rtt {a.rtt_ms} ms"
    )
    rows = {}
    with tempfile.TemporaryDirectory(prefix="sft-bench-") as tmp:
        for mode in a.modes.split(","):
            rows[mode] = run_mode(a, mode, Path(tmp))
    print(
        f"{'mode':8} {'delay_s':>9} {'bytes_up':>12} {'bytes_down':>12} "
        f"{'metric':>9} {'raw':>9} {'dev_MB':>8}"
    )
    for r in rows.values():
        print(
            f"{r['mode']:8} {r['delay_s']:9.2f} {r['bytes_up']:12d} {r['bytes_down']:12d} "
            f"{r['metric']:9.3f} {r['metric_raw']:9.3f} {r['device_peak_mb']:8.1f}"
        )
    out: dict[str, Any] = {"modes": rows, "samples_per_mode": a.devices * a.rounds * a.steps * a.batch}
    if "sft" in rows and "sl" in rows:
        out["delay_ratio_sft_vs_sl"] = rows["sft"]["delay_s"] / rows["sl"]["delay_s"]
    if "sft" in rows and "sfl" in rows:
        sft, sfl = rows["sft"], rows["sfl"]
        out["bytes_ratio_sft_vs_sfl"] = (sft["bytes_up"] + sft["bytes_down"]) / max(
            1, sfl["bytes_up"] + sfl["bytes_down"]
        )
        out["metric_gap_sft_vs_sfl"] = sft["metric"] / sfl["metric"] - 1.0
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
