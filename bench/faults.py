"""What losing devices costs an elastic run, and what durability costs: in-process, inproc.

    python bench/faults.py                                       # llama-tiny, N = 8 devices
    python bench/faults.py --devices 3 --rounds 3 --repeats 1    # smoke (CI)
    python bench/faults.py --model smollm2-135m --only checkpoint

Every run is ``run_topology`` over inproc sockets: one coordinator, one server, N devices (cuts
alternate over the model's first blocks), ``[run.train] min_devices = 1`` so any number of
losses keeps a quorum. Faults are injected by device subclasses chosen per name.

- ``detect``: ``--repeats`` devices fall silent, one per round from round 2 (their heartbeats
  stop and they never answer the round; their process would be frozen). Latency = the
  coordinator's ``device_lost`` (``on_peer_lost``) minus the moment the device fell silent;
  median in seconds and in units of ``heartbeat_timeout_s``. Expect roughly timeout − (time
  since the last beat) + the watchdog's period: between timeout − interval and timeout + interval.
- ``loss``: for each k in ``--lost``, N devices of which k crash at the start of round 2 (their
  actor fails: sockets closed, found at the next heartbeat) vs a clean run of N − k devices.
  ``ratio`` = median round time of rounds 3..R of the first ÷ the same rounds of the second
  (target ≤ 1.1: the survivors run as fast as a run that never had the lost devices). k = 0
  compares two clean N-device runs: the run-to-run noise.
- ``resume``: the clean N-device run continued with ``resume_dir`` for 2 more rounds. Reports
  the time from ``run_topology`` to the end of the first round (its averaging and checkpoint
  included), fresh vs resumed, and the coordinator's restore span: reading the checkpoint
  (``open_run_dir``) through sending plans and RESTORE to every actor (a fresh run's same span
  sends plans only).
- ``checkpoint``: bytes of the last checkpoint of a clean run (every actor's LoRA, optimizer
  moments and counters, the averaged device adapters, the history), per actor and in total.
  With ``--model smollm2-135m`` the run is one round of SmolLM2-135M (``topologies/local.toml``:
  cuts 2, 4, 6, 8, LoRA rank 8) on tiny data (2 × 16 tokens, one step).

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_info

from sft_actors import log
from sft_actors.actors.coordinator import CoordinatorActor
from sft_actors.actors.device import DeviceActor
from sft_actors.actors.env import ActorEnv
from sft_actors.actors.handlers import MsgContext
from sft_actors.runtime import RunResult, run_topology
from sft_actors.topology import ActorSpec, Topology, load_topology
from sft_actors.train.checkpoint import latest_checkpoint
from sft_actors.wire import RoundDone, RoundStart

ROOT = Path(__file__).resolve().parents[1]
#: Per model: the topology file it starts from and the device cuts it cycles through.
MODELS = {"llama-tiny": ("tiny.toml", [1, 2]), "smollm2-135m": ("local.toml", [2, 4, 6, 8])}

# What the injected actors and the timed coordinator record, for the run in progress.
REC: dict[str, Any] = {}
FAULTS: dict[str, tuple[str, int]] = {}  # device → ("silent" | "crash", round)


class TimedCoordinator(CoordinatorActor):
    """Records when devices are found lost, when the first round ends, and the restore span."""

    def __init__(self, spec: ActorSpec, env: ActorEnv) -> None:
        super().__init__(spec, env)
        inner = self.store.open_run_dir

        def timed_open() -> int | None:
            REC["open_at"] = time.perf_counter()
            return inner()

        self.store.open_run_dir = timed_open  # type: ignore[method-assign]

    async def on_peer_lost(self, peer: str) -> None:
        REC.setdefault("lost_at", {}).setdefault(peer, time.perf_counter())
        await super().on_peer_lost(peer)

    async def _admit(
        self, devices: list[str], *, rollback: bool = False, grace_s: float | None = None
    ) -> None:
        await super()._admit(devices, rollback=rollback, grace_s=grace_s)
        REC.setdefault("admitted_at", time.perf_counter())

    async def _round(self, r: int) -> None:
        await super()._round(r)
        REC.setdefault("first_round_at", time.perf_counter())


class FaultyDevice(DeviceActor):
    """Falls silent (heartbeats stop, the round is never answered) or crashes (the actor fails)
    when the round ``FAULTS`` names for it starts; an ordinary device otherwise."""

    def __init__(self, spec: ActorSpec, env: ActorEnv) -> None:
        super().__init__(spec, env)
        self._silenced = asyncio.Event()

    async def _heartbeat_loop(self) -> None:
        beats = asyncio.ensure_future(super()._heartbeat_loop())
        try:
            await self._silenced.wait()
        finally:
            beats.cancel()
            await asyncio.gather(beats, return_exceptions=True)

    async def on_round_start(self, msg: RoundStart, ctx: MsgContext) -> RoundDone:
        kind, at = FAULTS.get(self.name, ("", -1))
        if msg.round == at:
            REC.setdefault("fault_at", {})[self.name] = time.perf_counter()
            if kind == "silent":
                self._silenced.set()
                await asyncio.Event().wait()  # frozen: never answers (cancelled when the run stops)
            self._spawn(self._crash())
        return await super().on_round_start(msg, ctx)

    async def _crash(self) -> None:
        raise RuntimeError("injected crash")


ROLES = {"coordinator": TimedCoordinator, "device": FaultyDevice}


def topology_text(a: argparse.Namespace, devices: int, rounds: int, out: Path) -> str:
    base, cuts = MODELS[a.model]
    text = (ROOT / "topologies" / base).read_text()
    text = text[: text.index("[[actors]]")]
    train = {
        "rounds": rounds, "steps_per_round": a.steps, "batch_size": a.batch, "seq_len": a.seq,
        "eval_batches": 1, "max_inflight": 1,
    }  # fmt: skip
    for key, value in train.items():
        text = re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", text, count=1)
    text = text.replace("[run.train]\n", "[run.train]\nmin_devices = 1\n", 1)
    if "options =" not in text:
        text = text.replace(
            "[run.data]\n", f"[run.data]\noptions = {{ max_documents = {a.max_documents} }}\n"
        )
    start = text.index("[run.runtime]")
    end = text.index("[", start + 1)
    runtime = (
        f"[run.runtime]\nheartbeat_interval_s = {a.heartbeat_interval_s}\n"
        f"heartbeat_timeout_s = {a.heartbeat_timeout_s}\nrejoin_timeout_s = 5.0\n"
        "connect_timeout_s = 300.0\nrequest_timeout_s = 300.0\ndrain_timeout_s = 1.0\n\n"
    )
    text = text[:start] + runtime + text[end:]
    text = re.sub(r'(?m)^dir = ".*"$', f'dir = "{out}"', text)
    text += '[[actors]]\nname = "coordinator"\nrole = "coordinator"\nport = 0\n\n'
    text += '[[actors]]\nname = "server"\nrole = "server"\nport = 0\n\n'
    for i in range(devices):
        text += f'[[actors]]\nname = "dev{i}"\nrole = "device"\ncut = {cuts[i % len(cuts)]}\n\n'
    return text


def run(
    a: argparse.Namespace, work: Path, label: str, *, devices: int, rounds: int, resume: Path | None = None
) -> tuple[Topology, RunResult, dict[str, Any], float]:
    """One run; (topology, result, what was recorded, when it started)."""
    out = work / label
    out.mkdir(parents=True, exist_ok=True)
    path = out / "topology.toml"
    path.write_text(topology_text(a, devices, rounds, out / "runs"))
    topo = load_topology(path)
    REC.clear()
    t0 = time.perf_counter()
    result = asyncio.run(
        run_topology(topo, roles=ROLES, transport="inproc", timeout_s=a.timeout_s, resume_dir=resume)
    )
    if result.status != "completed":
        raise SystemExit(f"run {label} ended {result.status}: {result.reason} {result.failures}")
    print(f"  {label}: {time.perf_counter() - t0:.1f} s", flush=True)
    return topo, result, dict(REC), t0


def summary_of(result: RunResult) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((Path(result.result["run_dir"]) / "summary.json").read_text())
    return data


def median_rounds(summary: dict[str, Any], first: int) -> float:
    return statistics.median(r["seconds"] for r in summary["rounds"] if r["round"] >= first)


def bench_detect(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    silent = [f"dev{i}" for i in range(a.repeats)]
    FAULTS.clear()
    FAULTS.update({d: ("silent", 2 + i) for i, d in enumerate(silent)})
    _, _, rec, _ = run(a, work, "detect", devices=a.devices, rounds=max(a.rounds, a.repeats + 2))
    latencies = [rec["lost_at"][d] - rec["fault_at"][d] for d in silent]
    median = statistics.median(latencies)
    return {
        "heartbeat_interval_s": a.heartbeat_interval_s,
        "heartbeat_timeout_s": a.heartbeat_timeout_s,
        "repeats": len(latencies),
        "latencies_s": latencies,
        "median_s": median,
        "median_timeouts": median / a.heartbeat_timeout_s,
    }


def bench_loss(a: argparse.Namespace, work: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows per k, and the clean N-device run (its run dir, timings) for resume and checkpoint."""
    rows: list[dict[str, Any]] = []
    clean: dict[str, Any] = {}
    for k in a.lost:
        FAULTS.clear()
        FAULTS.update({f"dev{i}": ("crash", 2) for i in range(k)})
        topo, result, _, _ = run(a, work, f"lost{k}", devices=a.devices, rounds=a.rounds)
        lossy = summary_of(result)
        FAULTS.clear()
        _, base_result, base_rec, base_t0 = run(
            a, work, f"clean{a.devices - k}", devices=a.devices - k, rounds=a.rounds
        )
        base = summary_of(base_result)
        if k == 0:
            clean = {"topology": topo, "result": base_result, "rec": base_rec, "t0": base_t0}
        lost_in = sorted({d for r in lossy["rounds"] for d in r["devices_lost"]})
        after, before = median_rounds(lossy, 3), median_rounds(base, 3)
        rows.append({
            "lost": k, "devices": a.devices, "lost_devices": lost_in,
            "round_s_median": after, "clean_devices": a.devices - k, "clean_round_s_median": before,
            "ratio": after / before,
        })  # fmt: skip
    return rows, clean


