"""Benchmark one split training step through the actor runtime against the same step without it.

    .venv/bin/python bench/step.py                                   # vit-small, batch 8, cut 6
    .venv/bin/python bench/step.py --model vit-tiny --batch 2 --cut 2 --repeats 3 --warmup 1  # smoke

Three ways to run the same step (device forward → activations to the server → server forward,
loss, backward → gradient back → device backward → both optimizers step), codec off:

* ``plain``: both parts in one process, tensors passed by reference (the floor);
* ``runtime``: a device actor and a server actor over tcp loopback (wire format, zero-copy
  frames, ROUTER/DEALER), compute offloaded to the runtime's thread pool as real actors do;
* ``torch_rpc``: the same split with ``torch.distributed.rpc`` (two processes, TensorPipe),
  the baseline a PyTorch user would reach for.

Each way is timed alternately with a plain step (runtime: in the same offload pool; rpc: in
the rpc device process), so load drift on a shared machine hits a way and its baseline alike.
Reports medians; ``overhead_ratio`` = runtime / plain (target ≤ 1.10) and ``vs_torch_rpc`` =
overhead_ratio / (torch_rpc / its plain) (target ≤ 1.0). If rpc is unavailable in this torch
build the JSON says why instead. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
import zmq
import zmq.asyncio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_info

from sft_actors import log
from sft_actors.actors.base import Actor
from sft_actors.actors.handlers import MsgContext
from sft_actors.actors.testing import Idle, actor_env, serving, small_topology
from sft_actors.model import LoraConfig, load_model, resolve_spec, sample_batch, split_model
from sft_actors.wire.messages import Activations, Gradients
from sft_actors.wire.tensors import WireTensor


class Split:
    """The two parts of one split model, their optimizers and the three halves of a step."""

    def __init__(self, model_name: str, cut: int, batch: int, seq: int, seed: int = 0) -> None:
        model = load_model(resolve_spec(model_name, seed=seed))
        self.cut = cut
        self.device, self.server = split_model(model, cut, lora=LoraConfig(rank=8), seed=seed)
        self.inputs, self.labels = sample_batch(model, batch, seq, seed=seed)
        self.dev_opt = torch.optim.SGD(list(self.device.parameters()), lr=1e-3)
        self.srv_opt = torch.optim.SGD(list(self.server.parameters()), lr=1e-3)

    def device_forward(self) -> torch.Tensor:
        return self.device(self.inputs)  # (B, T, C) at the cut

    def server_step(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        x = hidden.detach().requires_grad_()
        loss = self.server.loss(self.server(x, self.cut), labels)
        self.srv_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.srv_opt.step()
        assert x.grad is not None
        return x.grad, float(loss.detach())

    def device_backward(self, hidden: torch.Tensor, grad: torch.Tensor) -> None:
        self.dev_opt.zero_grad(set_to_none=True)
        self.device.backward_from(hidden, grad)
        self.dev_opt.step()

    def plain_step(self) -> float:
        hidden = self.device_forward()
        grad, loss = self.server_step(hidden, self.labels)
        self.device_backward(hidden, grad)
        return loss


def timed(fn: Any, repeats: int, warmup: int) -> list[float]:
    out = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return out


# --- runtime ------------------------------------------------------------------------------


class StepServer(Actor):
    split: Split

    async def on_activations(self, msg: Activations, ctx: MsgContext) -> Gradients:
        hidden, labels = msg.activations.to_torch(), msg.labels.to_torch()
        grad, loss = await self.offload(self.split.server_step, hidden, labels)
        return Gradients(
            device=msg.device, round=msg.round, step=msg.step, grad=WireTensor.from_torch(grad), loss=loss,
            n_tokens=int(labels.numel()),
        )  # fmt: skip


async def paired_times(split: Split, repeats: int, warmup: int) -> tuple[list[float], list[float]]:
    """(plain, runtime) step times, alternating one of each so machine-load drift hits both.

    The plain step runs in the same offload thread pool the actors use, so the only
    difference is the runtime: encode, sockets, decode, handler dispatch.
    """
    topo = small_topology(devices=1, runtime={"request_timeout_s": 600.0, "max_message_mb": 2048.0})
    ctx = zmq.asyncio.Context()
    plain: list[float] = []
    runtime: list[float] = []
    try:
        with actor_env(topo, ctx, "tcp") as env:
            server, dev = StepServer(topo.actor("server"), env), Idle(topo.actor("dev0"), env)
            server.split = split
            async with serving(Idle(topo.actor("coordinator"), env), server, dev):
                await dev.ready()
                labels = WireTensor.from_torch(split.labels)
                for i in range(warmup + repeats):
                    t0 = time.perf_counter()
                    await dev.offload(split.plain_step)
                    t1 = time.perf_counter()
                    hidden = await dev.offload(split.device_forward)
                    msg = Activations(
                        device="dev0", round=0, step=i, cut=split.cut,
                        activations=WireTensor.from_torch(hidden.detach()), labels=labels, n_samples=1,
                        sent_at_ns=time.time_ns(),
                    )  # fmt: skip
                    reply = await dev.call("server", msg)
                    assert isinstance(reply, Gradients)
                    await dev.offload(split.device_backward, hidden, reply.grad.to_torch())
                    t2 = time.perf_counter()
                    if i >= warmup:
                        plain.append(t1 - t0)
                        runtime.append(t2 - t1)
    finally:
        ctx.term()
    return plain, runtime


# --- torch.distributed.rpc ------------------------------------------------------------------

_RPC_SPLIT: Split | None = None


def _rpc_server_step(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    assert _RPC_SPLIT is not None
    return _RPC_SPLIT.server_step(hidden, labels)[0]


def _rpc_worker(rank: int, port: int, args: dict[str, Any], out: Any) -> None:
    import torch.distributed.rpc as rpc

    global _RPC_SPLIT
    torch.set_num_threads(args["threads"])
    _RPC_SPLIT = Split(args["model"], args["cut"], args["batch"], args["seq"])
    opts = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}", num_worker_threads=4)
    rpc.init_rpc(["device", "server"][rank], rank=rank, world_size=2, rpc_backend_options=opts)
    if rank == 0:
        split = _RPC_SPLIT

        def step() -> None:
            hidden = split.device_forward()
            grad = rpc.rpc_sync("server", _rpc_server_step, args=(hidden.detach(), split.labels))
            split.device_backward(hidden, grad)

        # Alternate a local plain step with an rpc step, as paired_times does for the runtime,
        # so rpc's overhead ratio is measured under the same load as its own baseline.
        plain, remote = [], []
        for i in range(args["warmup"] + args["repeats"]):
            p, r = timed(split.plain_step, 1, 0)[0], timed(step, 1, 0)[0]
            if i >= args["warmup"]:
                plain.append(p)
                remote.append(r)
        out.put((plain, remote))
    rpc.shutdown()


def rpc_times(args: dict[str, Any]) -> tuple[list[float], list[float]] | str:
    """(plain, rpc) paired step times from the rpc device process, or why rpc could not run."""
    try:
        import torch.distributed.rpc as rpc

        if not rpc.is_available():
            return "torch.distributed.rpc is not available in this torch build"
    except ImportError as exc:
        return f"torch.distributed.rpc cannot be imported: {exc}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rpc_worker, args=(rank, port, args, out)) for rank in (0, 1)]
    for p in procs:
        p.start()
    result: tuple[list[float], list[float]] | str
    try:
        result = out.get(timeout=args["rpc_timeout_s"])
    except Exception as exc:  # queue.Empty or a crashed worker: report, do not crash the bench
        result = f"torch rpc run failed: {type(exc).__name__}: {exc}"
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vit-small")
    parser.add_argument("--cut", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64, help="sequence length (decoder models only)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    # One intra-op thread everywhere (main, offload threads, rpc processes): on a shared 2-core
    # machine more threads make OpenMP contend and the medians meaningless.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-rpc", action="store_true", help="skip the torch.distributed.rpc baseline")
    parser.add_argument("--rpc-timeout-s", type=float, default=600.0)
    args = parser.parse_args(argv)
    log.configure("console", "warning")
    torch.set_num_threads(args.threads)
    info = machine_info()
    print("machine:", json.dumps(info))
    split = Split(args.model, args.cut, args.batch, args.seq)
    plain, runtime = asyncio.run(paired_times(split, args.repeats, args.warmup))
    rpc_result = None if args.no_rpc else rpc_times(vars(args))
    plain_ms, runtime_ms = statistics.median(plain) * 1e3, statistics.median(runtime) * 1e3
    result: dict[str, Any] = {
        "bench": "step", "machine": info, "model": args.model, "batch": args.batch, "cut": args.cut,
        "plain_ms": plain_ms, "runtime_ms": runtime_ms, "overhead_ratio": runtime_ms / plain_ms,
        "paired_ratio_median": statistics.median(r / p for r, p in zip(runtime, plain, strict=True)),
        "activation_bytes": int(split.device_forward().numel() * 4),
    }  # fmt: skip
    print(f"{'mode':<10} {'median ms':>10} {'min ms':>10}")
    print(f"{'plain':<10} {plain_ms:>10.2f} {min(plain) * 1e3:>10.2f}")
    print(f"{'runtime':<10} {runtime_ms:>10.2f} {min(runtime) * 1e3:>10.2f}")
    if isinstance(rpc_result, tuple):
        rpc_plain, rpc = rpc_result
        rpc_ms, rpc_plain_ms = statistics.median(rpc) * 1e3, statistics.median(rpc_plain) * 1e3
        print(f"{'rpc plain':<10} {rpc_plain_ms:>10.2f} {min(rpc_plain) * 1e3:>10.2f}")
        print(f"{'torch_rpc':<10} {rpc_ms:>10.2f} {min(rpc) * 1e3:>10.2f}")
        # Ratio of overheads, each against its own interleaved plain baseline: robust to the
        # load drifting between the two measurements on a shared machine.
        rpc_overhead = rpc_ms / rpc_plain_ms
        result.update(
            torch_rpc_ms=rpc_ms, torch_rpc_plain_ms=rpc_plain_ms, torch_rpc_overhead_ratio=rpc_overhead,
            vs_torch_rpc=result["overhead_ratio"] / rpc_overhead,
        )  # fmt: skip
    else:
        result.update(torch_rpc_ms=None, vs_torch_rpc=None, torch_rpc=rpc_result or "skipped (--no-rpc)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
