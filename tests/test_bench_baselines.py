"""bench/baselines.py, bench/stages.py and bench/llm_chains.py run with tiny arguments, so they
cannot rot."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_bench(script: str, *args: str, timeout_s: float = 280) -> dict[str, Any]:
    """Run ``bench/<script>`` as a subprocess; its last stdout line is the JSON result."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.timeout(300)
def test_baselines_bench_tiny_reports_every_mode_and_the_headline_ratios() -> None:
    result = run_bench("baselines.py", "--tiny")
    assert set(result["modes"]) == {"sl", "sfl", "sft", "fedlora"}
    assert result["modes"]["sft"]["bytes_up"] < result["modes"]["sfl"]["bytes_up"]
    assert result["modes"]["fedlora"]["bytes_up"] == 0
    assert result["modes"]["fedlora"]["device_peak_mb"] > result["modes"]["sft"]["device_peak_mb"]
    # The headline ratios follow from the rows (delays are the machine's, so only checked so).
    sl, sfl, sft = (result["modes"][m] for m in ("sl", "sfl", "sft"))
    assert result["delay_ratio_sft_vs_sl"] == pytest.approx(sft["delay_s"] / sl["delay_s"], rel=1e-9)
    wire = (sft["bytes_up"] + sft["bytes_down"]) / (sfl["bytes_up"] + sfl["bytes_down"])
    assert result["bytes_ratio_sft_vs_sfl"] == pytest.approx(wire, rel=1e-9) and wire < 1.0
    assert result["metric_gap_sft_vs_sfl"] == pytest.approx(sft["metric"] / sfl["metric"] - 1.0, rel=1e-9)


@pytest.mark.timeout(300)
def test_stages_bench_tiny_compares_one_and_two_server_stages() -> None:
    result = run_bench("stages.py", "--tiny")
    assert result["one_stage"]["stages"] == 1 and result["two_stages"]["stages"] == 2
    for layout in (result["one_stage"], result["two_stages"]):
        assert layout["round_s_median"] == statistics.median(layout["rounds_s"])
    # stage_gain is a ratio of timings: check it is the ratio of the reported medians.
    one, two = result["one_stage"]["round_s_median"], result["two_stages"]["round_s_median"]
    assert result["stage_gain"] == pytest.approx(one / two, rel=1e-9)


@pytest.mark.timeout(200)
def test_llm_chains_bench_tiny_reports_every_chain() -> None:
    result = run_bench(
        "llm_chains.py",
        *("--model", "llama-tiny", "--cut", "2", "--sequences", "4", "--seq", "16", "--max-documents", "20"),
        timeout_s=190,
    )
    assert result["chains"]["raw"]["ratio"] == 1.0
    assert all(r["ratio"] > 1.0 for name, r in result["chains"].items() if name != "raw")
