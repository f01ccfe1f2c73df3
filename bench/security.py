"""What CURVE costs a training step, and how much junk a serving server absorbs without missing a
heartbeat.

    python bench/security.py            # SmolLM2-135M step overhead, round trips to 16 MB, 5 flood rates
    python bench/security.py --quick    # llama-tiny, fewer runs, shorter flood stages (< 60 s)
    python bench/security.py --model llama-tiny --runs 1 --rounds 2 --steps 2 --sizes 1024 \\
        --repeats 3 --warmup 1 --rates 2000 --flood-s 1 --stage-rounds 1     # smoke (CI)

- ``overhead``: the same topology (one server, two devices at the model's first cuts,
  ``server_update = "per_round"``, ``max_inflight = 1``, the topology file's codec or, with
  ``--codec off``, none: raw fp32 activations and gradients) run
  ``--runs`` times per mode over real tcp (every actor in this process), ``none`` and
  ``curve`` alternating, the order flipped every run. A run's step time is the median over
  rounds 2.. of the summary's ``step_ms_median`` (each device's median step, device forward
  through the gradient's return and backward). ``ratio`` = median curve / median none (target
  ≤ 1.05); ``paired_ratio_median`` = median of curve/none per pair; ``losses_equal``: the two
  modes trained to the same losses (they must: CURVE changes no byte of the payload).
- ``round_trip``: one DEALER→ROUTER→DEALER echo over tcp loopback per message size, CURVE
  (Curve25519 + XSalsa20-Poly1305 in libzmq) or not, the two interleaved; p50 and MB/s (both
  directions). What the cipher costs per byte, beneath any actor.
- ``flood``: a training run (llama-tiny, mode none, tcp, heartbeat ``--heartbeat-interval-s`` /
  ``--heartbeat-timeout-s``) whose server's ROUTER a stranger's process floods (routing id
  ``stranger``; random multipart frames, malformed headers, and HELLO/ACTIVATIONS/HEARTBEAT it
  may not send) at each rate of ``--rates`` messages/s (0 = as fast as the sockets take them),
  one stage per rate: ``--stage-rounds`` rounds train under the flood, which lasts at least
  ``--flood-s``. Measured per stage: rate and MB/s the sender achieved (a sender the server
  cannot keep up with is held back by the high-water marks, so the unpaced rate is what the
  server absorbs), messages the server refused, the longest silence any link of the server or
  the coordinator saw (what the liveness watchdog compares with the timeout), the longest
  event-loop lag, peers lost. ``max_ok_rate`` is the highest achieved rate of a stage with no
  peer lost and every silence below ``heartbeat_timeout_s``.

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import torch
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_info

from sft_actors import log
from sft_actors.actors.coordinator import CoordinatorActor
from sft_actors.actors.server import HeadServerActor
from sft_actors.runtime import RunResult, run_topology
from sft_actors.security.keys import generate_keys
from sft_actors.topology import Topology, load_topology
from sft_actors.wire import Activations, WireTensor
from sft_actors.wire.envelope import encode
from sft_actors.wire.messages import Heartbeat, Hello

ROOT = Path(__file__).resolve().parents[1]
#: Per model: the topology file it starts from and the cuts of its two devices.
MODELS = {"llama-tiny": ("tiny.toml", [1, 2]), "smollm2-135m": ("local.toml", [2, 4])}
MB = 1e6


# --- topologies ---------------------------------------------------------------------------


def topology(
    a: argparse.Namespace, work: Path, *, model: str, mode: str, rounds: int, label: str
) -> Topology:
    base, cuts = MODELS[model]
    text = (ROOT / "topologies" / base).read_text()
    text = text[: text.index("[[actors]]")]
    train = {"rounds": rounds, "steps_per_round": a.steps, "batch_size": a.batch, "seq_len": a.seq,
             "eval_batches": 1, "max_inflight": 1, "server_update": '"per_round"'}  # fmt: skip
    for key, value in train.items():
        text = re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", text, count=1)
    if not a.codec:  # identity chains: raw fp32 activations and gradients on the wire
        text = text[: text.index("[run.codec.up]")] + text[text.index("[run.runtime]") :]
    if "options =" not in text:
        text = text.replace("[run.data]\n", "[run.data]\noptions = { max_documents = 40 }\n")
    start = text.index("[run.runtime]")
    end = text.index("[", start + 1)
    runtime = (
        f"[run.runtime]\nheartbeat_interval_s = {a.heartbeat_interval_s}\n"
        f"heartbeat_timeout_s = {a.heartbeat_timeout_s}\n"
        "connect_timeout_s = 300.0\nrequest_timeout_s = 300.0\ndrain_timeout_s = 1.0\n\n"
    )
    text = text[:start] + runtime + text[end:]
    out = work / label
    out.mkdir(parents=True, exist_ok=True)
    text = re.sub(r'(?m)^dir = ".*"$', f'dir = "{out / "runs"}"', text)
    text += f'[run.security]\nmode = "{mode}"\nkeys = "{work / f"keys-{model}"}"\n\n'
    text += '[[actors]]\nname = "coordinator"\nrole = "coordinator"\nport = 0\n\n'
    text += '[[actors]]\nname = "server"\nrole = "server"\nport = 0\n\n'
    for i, cut in enumerate(cuts):
        text += f'[[actors]]\nname = "dev{i}"\nrole = "device"\ncut = {cut}\n\n'
    path = out / "topology.toml"
    path.write_text(text)
    topo = load_topology(path)
    if mode == "curve" and not (work / f"keys-{model}").exists():
        generate_keys(topo, work / f"keys-{model}")
    return topo


def summary_of(result: RunResult) -> dict[str, Any]:
    if result.status != "completed":
        raise SystemExit(f"run ended {result.status}: {result.error} {result.failures}")
    data: dict[str, Any] = json.loads((Path(result.result["run_dir"]) / "summary.json").read_text())
    return data


# --- (a) step overhead ------------------------------------------------------------------------


def bench_overhead(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    times: dict[str, list[float]] = {"none": [], "curve": []}
    losses: dict[str, list[Any]] = {}
    frames: dict[str, float] = {}
    for i in range(-a.warmup_runs, a.runs):
        for mode in ("none", "curve") if i % 2 == 0 else ("curve", "none"):
            if i < 0 and mode == "curve":
                continue  # the first run pays for loading data and model: not timed
            topo = topology(a, work, model=a.model, mode=mode, rounds=a.rounds, label=f"{mode}{i}")
            t0 = time.perf_counter()
            s = summary_of(asyncio.run(run_topology(topo, transport="tcp", timeout_s=a.timeout_s)))
            timed = [r["step_ms_median"] for r in s["rounds"] if r["round"] >= 2] or [
                r["step_ms_median"] for r in s["rounds"]
            ]
            if i < 0:
                print(f"  warm-up run: {time.perf_counter() - t0:.1f} s", flush=True)
                continue
            times[mode].append(statistics.median(timed))
            losses.setdefault(mode, [(r["round"], r["loss"]) for r in s["rounds"]])
            steps = sum(len(r["per_device_loss"]) for r in s["rounds"]) * a.steps
            frames = {"up_bytes_per_step": s["totals"]["bytes_up"] / steps,
                      "down_bytes_per_step": s["totals"]["bytes_down"] / steps}  # fmt: skip
            print(f"  {mode:<5} run {i}: step {times[mode][-1]:.2f} ms (median of rounds), "
                  f"run {time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
    none_ms, curve_ms = statistics.median(times["none"]), statistics.median(times["curve"])
    paired = statistics.median(c / n for c, n in zip(times["curve"], times["none"], strict=True))
    return {
        "model": a.model, "codec": a.codec, "runs": a.runs, "rounds": a.rounds, "steps": a.steps,
        "batch": a.batch, "seq": a.seq, "none_ms": times["none"], "curve_ms": times["curve"],
        "none_ms_median": none_ms, "curve_ms_median": curve_ms, "ratio": curve_ms / none_ms,
        "paired_ratio_median": paired, "losses_equal": losses["none"] == losses["curve"], **frames,
    }  # fmt: skip


# --- (a') round trips with and without CURVE --------------------------------------------------


def _pair(ctx: zmq.Context[zmq.Socket[bytes]], curve: bool) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for s in (router, dealer):
        s.setsockopt(zmq.LINGER, 0)
    if curve:
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        router.setsockopt(zmq.CURVE_SERVER, 1)
        router.setsockopt(zmq.CURVE_SECRETKEY, server_secret)
        dealer.setsockopt(zmq.CURVE_SERVERKEY, server_public)
        dealer.setsockopt(zmq.CURVE_PUBLICKEY, client_public)
        dealer.setsockopt(zmq.CURVE_SECRETKEY, client_secret)
    router.bind("tcp://127.0.0.1:*")
    dealer.connect(router.getsockopt_string(zmq.LAST_ENDPOINT))
    return router, dealer


def _echo(router: zmq.Socket[bytes], dealer: zmq.Socket[bytes], payload: bytes) -> float:
    t0 = time.perf_counter()
    dealer.send(payload, copy=False)
    rid, msg = router.recv_multipart(copy=False)
    router.send_multipart([rid, msg], copy=False)
    dealer.recv(copy=False)
    return time.perf_counter() - t0


def bench_round_trip(a: argparse.Namespace) -> list[dict[str, Any]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    rows = []
    try:
        pairs = {mode: _pair(ctx, mode == "curve") for mode in ("none", "curve")}
        for size in a.sizes:
            payload = bytes(size)
            samples: dict[str, list[float]] = {"none": [], "curve": []}
            for i in range(a.warmup + a.repeats):
                for mode in ("none", "curve") if i % 2 == 0 else ("curve", "none"):
                    dt = _echo(*pairs[mode], payload)
                    if i >= a.warmup:
                        samples[mode].append(dt)
            for mode, values in samples.items():
                p50 = statistics.median(values)
                rows.append({"bytes": size, "mode": mode, "repeats": len(values), "p50_ms": p50 * 1e3,
                             "mb_s": 2 * size / p50 / MB})  # fmt: skip
    finally:
        ctx.destroy(linger=0)
    return rows


# --- (b) junk flood -----------------------------------------------------------------------

FLOOD_CHILD = r"""
import json, sys, time, zmq
cfg = json.loads(sys.argv[1])
with open(cfg["templates"]) as f:
    msgs = [[bytes.fromhex(x) for x in m] for m in json.load(f)]
