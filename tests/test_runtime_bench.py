"""The runtime's benchmarks run with tiny arguments, as subprocesses, so they cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(180)


def run_bench(name: str, *args: str) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / name), *args],
        capture_output=True, text=True, timeout=170, cwd=ROOT, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["machine"]["cpu_count"] and result["machine"]["git_commit"]
    return result


def test_wire_bench_smoke() -> None:
    r = run_bench("wire.py", "--sizes", "1024,65536", "--repeats", "5", "--warmup", "1", "--rates", "40",
                  "--paced-s", "0.3")  # fmt: skip
    assert {row["transport"] for row in r["round_trip"]} == {"inproc", "ipc", "tcp"}
    assert all(row["p50_ms"] > 0 and row["mb_s"] > 0 for row in r["round_trip"])
    assert r["paced"][0]["rate_mbps"] == 40.0 and r["max_paced_error_pct"] >= 0


@pytest.mark.slow
def test_step_bench_smoke() -> None:
    r = run_bench("step.py", "--model", "vit-tiny", "--batch", "2", "--cut", "2", "--repeats", "2",
                  "--warmup", "1")  # fmt: skip
    assert r["plain_ms"] > 0 and r["runtime_ms"] > 0 and r["overhead_ratio"] > 0
    # Either a measured ratio or the reason torch rpc could not run here.
    assert r["vs_torch_rpc"] is not None or r["torch_rpc"]


def test_scale_bench_smoke() -> None:
    r = run_bench("scale.py", "--devices", "4", "--seq", "8")
    assert r["devices"] == 4 and r["round_s"] > 0 and r["extra_rss_mb_per_device"] > 0
