"""Benchmark the actor runtime's wire: round-trip latency and throughput, and link pacing.

    .venv/bin/python bench/wire.py                       # all transports, 1 kB … 16 MB
    .venv/bin/python bench/wire.py --sizes 1024 --repeats 5 --rates 20 --paced-s 0.3   # smoke

Round trips go through the whole runtime (a device actor ``call``s an echo server with an
``Activations`` message; the server answers ``Gradients`` carrying the same tensor): envelope
encode/decode, zero-copy frames, ROUTER/DEALER sockets. Throughput counts both directions
(``2 × payload / p50``). Pacing sends ``--paced-s`` seconds' worth of 100 kB activations over a
device uplink emulated at each ``--rates`` Mb/s and reports the rate measured at the receiver
(least-squares slope of bytes over arrival time).

Prints machine info and a table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq
import zmq.asyncio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_info

from sft_actors import log
from sft_actors.actors.testing import ArrivalSink, EchoServer, Idle, actor_env, serving, small_topology
from sft_actors.transport.endpoints import TRANSPORTS, Transport
from sft_actors.wire.messages import Activations, Gradients
from sft_actors.wire.tensors import WireTensor


def activations(nbytes: int) -> Activations:
    x = torch.randn(max(1, nbytes // 4))
    return Activations(
        device="dev0", round=0, step=0, cut=1, activations=WireTensor.from_torch(x),
        labels=WireTensor.from_torch(torch.zeros(1)), n_samples=1, sent_at_ns=0,
    )  # fmt: skip


async def round_trips(
    transport: Transport, sizes: list[int], repeats: int, warmup: int
) -> list[dict[str, Any]]:
    topo = small_topology(devices=1, runtime={"max_message_mb": 2048.0, "request_timeout_s": 120.0})
    rows = []
    ctx = zmq.asyncio.Context()
    try:
        with (
            tempfile.TemporaryDirectory(prefix="sft-bench-") as ipc_dir,
            actor_env(topo, ctx, transport, ipc_dir=ipc_dir) as env,
        ):
            server, dev = EchoServer(topo.actor("server"), env), Idle(topo.actor("dev0"), env)
            async with serving(Idle(topo.actor("coordinator"), env), server, dev):
                await dev.ready()
                for size in sizes:
                    msg = activations(size)
                    # Fewer repeats for big payloads: ~256 MB moved per size at most.
                    n = max(3, min(repeats, (256 << 20) // max(size, 1)))
                    times = []
                    for i in range(warmup + n):
                        t0 = time.perf_counter()
                        reply = await dev.call("server", msg)
                        dt = time.perf_counter() - t0
                        assert isinstance(reply, Gradients)
                        if i >= warmup:
                            times.append(dt)
                    p50 = statistics.median(times)
                    p99 = float(np.percentile(times, 99))
                    rows.append({
                        "transport": transport, "bytes": size, "repeats": n, "p50_ms": p50 * 1e3,
                        "p99_ms": p99 * 1e3, "mb_s": 2 * size / p50 / 1e6,
                    })  # fmt: skip
    finally:
        ctx.term()
    return rows


async def paced(rate_mbps: float, seconds: float) -> dict[str, Any]:
    topo = small_topology(devices=1, links={"dev0": {"uplink_mbps": rate_mbps, "rtt_ms": 10.0}})
    ctx = zmq.asyncio.Context()
    try:
        with actor_env(topo, ctx) as env:
            server, dev = ArrivalSink(topo.actor("server"), env), Idle(topo.actor("dev0"), env)
            async with serving(Idle(topo.actor("coordinator"), env), server, dev):
                await dev.ready()
                msg = activations(100_000)
                server.expect = max(3, int(rate_mbps * 1e6 / 8 * seconds / 100_000))
                for _ in range(server.expect):
                    await dev.send("server", msg)
                await server.all_in.wait()
                measured = server.measured_mbps()
    finally:
        ctx.term()
    return {
        "rate_mbps": rate_mbps, "measured_mbps": measured, "messages": server.expect,
        "error_pct": abs(measured - rate_mbps) / rate_mbps * 100,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", default="1024,65536,1048576,16777216", help="payload bytes, comma-separated"
    )
    parser.add_argument("--transports", default=",".join(TRANSPORTS))
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rates", default="10,50,200", help="paced uplink rates (Mb/s) to check")
    parser.add_argument("--paced-s", type=float, default=1.5, help="seconds of traffic per paced rate")
    args = parser.parse_args(argv)
    log.configure("console", "warning")
    torch.set_num_threads(1)
    info = machine_info()
    print("machine:", json.dumps(info))
    sizes = [int(s) for s in args.sizes.split(",")]
    rows: list[dict[str, Any]] = []
    for transport in args.transports.split(","):
        assert transport in TRANSPORTS, transport
        rows += asyncio.run(round_trips(transport, sizes, args.repeats, args.warmup))  # type: ignore[arg-type]
    print(f"{'transport':<9} {'bytes':>10} {'n':>4} {'p50 ms':>9} {'p99 ms':>9} {'MB/s':>9}")
    for r in rows:
        cells = f"{r['repeats']:>4} {r['p50_ms']:>9.3f} {r['p99_ms']:>9.3f} {r['mb_s']:>9.1f}"
        print(f"{r['transport']:<9} {r['bytes']:>10} {cells}")
    pacing = [asyncio.run(paced(float(r), args.paced_s)) for r in args.rates.split(",")]
    print(f"{'rate Mb/s':>10} {'measured':>10} {'error %':>8}")
    for p in pacing:
        print(f"{p['rate_mbps']:>10.1f} {p['measured_mbps']:>10.2f} {p['error_pct']:>8.2f}")
    result = {
        "bench": "wire", "machine": info, "round_trip": rows, "paced": pacing,
        "max_paced_error_pct": max(p["error_pct"] for p in pacing),
    }  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
