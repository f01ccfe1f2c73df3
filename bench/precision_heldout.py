"""Held-out perplexity of a finished run's adapters over base weights in another dtype.

    .venv/bin/python bench/precision_heldout.py topologies/local.toml runs/local/local-<time>
    .venv/bin/python bench/precision_heldout.py … --dtypes float32,bfloat16

Rebuilds what the run's final uncompressed evaluation did — every device's held-out batches,
device part with the averaged device adapters up to its cut, server part with the server's
adapters after it — for each base dtype (adapters float32 as always), and prints the
perplexity ``exp(sum loss·targets / sum targets)``. The float32 row reproduces the run's own
``after_raw``; the others say what running the trained model in that dtype costs. The last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import header, machine_info

from sft_actors.dtypes import torch_dtype
from sft_actors.model import load_lora_state_dict, load_model, resolve_spec, split_model
from sft_actors.plan.assign import device_plans
from sft_actors.sharing import SHARED
from sft_actors.topology import load_topology
from sft_actors.train.data_setup import build_device_data


@torch.no_grad()
def heldout(topology: Path, run_dir: Path, dtype_name: str) -> dict[str, Any]:
    topo = load_topology(topology, log_warnings=False)
    plans = device_plans(topo)
    model = load_model(resolve_spec(topo.run.model), dtype=torch_dtype(dtype_name))
    dev_state = load_file(run_dir / "adapters_devices.safetensors")
    srv_state = load_file(run_dir / "adapters_server.safetensors")
    loss_sum, targets = 0.0, 0
    t0 = time.perf_counter()
    for plan in plans:
        device, server = split_model(model, plan.cut, lora=topo.run.lora, seed=topo.run.seed)
        load_lora_state_dict(device, dev_state, strict=False)
        load_lora_state_dict(server, srv_state, strict=False)
        data = build_device_data(
            plan.data, model=model, num_devices=plan.num_devices, shard=plan.shard, cache=SHARED.get
        )
        for inputs, labels in data.heldout:
            out = server(device(inputs), plan.cut)
            n = int((labels[:, 1:] != -100).sum())
            loss_sum += float(server.loss(out, labels)) * n
            targets += n
    loss = loss_sum / max(1, targets)
    return {
        "dtype": dtype_name,
        "loss": round(loss, 5),
        "perplexity": round(math.exp(loss), 3),
        "targets": targets,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("topology", type=Path)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--dtypes", default="float32,bfloat16")
    a = p.parse_args(argv)
    print(header("precision_heldout", topology=a.topology, run_dir=a.run_dir))
    rows = []
    for name in [d.strip() for d in a.dtypes.split(",") if d.strip()]:
        row = heldout(a.topology, a.run_dir, name)
        rows.append(row)
        ppl, secs = row["perplexity"], row["seconds"]
        print(f"{name:>9}: held-out loss {row['loss']:.4f}, perplexity {ppl:.3f} ({secs} s)")
    base = rows[0]["perplexity"]
    for row in rows:
        row["vs_first_pct"] = round((row["perplexity"] / base - 1) * 100, 3)
    summary = json.loads((a.run_dir / "summary.json").read_text())
    result = {
        "bench": "precision_heldout",
        "machine": machine_info(),
        "run_after_raw_perplexity": (summary.get("after_raw") or {}).get("perplexity"),
        "rows": rows,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
