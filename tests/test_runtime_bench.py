"""The runtime's benchmarks run with tiny arguments, as subprocesses, so they cannot rot.

Timings depend on the machine, so none is compared with a bound: the asserts check what the
arguments fix (rows, counts) and that each derived number follows from the ones it is made of.
"""

from __future__ import annotations

import json
import math
import os
import shutil
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
    rows = r["round_trip"]
    cells = sorted((row["transport"], row["bytes"]) for row in rows)
    assert cells == [(t, b) for t in ("inproc", "ipc", "tcp") for b in (1024, 65536)]
    for row in rows:
        assert row["repeats"] == 5 and row["p50_ms"] <= row["p99_ms"]
        # Both directions carry the payload: mb_s is 2 × bytes over the median round trip.
        assert row["mb_s"] == pytest.approx(2 * row["bytes"] / (row["p50_ms"] / 1e3) / 1e6, rel=1e-9)
    # 0.3 s of 100 kB messages at 40 Mb/s (5 MB/s) is 15 messages.
    assert [(p["rate_mbps"], p["messages"]) for p in r["paced"]] == [(40.0, 15)]
    paced = r["paced"][0]
    assert paced["error_pct"] == pytest.approx(abs(paced["measured_mbps"] - 40.0) / 40.0 * 100, rel=1e-9)
    assert r["max_paced_error_pct"] == paced["error_pct"]


@pytest.mark.slow
def test_step_bench_smoke() -> None:
    r = run_bench("step.py", "--model", "vit-tiny", "--batch", "2", "--cut", "2", "--repeats", "2",
                  "--warmup", "1")  # fmt: skip
    assert (r["model"], r["batch"], r["cut"]) == ("vit-tiny", 2, 2)
    assert r["overhead_ratio"] == pytest.approx(r["runtime_ms"] / r["plain_ms"], rel=1e-9)
    # Either a measured ratio (of the two overheads) or the reason torch rpc could not run here.
    if r["vs_torch_rpc"] is None:
        assert isinstance(r["torch_rpc"], str) and r["torch_rpc"]
    else:
        rpc_overhead = r["torch_rpc_ms"] / r["torch_rpc_plain_ms"]
        assert r["vs_torch_rpc"] == pytest.approx(r["overhead_ratio"] / rpc_overhead, rel=1e-9)


def test_scale_bench_smoke() -> None:
    r = run_bench("scale.py", "--devices", "4", "--seq", "8")
    assert r["devices"] == 4
    growth = (r["rss_round_mb"] - r["rss_before_mb"]) / 4
    assert r["extra_rss_mb_per_device"] == pytest.approx(growth, rel=1e-9)
    assert r["connect_s"] + r["round_s"] <= r["total_s"]  # both happen inside the timed run


def test_faults_bench_smoke() -> None:
    r = run_bench("faults.py", "--devices", "3", "--rounds", "3", "--repeats", "1")
    assert (r["model"], r["devices"], r["rounds"]) == ("llama-tiny", 3, 3)
    d = r["detect"]
    assert d["repeats"] == len(d["latencies_s"]) == 1 and d["median_s"] == d["latencies_s"][0]
    assert d["median_timeouts"] == pytest.approx(d["median_s"] / d["heartbeat_timeout_s"], rel=1e-9)
    rows = r["loss"]
    assert [(row["lost"], row["clean_devices"]) for row in rows] == [(0, 3), (1, 2), (2, 1)]
    for row in rows:
        assert row["lost_devices"] == [f"dev{i}" for i in range(row["lost"])]
        assert row["ratio"] == pytest.approx(row["round_s_median"] / row["clean_round_s_median"], rel=1e-9)
    assert r["max_loss_ratio"] == max(row["ratio"] for row in rows[1:])
    c = r["checkpoint"]
    assert c["round"] == 3 and c["bytes"] == sum(c["files"].values())
    actors = ["coordinator", "dev0", "dev1", "dev2", "server"]
    assert sorted(c["files"]) == ["checkpoint.json", *(f"{a}.safetensors" for a in actors)]
    assert r["resume"]["resumed_from"] == 3