ctx = zmq.Context()
s = ctx.socket(zmq.DEALER)
s.setsockopt(zmq.LINGER, 0)
s.setsockopt(zmq.ROUTING_ID, cfg["identity"].encode())
s.setsockopt(zmq.SNDTIMEO, 1000)  # a vanished server (say, its process died) ends the flood
s.connect(cfg["endpoint"])


def send(m):
    try:
        s.send_multipart(m)
    except zmq.Again:
        return False
    return True


rate, seconds = cfg["rate"], cfg["seconds"]
start = time.monotonic()
while not send(msgs[0]):
    if time.monotonic() - start > 30:
        sys.exit("nobody took the first message in 30 s")
t0 = time.monotonic()
print("flooding", flush=True)
sent, nbytes = 1, sum(map(len, msgs[0]))
while True:
    m = msgs[sent % len(msgs)]
    if not send(m):
        if time.monotonic() - t0 >= seconds:
            break
        continue
    sent += 1
    nbytes += sum(map(len, m))
    if sent % 64 == 0:
        now = time.monotonic() - t0
        if now >= seconds:
            break
        if rate and sent / rate > now:
            time.sleep(sent / rate - now)
print(json.dumps({"sent": sent, "bytes": nbytes, "seconds": time.monotonic() - t0}), flush=True)
s.close(0)
ctx.term()
"""


def junk(schema_hash: str, max_bytes: int, seed: int = 0) -> list[list[bytes]]:
    rnd = random.Random(seed)
    out = [
        [rnd.randbytes(rnd.randrange(0, max_bytes)) for _ in range(rnd.randrange(1, 5))] for _ in range(64)
    ]
    header = {"v": [3, 0], "k": 1, "s": "stranger", "i": 1, "r": 0, "b": {}, "t": []}
    out += [
        [msgpack.packb({**header, "k": 999})],
        [msgpack.packb({**header, "t": [{"d": "float32", "s": [2**40], "n": 8, "c": None}]}), bytes(8)],
        [msgpack.packb({**header, "v": [9, 9]})],
        [b"\xdf\xff\xff\xff\xff"],
    ]
    act = Activations(
        device="dev0", round=1, step=0, cut=1, activations=WireTensor.from_torch(torch.zeros(2, 16, 64)),
        labels=WireTensor.from_torch(torch.zeros(2, 16, dtype=torch.int64)), n_samples=2, sent_at_ns=0,
    )  # fmt: skip
    for msg, sender in (
        (Hello(node="dev0", role="device", schema_hash=schema_hash), "dev0"),
        (act, "dev0"),
        (Heartbeat(node="stranger", seq=1, sent_at_ns=0), "stranger"),
    ):
        out.append([bytes(f) for f in encode(msg, sender=sender, msg_id=7)])
    return out


class CountingServer(HeadServerActor):
    lost: list[str]

    async def on_peer_lost(self, peer: str) -> None:
        self.lost.append(peer)
        await super().on_peer_lost(peer)


def flood_coordinator(
    a: argparse.Namespace, work: Path, stages: list[dict[str, Any]], servers: list[Any]
) -> Any:
    """A coordinator that runs one flood stage per rate, over ``--stage-rounds`` rounds each."""

    class Flooding(CoordinatorActor):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.lost: list[str] = []
            self._flood: dict[str, Any] | None = None

        async def on_peer_lost(self, peer: str) -> None:
            self.lost.append(peer)
            await super().on_peer_lost(peer)

        def _flood_stage(self, r: int) -> tuple[int, bool, bool]:
            k, at = divmod(r - 2, a.stage_rounds)
            return k, at == 0, at == a.stage_rounds - 1

        async def _round(self, r: int) -> None:
            k, first, last = self._flood_stage(r)
            if r >= 2 and first:
                await self._flood_start(a.rates[k])
            await super()._round(r)
            if r >= 2 and last:
                await self._flood_finish()

        async def _flood_start(self, rate: float) -> None:
            server = servers[0]
            path = work / "junk.json"
            path.write_text(
                json.dumps([[f.hex() for f in m] for m in junk(self.env.schema_hash, a.junk_bytes)])
            )
            cfg = {"templates": str(path), "identity": "stranger", "rate": rate, "seconds": a.flood_s,
                   "endpoint": await self.env.endpoints.resolve("server")}  # fmt: skip
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", FLOOD_CHILD, json.dumps(cfg), stdout=subprocess.PIPE
            )
            assert proc.stdout is not None
            async with asyncio.timeout(60):
                await proc.stdout.readline()
            stats = {"max_silence_s": 0.0, "max_lag_s": 0.0}
            self._flood = {
                "rate": rate, "proc": proc, "stats": stats, "rejected0": server._guard.rejected,
                "lost0": len(self.lost) + len(server.lost),
                "sampler": self._spawn(self._watch(stats, server)),
            }  # fmt: skip

        async def _watch(self, stats: dict[str, float], server: Any) -> None:
            period = 0.02
            while True:
                t0 = time.monotonic()
                await asyncio.sleep(period)
                stats["max_lag_s"] = max(stats["max_lag_s"], time.monotonic() - t0 - period)
                now = self.clock.now()
                for actor in (self, server):
                    for peer in actor.peers:
                        stats["max_silence_s"] = max(stats["max_silence_s"], now - actor.link(peer).last_seen)

        async def _flood_finish(self) -> None:
            st = self._flood
            assert st is not None
            async with asyncio.timeout(a.flood_s + 120):
                out, _ = await st["proc"].communicate()
            st["sampler"].cancel()
            sent = json.loads(out.decode().strip().splitlines()[-1])
            server = servers[0]
            seconds = sent["seconds"]
            lost = len(self.lost) + len(server.lost) - st["lost0"]
            silence = st["stats"]["max_silence_s"]
            stages.append({
                "rate": st["rate"] or "max", "seconds": seconds, "sent": sent["sent"],
                "msgs_s": sent["sent"] / seconds, "mb_s": sent["bytes"] / seconds / MB,
                "refused_by_server": server._guard.rejected - st["rejected0"],
                "max_silence_s": silence, "max_loop_lag_s": st["stats"]["max_lag_s"], "peers_lost": lost,
                "ok": lost == 0 and silence < a.heartbeat_timeout_s,
            })  # fmt: skip
            row = stages[-1]
            print(f"  flood {row['rate']!s:>6}/s: sent {row['msgs_s']:9.0f} msg/s {row['mb_s']:6.2f} MB/s, "
                  f"max silence {silence:.3f} s, loop lag {row['max_loop_lag_s'] * 1e3:.0f} ms, "
                  f"lost {lost}", flush=True)  # fmt: skip
            self._flood = None

    return Flooding


def bench_flood(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    stages: list[dict[str, Any]] = []
    servers: list[CountingServer] = []

    def server(spec: Any, env: Any) -> CountingServer:
        s = CountingServer(spec, env)
        s.lost = []
        servers.append(s)
        return s

    rounds = 1 + a.stage_rounds * len(a.rates)
    topo = topology(a, work, model="llama-tiny", mode="none", rounds=rounds, label="flood")
    roles = {"coordinator": flood_coordinator(a, work, stages, servers), "server": server}
    s = summary_of(asyncio.run(run_topology(topo, transport="tcp", roles=roles, timeout_s=a.timeout_s)))
    ok = [row for row in stages if row["ok"]]
    best = max(ok, key=lambda row: row["msgs_s"]) if ok else None
    return {
        "heartbeat_interval_s": a.heartbeat_interval_s, "heartbeat_timeout_s": a.heartbeat_timeout_s,
        "junk_bytes_max": a.junk_bytes, "stage_rounds": a.stage_rounds, "stages": stages,
        "devices_lost": s["devices_lost"],
        "max_ok_rate_msgs_s": best["msgs_s"] if best else None, "max_ok_mb_s": best["mb_s"] if best else None,
    }  # fmt: skip


def report_overhead(o: dict[str, Any]) -> None:
    print(f"step: none {o['none_ms_median']:.2f} ms, curve {o['curve_ms_median']:.2f} ms, ratio "
          f"{o['ratio']:.3f} (paired {o['paired_ratio_median']:.3f}); losses equal: {o['losses_equal']}; "
          f"{o['up_bytes_per_step']:.0f} B up / {o['down_bytes_per_step']:.0f} B down per step")  # fmt: skip


def round_trip_ratios(rows: list[dict[str, Any]], sizes: list[int]) -> dict[str, float]:
    """curve p50 / none p50 per size, printed as a table."""
    print(
        f"{'bytes':>10} {'none p50 ms':>12} {'curve p50 ms':>13} {'none MB/s':>10} {'curve MB/s':>11} ratio"
    )
    ratios = {}
    for size in sizes:
        n, c = (next(r for r in rows if r["bytes"] == size and r["mode"] == m) for m in ("none", "curve"))
        ratios[str(size)] = c["p50_ms"] / n["p50_ms"]
        print(f"{size:>10} {n['p50_ms']:>12.3f} {c['p50_ms']:>13.3f} {n['mb_s']:>10.0f} "
              f"{c['mb_s']:>11.0f} {ratios[str(size)]:>5.2f}")  # fmt: skip
    return ratios


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="llama-tiny, 3 runs per mode, 3 s flood stages")
    p.add_argument("--only", choices=("all", "overhead", "round_trip", "flood"), default="all")
    p.add_argument(
        "--model", choices=sorted(MODELS), default=None, help="overhead model (default smollm2-135m)"
    )
    p.add_argument("--runs", type=int, default=None, help="timed runs per mode (default 5; --quick 3)")
    p.add_argument("--warmup-runs", type=int, default=1, help="untimed runs before the timed ones")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--codec", choices=("on", "off"), default="on",
                   help="off: no codec chains (raw activations on the wire)")  # fmt: skip
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 32; llama-tiny 16)")
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="round-trip sizes, bytes (default 1 KiB, 64 KiB, 1 MiB, 16 MiB)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=None, help="round trips per size and mode (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed round trips per size and mode")
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=None,
                   help="flood rates in messages/s, 0 = unpaced")  # fmt: skip
    p.add_argument("--flood-s", type=float, default=None, help="least seconds per flood stage (default 5)")
    p.add_argument("--stage-rounds", type=int, default=3, help="rounds trained under each flood stage")
    p.add_argument("--junk-bytes", type=int, default=400, help="largest random junk frame")
    p.add_argument("--heartbeat-interval-s", type=float, default=0.25)
    p.add_argument("--heartbeat-timeout-s", type=float, default=2.0)
    p.add_argument("--timeout-s", type=float, default=900.0)
    a = p.parse_args(argv)
    quick = a.quick
    a.model = a.model or ("llama-tiny" if quick else "smollm2-135m")
    a.runs = a.runs or (3 if quick else 5)
    a.seq = a.seq or (16 if a.model == "llama-tiny" else 32)
    a.sizes = a.sizes or [1024, 65536, 2**20, 16 * 2**20]
    a.repeats = a.repeats or (10 if quick else 20)
    if a.rates is None:
        a.rates = [1000.0, 5000.0, 0.0] if quick else [1000.0, 3000.0, 10000.0, 30000.0, 0.0]
    a.flood_s = a.flood_s or (3.0 if quick else 5.0)
    a.codec = a.codec == "on"
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse(argv)
    torch.set_num_threads(1)
    log.configure("console", level="critical")  # the flood's refusals are the point
    info = machine_info()
    print("machine:", json.dumps(info))
    t0 = time.perf_counter()
    out: dict[str, Any] = {"bench": "security", "machine": info}
    with tempfile.TemporaryDirectory(prefix="sft-security-") as tmp:
        work = Path(tmp)
        if a.only in ("all", "overhead"):
            print(f"# overhead: {a.model}, {a.runs} runs per mode, {a.rounds} rounds × {a.steps} steps, "
                  f"batch {a.batch} × seq {a.seq}, tcp", flush=True)  # fmt: skip
            out["overhead"] = bench_overhead(a, work)
            report_overhead(out["overhead"])
        if a.only in ("all", "round_trip"):
            out["round_trip"] = bench_round_trip(a)
            out["round_trip_ratio"] = round_trip_ratios(out["round_trip"], a.sizes)
        if a.only in ("all", "flood"):
            print(f"# flood: rates {a.rates} msg/s, ≥ {a.flood_s} s and {a.stage_rounds} rounds each, "
                  f"heartbeat {a.heartbeat_interval_s}/{a.heartbeat_timeout_s} s", flush=True)  # fmt: skip
            f = out["flood"] = bench_flood(a, work)
            print(f"flood: highest rate with no heartbeat gap over the timeout: {f['max_ok_rate_msgs_s']} "
                  f"msg/s ({f['max_ok_mb_s']} MB/s); devices lost {f['devices_lost']}")  # fmt: skip
    out["total_s"] = time.perf_counter() - t0
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