def bench_resume(a: argparse.Namespace, work: Path, clean: dict[str, Any]) -> dict[str, Any]:
    run_dir = Path(clean["result"].result["run_dir"])
    rec, t0 = clean["rec"], clean["t0"]
    _, _, resumed, r0 = run(
        a, work, f"clean{a.devices}", devices=a.devices, rounds=a.rounds + 2, resume=run_dir
    )
    return {
        "resumed_from": a.rounds,
        "fresh_first_round_s": rec["first_round_at"] - t0,
        "resumed_first_round_s": resumed["first_round_at"] - r0,
        "fresh_plan_s": rec["admitted_at"] - rec["open_at"],
        "resumed_restore_s": resumed["admitted_at"] - resumed["open_at"],
    }


def checkpoint_size(run_dir: Path) -> dict[str, Any]:
    ckpt = latest_checkpoint(run_dir)
    files = {f.name: f.stat().st_size for f in sorted(ckpt.path.iterdir()) if f.is_file()}
    return {"round": ckpt.round, "bytes": sum(files.values()), "files": files}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-tiny", choices=sorted(MODELS))
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--rounds", type=int, default=20, help="rounds of each run (≥ 3: rounds 3.. are timed)")
    p.add_argument("--repeats", type=int, default=3, help="devices that fall silent (detection samples)")
    p.add_argument("--lost", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--max-documents", type=int, default=40)
    p.add_argument("--heartbeat-interval-s", type=float, default=0.25)
    p.add_argument("--heartbeat-timeout-s", type=float, default=2.0)
    p.add_argument("--timeout-s", type=float, default=1800.0)
    p.add_argument(
        "--only", choices=("all", "checkpoint"), default="all",
        help="checkpoint: one clean run, its checkpoint's bytes (e.g. for smollm2-135m)",
    )  # fmt: skip
    a = p.parse_args(argv)
    if a.rounds < 3 or a.repeats >= a.devices or max(a.lost) >= a.devices:
        p.error("need --rounds ≥ 3, --repeats < --devices and every --lost < --devices")
    torch.set_num_threads(1)
    log.configure("console", level="critical")  # the crashes are injected
    info = machine_info()
    print("machine:", json.dumps(info))
    print(f"# faults  model={a.model} devices={a.devices} rounds={a.rounds} heartbeat "
          f"{a.heartbeat_interval_s}/{a.heartbeat_timeout_s} s", flush=True)  # fmt: skip
    out: dict[str, Any] = {"bench": "faults", "machine": info, "model": a.model, "devices": a.devices,
                           "rounds": a.rounds}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="sft-faults-") as tmp:
        work = Path(tmp)
        if a.only == "checkpoint":
            FAULTS.clear()
            devices = len(MODELS[a.model][1]) if a.model != "llama-tiny" else a.devices
            _, result, _, _ = run(a, work, "checkpoint", devices=devices, rounds=1)
            out["devices"], out["rounds"] = devices, 1
            out["checkpoint"] = checkpoint_size(Path(result.result["run_dir"]))
        else:
            out["detect"] = bench_detect(a, work)
            d = out["detect"]
            print(f"detect: median {d['median_s']:.2f} s = {d['median_timeouts']:.2f} × heartbeat_timeout_s "
                  f"over {d['repeats']}: {[round(x, 2) for x in d['latencies_s']]}", flush=True)  # fmt: skip
            out["loss"], clean = bench_loss(a, work)
            for row in out["loss"]:
                print(f"lost {row['lost']}/{row['devices']}: round {row['round_s_median']:.3f} s vs "
                      f"{row['clean_devices']} clean {row['clean_round_s_median']:.3f} s  "
                      f"ratio {row['ratio']:.2f}", flush=True)  # fmt: skip
            out["max_loss_ratio"] = max(row["ratio"] for row in out["loss"] if row["lost"] > 0) if any(
                row["lost"] > 0 for row in out["loss"]) else None  # fmt: skip
            if clean:  # k = 0 was measured: its clean N-device run is resumed and weighed
                out["checkpoint"] = checkpoint_size(Path(clean["result"].result["run_dir"]))
                out["resume"] = bench_resume(a, work, clean)
                r = out["resume"]
                print(f"resume: first round after {r['resumed_first_round_s']:.2f} s (fresh "
                      f"{r['fresh_first_round_s']:.2f} s); restore {r['resumed_restore_s']:.3f} s "
                      f"(fresh plans {r['fresh_plan_s']:.3f} s)", flush=True)  # fmt: skip
    c = out.get("checkpoint", {"bytes": 0, "round": None, "files": {}})
    print(
        f"checkpoint: {c['bytes']} bytes ({c['bytes'] / 2**20:.2f} MiB) at round {c['round']}: {c['files']}"
    )
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