def test_security_bench_smoke() -> None:
    r = run_bench("security.py", "--model", "llama-tiny", "--runs", "1", "--rounds", "2", "--steps", "2",
                  "--sizes", "1024", "--repeats", "3", "--warmup", "1", "--rates", "2000", "--flood-s", "1",
                  "--stage-rounds", "1")  # fmt: skip
    o = r["overhead"]
    assert (o["model"], o["runs"], len(o["none_ms"]), len(o["curve_ms"])) == ("llama-tiny", 1, 1, 1)
    assert o["ratio"] == pytest.approx(o["curve_ms_median"] / o["none_ms_median"], rel=1e-9)
    assert o["losses_equal"] is True  # CURVE changes no byte of what is trained on
    rows = r["round_trip"]
    assert sorted((row["bytes"], row["mode"]) for row in rows) == [(1024, "curve"), (1024, "none")]
    for row in rows:
        assert row["repeats"] == 3
        assert row["mb_s"] == pytest.approx(2 * row["bytes"] / (row["p50_ms"] / 1e3) / 1e6, rel=1e-9)
    p50 = {row["mode"]: row["p50_ms"] for row in rows}
    assert r["round_trip_ratio"] == {"1024": pytest.approx(p50["curve"] / p50["none"], rel=1e-9)}
    f = r["flood"]
    (stage,) = f["stages"]
    assert stage["rate"] == 2000.0 and stage["sent"] > 0
    assert stage["msgs_s"] == pytest.approx(stage["sent"] / stage["seconds"], rel=1e-9)
    assert stage["ok"] == (stage["peers_lost"] == 0 and stage["max_silence_s"] < f["heartbeat_timeout_s"])
    assert f["max_ok_rate_msgs_s"] == (stage["msgs_s"] if stage["ok"] else None)


@pytest.mark.slow
def test_launch_slurm_bench_smoke() -> None:
    if os.geteuid() != 0 or not all(shutil.which(p) for p in ("slurmctld", "slurmd", "munged", "sbatch")):
        pytest.skip("needs root and Debian's slurm-wlm and munge (bin/_setup.sh installs them)")
    r = run_bench("launch_slurm.py", "--rounds", "1", "--repeats", "1", "--warmup", "0")
    assert (r["rounds"], r["repeats"]) == (1, 1) and r["slurm"].startswith("slurm")
    variants = r["variants"]
    assert set(variants) == {"slurm", "local", "processes"}
    for v in variants.values():
        (run,) = v["runs"]
        assert v["wall_s"] == round(run["wall_s"], 3) and 0 < v["first_round_s"] < v["wall_s"]
    slurm = variants["slurm"]
    assert 0 < slurm["submit_to_first_round_s"] <= slurm["first_round_s"] + 1e-3  # submitted after the start
    for base in ("local", "processes"):
        assert r[f"slurm_minus_{base}_wall_s"] == round(slurm["wall_s"] - variants[base]["wall_s"], 3)
        assert r[f"slurm_over_{base}_wall_s"] == round(slurm["wall_s"] / variants[base]["wall_s"], 3)


def test_lora_averaging_bench_smoke() -> None:
    r = run_bench("lora_averaging.py", "--quick")
    assert (r["blocks"], r["devices"], r["repeats"]) == (2, 2, 1)
    assert r["projections"] == r["refactorized"] == 4  # cuts 1 and 2: block 0 (q, k, v, o) is shared
    assert set(r["ms"]) == {"fedavg", "fedavg+errors", "svd", "dense_svd", "svd_lowrank"}
    assert r["svd_vs_fedavg_ms_ratio"] == pytest.approx(r["ms"]["svd"] / r["ms"]["fedavg"], rel=1e-9)
    # The factored re-factorization is the dense truncated SVD (fp32 output), and the best
    # rank-r approximation is at least as close as FedAvg's product.
    assert r["factored_vs_dense_rel"] < 1e-5 and r["fedavg_stats_equal"]
    assert 0 <= r["svd_error"] <= r["fedavg_error"]


