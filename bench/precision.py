"""How much of LoRA's update survives low-precision storage: the fraction of ``lora_A`` entries
that change in the first steps, per (base dtype, adapter dtype).

    .venv/bin/python bench/precision.py                       # smollm2-135m, 5 steps at lr 1e-4
    .venv/bin/python bench/precision.py --model llama-tiny    # seconds

A split step (device blocks ``[0, cut)``, server the rest, the cut gradient handed back) on real
text-like token ids, ``--steps`` times with AdamW at ``--lr``. Adapters stored in bfloat16 lose
most of AdamW's first updates (``lr`` ≈ 1e-4 is below half a bfloat16 ulp of most entries), which
is why the runtime keeps adapters and optimizer state in float32 (as PEFT does) whatever the
base dtype. Rows: base dtype, adapter dtype, changed fraction of the device's and the server's
``lora_A``, final loss. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import header, machine_info

from sft_actors.dtypes import torch_dtype
from sft_actors.model import LoraConfig, load_model, resolve_spec, split_model
from sft_actors.train.device_trainer import DeviceTrainer
from sft_actors.train.server_trainer import ServerTrainer

CASES = (("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16"))


def changed_fraction(params: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> float:
    changed = sum(int((params[n] != before[n]).sum()) for n in before)
    return changed / max(1, sum(t.numel() for t in before.values()))


def run_case(a: argparse.Namespace, base: str, adapter: str) -> dict[str, Any]:
    model = load_model(resolve_spec(a.model), dtype=torch_dtype(base))
    dev, srv = split_model(model, a.cut, lora=LoraConfig(rank=8, alpha=16.0))
    if adapter != "float32":  # the old behaviour: adapters stored in the base dtype
        dev.adapters.to(torch_dtype(adapter))
        srv.adapters.to(torch_dtype(adapter))
    dtr, strn = DeviceTrainer(dev, lr=a.lr), ServerTrainer(srv, lr=a.lr)
    a_dev = {n: p.detach().clone() for n, p in dtr.params.items() if n.endswith("lora_A")}
    a_srv = {n: p.detach().clone() for n, p in strn.params.items() if n.endswith("lora_A")}
    vocab = getattr(model.config, "vocab_size", 256)
    loss = float("nan")
    for step in range(a.steps):
        ids = torch.randint(0, vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(step))
        res = strn.train_step(dtr.forward(step, ids), ids, a.cut)
        assert res.grad is not None
        dtr.backward(step, res.grad)
        loss = res.loss
    return {
        "base": base,
        "adapter": adapter,
        "device_lora_A_changed": round(changed_fraction(dtr.params, a_dev), 4),  # type: ignore[arg-type]
        "server_lora_A_changed": round(changed_fraction(strn.params, a_srv), 4),  # type: ignore[arg-type]
        "loss_last": round(loss, 4),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--cut", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=32)
    a = p.parse_args(argv)
    print(header("precision", model=a.model, steps=a.steps, lr=a.lr))
    rows = []
    for base, adapter in CASES:
        row = run_case(a, base, adapter)
        rows.append(row)
        print(
            f"base {base:>8} adapters {adapter:>8}: lora_A changed device "
            f"{row['device_lora_A_changed']:.1%} server {row['server_lora_A_changed']:.1%}, "
            f"loss {row['loss_last']}"
        )
    result = {"bench": "precision", "machine": machine_info(), **vars(a), "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
