"""Benchmark many simulated devices in one process: memory per device and round time.

    .venv/bin/python bench/scale.py                        # N = 256 devices, llama-tiny
    .venv/bin/python bench/scale.py --devices 4 --model llama-tiny --seq 8   # smoke

All actors run in one process over inproc (``run_topology``). The frozen base model is loaded
once and shared; each device holds its own LoRA adapters and optimizer, its own sockets,
tasks and mailbox. One round: the coordinator broadcasts ROUND_START, every device runs one
split step against the shared server (forward → ACTIVATIONS → GRADIENTS → backward) and
answers ROUND_DONE. ``extra_rss_mb_per_device`` is (RSS at the end of the round − RSS before
the run) / N, measured after a warm-up step so allocator and thread pools already exist
(target ≤ 20 MB at N = 256). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_info

from sft_actors import log
from sft_actors.actors.base import Actor
from sft_actors.actors.handlers import MsgContext
from sft_actors.actors.tasks import gather_owned
from sft_actors.model import LoraConfig, load_model, make_device_part, resolve_spec, sample_batch, split_model
from sft_actors.runtime import run_topology
from sft_actors.topology import ActorSpec, Topology, parse_topology
from sft_actors.wire.messages import Activations, Gradients, RoundDone, RoundStart
from sft_actors.wire.plans import RoundStats
from sft_actors.wire.tensors import WireTensor

SHARED: dict[str, Any] = {}  # the frozen base model and the batch, shared by every actor


def rss_mb() -> float:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class ScaleServer(Actor):
    def __init__(self, spec: ActorSpec, env: Any) -> None:
        super().__init__(spec, env)
        _, self.part = split_model(SHARED["model"], SHARED["cut"], lora=LoraConfig(rank=4))
        self.opt = torch.optim.SGD(list(self.part.parameters()), lr=1e-3)

    def _step(self, hidden: torch.Tensor, labels: torch.Tensor, cut: int) -> tuple[torch.Tensor, float]:
        x = hidden.requires_grad_()
        loss = self.part.loss(self.part(x, cut), labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        assert x.grad is not None
        return x.grad, float(loss.detach())

    async def on_activations(self, msg: Activations, ctx: MsgContext) -> Gradients:
        grad, loss = await self.offload(
            self._step, msg.activations.to_torch(), msg.labels.to_torch(), msg.cut
        )
        return Gradients(
            device=msg.device, round=msg.round, step=msg.step, grad=WireTensor.from_torch(grad), loss=loss,
            n_tokens=int(msg.labels.desc.numel),
        )  # fmt: skip


class ScaleDevice(Actor):
    def __init__(self, spec: ActorSpec, env: Any) -> None:
        super().__init__(spec, env)
        self.part = make_device_part(SHARED["model"], SHARED["cut"], LoraConfig(rank=4), seed=spec.shard or 0)
        self.opt = torch.optim.SGD(list(self.part.parameters()), lr=1e-3)

    def _backward(self, hidden: torch.Tensor, grad: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.part.backward_from(hidden, grad)
        self.opt.step()

    async def on_round_start(self, msg: RoundStart, ctx: MsgContext) -> RoundDone:
        inputs, labels = SHARED["batch"]
        hidden = await self.offload(self.part, inputs)
        reply = await self.call("server", Activations(
            device=self.name, round=msg.round, step=0, cut=SHARED["cut"],
            activations=WireTensor.from_torch(hidden.detach()), labels=WireTensor.from_torch(labels),
            n_samples=int(inputs.shape[0]), sent_at_ns=time.time_ns(),
        ))  # fmt: skip
        await self.offload(self._backward, hidden, reply.grad.to_torch())
        nbytes = hidden.numel() * hidden.element_size()
        stats = RoundStats(
            bytes_up=nbytes, bytes_down=nbytes, raw_up=nbytes, raw_down=nbytes, encode_ms=0.0,
            round_s=0.0, step_ms_median=0.0, targets=int(labels.numel()),
        )  # fmt: skip
        return RoundDone(device=self.name, round=msg.round, n_samples=1, loss=reply.loss, stats=stats)


class RoundCoordinator(Actor):
    async def run(self) -> dict[str, Any]:
        devices = [d.name for d in self.topology.devices]
        t0 = time.perf_counter()
        await self.wait_for_peers([*devices, "server"], timeout_s=600)
        connect_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        await gather_owned(*(self.call(d, RoundStart(round=0)) for d in devices))
        return {"connect_s": connect_s, "round_s": time.perf_counter() - t0, "rss_mb": rss_mb()}


def topology(model: str, n: int) -> Topology:
    doc = {
        "run": {
            "name": "scale", "model": model,
            "runtime": {"heartbeat_interval_s": 2.0, "heartbeat_timeout_s": 60.0, "connect_timeout_s": 600.0,
                        "request_timeout_s": 600.0, "drain_timeout_s": 30.0},
        },
        "actors": [
            {"name": "coordinator", "role": "coordinator", "port": 0},
            {"name": "server", "role": "server", "port": 0},
            *({"name": f"dev{i}", "role": "device", "cut": SHARED["cut"]} for i in range(n)),
        ],
    }  # fmt: skip
    return parse_topology(doc, source="<bench/scale>")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=256)
    parser.add_argument("--model", default="llama-tiny")
    parser.add_argument("--cut", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    args = parser.parse_args(argv)
    log.configure("console", "warning")
    torch.set_num_threads(1)
    info = machine_info()
    print("machine:", json.dumps(info))
    model = load_model(resolve_spec(args.model))
    SHARED.update(model=model, cut=args.cut, batch=sample_batch(model, args.batch, args.seq, seed=0))
    # Warm-up: one plain split step so allocator, autograd and thread pools already exist.
    dev, srv = split_model(model, args.cut, lora=LoraConfig(rank=4))
    x = dev(SHARED["batch"][0]).detach().requires_grad_()
    srv.loss(srv(x, args.cut), SHARED["batch"][1]).backward()
    del dev, srv, x
    rss_before = rss_mb()
    t0 = time.perf_counter()
    roles = {"coordinator": RoundCoordinator, "server": ScaleServer, "device": ScaleDevice}
    run = asyncio.run(run_topology(topology(args.model, args.devices), roles=roles, timeout_s=1800))
    run.raise_for_failures()
    total_s = time.perf_counter() - t0
    stats = run.result
    extra = (stats["rss_mb"] - rss_before) / args.devices
    result = {
        "bench": "scale", "machine": info, "model": args.model, "devices": args.devices,
        "rss_before_mb": rss_before, "rss_round_mb": stats["rss_mb"], "extra_rss_mb_per_device": extra,
        "connect_s": stats["connect_s"], "round_s": stats["round_s"], "total_s": total_s,
    }  # fmt: skip
    print(f"{'devices':>8} {'RSS before MB':>14} {'RSS round MB':>13} {'extra MB/dev':>13} {'round s':>8}")
    row = f"{rss_before:>14.1f} {stats['rss_mb']:>13.1f} {extra:>13.3f} {stats['round_s']:>8.2f}"
    print(f"{args.devices:>8} {row}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