def test_gpu_server_bench_smoke() -> None:
    """bench/gpu_server.py (SmolLM2's server part on a GPU) on the CPU with tiny arguments."""
    r = run_bench("gpu_server.py", "--device", "cpu", "--quick")
    assert (r["device"], r["model"], r["repeats"]) == ("cpu", "llama-tiny", 3)
    rows = {row["dtype"]: row for row in r["rows"]}
    assert set(rows) == {"bfloat16", "float32"}
    for name, row in rows.items():
        assert row["wire_dtype"] == row["grad_wire_dtype"] == name  # the run's dtype on the wire
        assert row["adapter_dtypes"] == ["float32"]  # whatever the base dtype
        assert row["micro_batches_per_s"] == pytest.approx(1e3 / row["step_ms_median"], rel=1e-2)
        assert row["tokens_per_s"] == pytest.approx(
            r["batch"] * r["seq"] * row["micro_batches_per_s"], rel=1e-2
        )
    assert rows["float32"]["activation_bytes"] == 2 * rows["bfloat16"]["activation_bytes"]
    assert r["bf16_speedup"] == pytest.approx(
        rows["float32"]["step_ms_median"] / rows["bfloat16"]["step_ms_median"], rel=1e-2
    )


def test_precision_bench_smoke() -> None:
    """bench/precision.py: float32 adapters take every early update over a bfloat16 base."""
    r = run_bench("precision.py", "--model", "llama-tiny", "--cut", "1", "--steps", "3", "--seq", "8")
    rows = {(row["base"], row["adapter"]): row for row in r["rows"]}
    assert set(rows) == {("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16")}
    for key in (("float32", "float32"), ("bfloat16", "float32")):
        assert rows[key]["device_lora_A_changed"] == rows[key]["server_lora_A_changed"] == 1.0
    assert rows[("bfloat16", "bfloat16")]["device_lora_A_changed"] < 0.9  # what float32 adapters fix


def test_compression_bench_smoke() -> None:
    """bench/compression.py: uncompressed vs the paper's chain vs transform coding through the
    runtime, tiny model."""
    r = run_bench("compression.py", "--model", "llama-tiny", "--chains", "raw,topk0.2-b8,transform-11/32",
                  "--default", "transform-11/32", "--cut", "2", "--rounds", "2", "--steps", "2",
                  "--eval-batches", "2", "--calibration-batches", "2", "--max-documents", "60")  # fmt: skip
    settings = (r["default"], r["model"], r["steps_per_device"], r["cut"])
    assert settings == ("transform-11/32", "llama-tiny", 4, 2)
    chains = r["chains"]
    assert set(chains) == {"raw", "topk0.2-b8", "transform-11/32"} and r["uncompressed"] == chains["raw"]
    raw, topk, center = chains["raw"], chains["topk0.2-b8"], chains["transform-11/32"]
    assert raw["ratio_up"] == raw["ratio_down"] == raw["ratio_total"] == 1.0
    assert raw["ppl_gap"] == raw["ppl_gap_raw"] == 0.0 and raw["basis_bytes"] == topk["basis_bytes"] == 0
    assert r["target_loss"] == pytest.approx(raw["loss"] * 1.02, rel=1e-9)
    # The final evaluation reaches its own target: the uncompressed run always has a time.
    assert raw["time_to_target_s"] is not None and 0 <= raw["time_to_target_s"] <= raw["train_s"]
    for key in ("ratio_up", "ratio_down", "ratio_total", "ppl_gap", "ppl_gap_raw", "time_to_target_s"):
        assert r[key] == center[key]
    for row in (topk, center):
        assert row["ratio_up"] > 1 and row["ratio_down"] > 1 and row["raw_up"] == raw["raw_up"]
        up, down = row["raw_up"] + row["raw_down"], row["bytes_up"] + row["bytes_down"]
        assert row["ratio_total"] == pytest.approx(up / down, rel=1e-9)
        assert row["ppl_gap"] == pytest.approx(row["ppl"] / raw["ppl"] - 1, rel=1e-9)
        assert [e[0] for e in row["loss_curve"]] == [0, 1, 2]  # held-out loss after every round
        assert all(math.isfinite(e[1]) for e in row["loss_curve"])
    # The one-time basis is coded bytes up: the activations alone compress better.
    assert center["basis_bytes"] > 0 and center["ratio_up"] < center["ratio_up_coded"]
