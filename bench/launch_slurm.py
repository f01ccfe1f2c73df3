"""What a Slurm launch costs: ``sft launch --backend slurm`` vs the same topology without Slurm.

    python bench/launch_slurm.py                                   # tiny.toml, 2 rounds, 3 repeats
    python bench/launch_slurm.py --rounds 1 --repeats 1 --warmup 0 # smoke (CI)

Every variant runs ``topologies/tiny.toml`` (free ports, its run directory in a temporary
directory, ``--rounds`` rounds) as a command, ``OMP_NUM_THREADS=1``, timed from the moment the
command is started:

- ``slurm``: ``sft launch T --backend slurm`` — sbatch, scheduling, one ``srun`` step per node
  (coordinator, server, both devices in one node: 3 processes), the launcher polling ``squeue``;
- ``local``: ``sft launch T --backend ssh`` with every host local (the same 3 node processes,
  started directly): the Slurm overhead is ``slurm − local``;
- ``processes``: ``sft run T --processes --transport tcp`` (one process per actor: 4).

For each: ``wall_s`` (start to exit) and ``first_round_s`` (start to the coordinator's first
``round_done``, by its log's timestamp; the same clock). ``slurm`` also reports
``submit_to_first_round_s`` (sbatch to the first round, from the launch's JSON line). Medians
over ``--repeats`` after ``--warmup`` runs of each; variants alternate within a repeat so that
load on a shared machine spreads over all of them. Ratios are of medians from the same run.

With ``SLURM_CONF`` set the cluster it names is used; otherwise a one-node cluster is started
with ``deploy/slurm/local-cluster.sh`` in a temporary directory (root) and stopped at the end.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import header, machine_info

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "deploy" / "slurm" / "local-cluster.sh"
VARIANTS = ("slurm", "local", "processes")
TIMEOUT_S = 600


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def topology(work: Path, rounds: int) -> Path:
    text = (ROOT / "topologies" / "tiny.toml").read_text().replace("rounds = 2\n", f"rounds = {rounds}\n", 1)
    ports = dict(zip(("47310", "47311"), map(str, free_ports(2)), strict=True))
    text = re.sub(r"port = (4731[01])\b", lambda m: f"port = {ports[m.group(1)]}", text)
    text = text.replace('dir = "runs/tiny"', f'dir = "{work / "runs"}"')
    path = work / "tiny.toml"
    path.write_text(text)
    return path


@contextmanager
def cluster() -> Iterator[dict[str, str]]:
    """The environment for Slurm commands: ``SLURM_CONF`` as given, or a local cluster's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_JOB", "SLURM_STEP", "SBATCH_"))}
    if "SLURM_CONF" in os.environ:
        yield env
        return
    state = Path(tempfile.mkdtemp(prefix="sft-slurm-bench-"))
    ctld, slurmd = free_ports(2)
    own = env | {
        "SFT_SLURM_DIR": str(state),
        "SFT_SLURM_CTLD_PORT": str(ctld),
        "SFT_SLURM_SLURMD_PORT": str(slurmd),
    }
    try:
        up = subprocess.run([str(CLUSTER), "start"], env=own, capture_output=True, text=True, timeout=120)
        if up.returncode != 0:
            raise SystemExit(f"local-cluster.sh start failed:\n{up.stderr}")
        yield env | {"SLURM_CONF": str(state / "slurm.conf")}
    finally:
        subprocess.run([str(CLUSTER), "stop"], env=own, capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def first_round(lines: list[str]) -> datetime | None:
    for raw in lines:
        if raw.startswith("{") and '"round_done"' in raw:
            stamp = json.loads(raw).get("timestamp")
            return datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return None


def run_variant(variant: str, tiny: Path, work: Path, env: dict[str, str], n: int) -> dict[str, Any]:
    cli = [sys.executable, "-m", "sft_actors.cli.main"]
    logs = work / f"{variant}-{n}"
    if variant == "processes":
        argv = [*cli, "run", str(tiny), "--processes", "--transport", "tcp", "--log-format", "json"]
    else:
        backend = "slurm" if variant == "slurm" else "ssh"
        argv = [*cli, "launch", str(tiny), "--backend", backend, "--logs", str(logs), "--threads", "1"]
    start_wall, start = time.time(), time.perf_counter()
    done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    line = json.loads(done.stdout.strip().splitlines()[-1])
    if variant == "processes":
        events = done.stderr.splitlines()
    else:
        label = "localhost-coordinator"
        events = (logs / f"{label}.log").read_text().splitlines()
    at = first_round(events)
    row: dict[str, Any] = {
        "wall_s": wall,
        "first_round_s": None if at is None else at.timestamp() - start_wall,
    }
    if variant == "slurm":
        row["submit_to_first_round_s"] = line.get("first_round_s")
    return row


def median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(values), 3) if values else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    base_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    info = machine_info()
    print(header("launch_slurm", rounds=args.rounds, repeats=args.repeats, warmup=args.warmup))
    rows: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    work = Path(tempfile.mkdtemp(prefix="sft-bench-launch-"))
    try:
        with cluster() as slurm_env:
            env = base_env | {"SLURM_CONF": slurm_env["SLURM_CONF"]}
            slurm_version = subprocess.run(["sinfo", "--version"], env=env, capture_output=True, text=True)
            tiny = topology(work, args.rounds)
            for n in range(args.warmup + args.repeats):
                for variant in VARIANTS:
                    row = run_variant(variant, tiny, work, env, n)
                    if n >= args.warmup:
                        rows[variant].append(row)
                    shown = {k: None if v is None else round(v, 2) for k, v in row.items()}
                    print(f"# {'warmup' if n < args.warmup else 'repeat'} {n} {variant}: {shown}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result: dict[str, Any] = {
        "machine": info,
        "slurm": slurm_version.stdout.strip(),
        "rounds": args.rounds,
        "repeats": args.repeats,
        "variants": {
            v: {k: median(rs, k) for k in ("wall_s", "first_round_s", "submit_to_first_round_s")}
            | {"runs": rs}
            for v, rs in rows.items()
        },
    }
    med = {v: result["variants"][v] for v in VARIANTS}
    for base in ("local", "processes"):
        for key in ("wall_s", "first_round_s"):
            a, b = med["slurm"][key], med[base][key]
            if a is not None and b is not None:
                result[f"slurm_minus_{base}_{key}"] = round(a - b, 3)
                result[f"slurm_over_{base}_{key}"] = round(a / b, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
