"""Rate-controlled transform coding in the planner: presets, menu grid, accuracy data, output."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from sft_actors.cli.plan import codec_toml, plan_command
from sft_actors.codec import presets
from sft_actors.codec.spec import ChainSpec, CodecPolicy
from sft_actors.errors import ConfigError
from sft_actors.plan import build_menu, fit_accuracy_curve, load_accuracy_curve
from sft_actors.plan.accuracy import ACCURACY_CURVE_PATH, AccuracyCurve, AccuracyPoint
from sft_actors.plan.refit import main as refit_main
from sft_actors.plan.refit import points_from_bench
from tests.test_plan_cli import TOPOLOGY as CLI_TOPOLOGY

ROOT = Path(__file__).resolve().parents[1]
GRID = (4.0, 6.0, 8.0, 12.0, 16.0, 20.0, 24.0, 32.0, 48.0)


# --- presets ---------------------------------------------------------------------------------
def test_transform_preset_parses_and_round_trips() -> None:
    policy = presets.transform_policy(24.0, 16.0)
    assert policy.up.quantize is not None and policy.up.quantize.ratio == 24.0
    assert policy.up.quantize.rounding == "nearest" and policy.up.quantize.scale == "common"
    assert policy.up.project is not None and policy.up.project.transform == "center"
    assert policy.up.outliers is not None and policy.up.outliers.first_tokens == 1
    assert policy.up.lossless is not None and policy.up.lossless.contexts == "column_scale"
    assert policy.down.quantize is not None and policy.down.quantize.ratio == 16.0
    assert policy.down.quantize.rounding == "stochastic"  # unbiased gradients
    assert policy.down.project is None and policy.down.outliers is None
    assert CodecPolicy.parse(policy.to_dict()) == policy
    # Gradients default to the measured proportion (32 at 11), never below 32, at most 1000.
    ratios = {r: presets.transform_policy(r).down.quantize.ratio for r in (4.0, 12.0, 24.0, 600.0)}  # type: ignore[union-attr]
    assert ratios == {4.0: 32.0, 12.0: 34.9, 24.0: 69.8, 600.0: 1000.0}
    # The TOML form parses back to the same policy.
    text = presets.codec_toml(presets.transform_tables(24.0, 16.0))
    assert CodecPolicy.parse(tomllib.loads(text)["run"]["codec"]) == policy
    with pytest.raises(ConfigError, match="ratio"):
        presets.transform_policy(0.5)


@pytest.mark.parametrize("name", ["local.toml", "local-bf16.toml"])
def test_the_main_job_runs_the_default_transform_preset(name: str) -> None:
    with open(ROOT / "topologies" / name, "rb") as f:
        local = tomllib.load(f)["run"]["codec"]
    assert presets.transform_policy(*presets.DEFAULT_RATIOS) == CodecPolicy.parse(local)


def test_paper_topk_preset_round_trips() -> None:
    text = presets.codec_toml(presets.paper_topk_tables())
    assert CodecPolicy.parse(tomllib.loads(text)["run"]["codec"]) == presets.paper_topk_policy()


# --- menu ------------------------------------------------------------------------------------
def test_menu_holds_the_rate_controlled_transform_grid() -> None:
    options = {o.name: o for o in build_menu(pareto_only=False).options}
    transform = sorted((o for o in options.values() if o.family == "transform"), key=lambda o: o.ratio)
    assert tuple(o.ratio for o in transform) == GRID
    for o in transform:
        assert o.name == f"transform-{o.ratio:g}x" and o.rate_controlled and o.scope == "pca"
        assert CodecPolicy.parse(o.tables()) == presets.transform_policy(o.ratio)
    # The paper's Top-K entries stay as they were (and the 20 %/8-bit one is the preset).
    assert {"topk-0.2-b6", "topk-0.2-b8", "topk-0.1-b8", "topk-0.1-b4", "topk-0.05-b8"} <= set(options)
    assert options["topk-0.2-b6"].ratio == 15.7 and not options["topk-0.2-b6"].rate_controlled
    assert CodecPolicy.parse(options["topk-0.2-b8"].tables()) == presets.paper_topk_policy()


def test_planner_prefers_transform_over_topk_at_equal_ratio() -> None:
    curve = load_accuracy_curve()
    for ratio in (8.0, 16.0, 24.0, 32.0):
        assert curve.loss("transform", ratio) < curve.loss("topk", ratio)
    menu = build_menu()  # Pareto: transform-16x has a higher ratio and a lower loss than Top-K 15.7x
    names = [o.name for o in menu.options]
    assert "transform-16x" in names and "transform-24x" in names
    assert "topk-0.2-b6" not in names and "topk-0.2-b8" not in names
    # With only one transform and one Top-K setting of (about) the same ratio, the plan picks transform.
    from sft_actors.plan import plan, random_problem

    problem = random_problem(3, 0, codecs=["transform-16x", "topk-0.2-b6"], max_device_blocks=4)
    best = plan(problem)
    assert set(best.codecs) == {"transform-16x"}


# --- accuracy data ---------------------------------------------------------------------------
def test_accuracy_points_are_the_rate_controlled_chain() -> None:
    curve = load_accuracy_curve()
    trained = [p for p in curve.points if p.family == "transform" and p.basis == "trained"]
    assert (10.87, 0.0064) in [(p.ratio, p.loss) for p in trained]  # the default chain, 11x / 32x
    assert all("transform" in p.note and "SmolLM2-135M cut 4" in p.note for p in trained)
    assert not any("PRELIMINARY" in p.note or "OLD" in p.note for p in curve.points)
    # The fit passes near the measured points (steep: up 16 costs ~8 %, 32 ~67 %).
    assert curve.loss("transform", 32.0) == pytest.approx(0.67, rel=0.3)


def test_refit_from_points_reproduces_the_packaged_fits(tmp_path: Path) -> None:
    raw = json.loads(ACCURACY_CURVE_PATH.read_text())
    refitted = fit_accuracy_curve([AccuracyPoint(**p) for p in raw["points"]])
    assert _fits(refitted) == pytest.approx(_fits(load_accuracy_curve()), rel=1e-9)
    out = tmp_path / "curve.json"
    refit_main(["accuracy", str(ACCURACY_CURVE_PATH), "--out", str(out)])
    assert json.loads(out.read_text()) == raw  # the committed file is what the refit writes


def _fits(curve: AccuracyCurve) -> dict[str, float]:
    return {f"{f.family}/{f.basis}/{k}": v for f in curve.fits for k, v in (("a", f.a), ("p", f.p))}


def _bench_record() -> dict[str, object]:
    def row(
        name: str, codec: dict[str, object], up: float, down: float, total: float, gap: float
    ) -> dict[str, object]:
        return {
            "chain": name,
            "codec": codec,
            "ratio_up": up,
            "ratio_down": down,
            "ratio_total": total,
            "ppl_gap": gap,
        }

    return {
        "bench": "compression",
        "model": "smollm2-135m",
        "cut": 4,
        "steps_per_device": 40,
        "chains": {
            "raw": row("raw", {"up": {}, "down": {}}, 1.0, 1.0, 1.0, 0.0),
            "topk0.2-b8": row("topk0.2-b8", presets.paper_topk_tables(), 16.2, 16.1, 16.15, 0.205),
            "center-r24": row("center-r24", presets.transform_tables(24.0, 16.0), 23.6, 16.1, 19.2, 0.04),
            "klt-r24": {"chain": "klt-r24", "error": "boom"},
        },
    }


def test_refit_accuracy_from_bench_replaces_the_measured_families(tmp_path: Path) -> None:
    bench = tmp_path / "bench.txt"
    bench.write_text("# header\n" + json.dumps(_bench_record()) + "\n")
    points = points_from_bench(json.loads(bench.read_text().splitlines()[-1]))
    assert [(p.family, p.ratio, p.loss) for p in points] == [("topk", 16.2, 0.205), ("transform", 23.6, 0.04)]
    assert "up/down ratio 23.6/16.1, ratio_total 19.2" in points[1].note
    out = tmp_path / "curve.json"
    refit_main(["accuracy", "--from-bench", str(bench), "--replace", "--out", str(out)])
    curve = load_accuracy_curve(out)
    trained = [p for p in curve.points if p.family == "transform" and p.basis == "trained"]
    assert [(p.ratio, p.loss) for p in trained] == [(23.6, 0.04)]  # the preliminary ones are gone
    untrained = [p for p in curve.points if p.basis == "untrained" and p.family == "transform"]
    assert untrained  # other bases are kept
    assert curve.loss("transform", 23.6) == pytest.approx(0.04)  # one point: default exponent


# --- output ----------------------------------------------------------------------------------
# The plan CLI's one-device topology, under its own name.
TOPOLOGY = CLI_TOPOLOGY.replace('name = "plan-test"', 'name = "plan-transform"')


def test_sft_plan_prints_the_transform_chain_to_paste(tmp_path: Path) -> None:
    source = tmp_path / "topo.toml"
    source.write_text(TOPOLOGY)
    app = typer.Typer()
    app.command(name="plan")(plan_command)
    app.command(name="noop")(lambda: None)
    runner = CliRunner()
    args = ["plan", str(source), "--server-flops", "1e12", "--bandwidth-hz", "2e6"]
    as_json = runner.invoke(app, [*args, "--json"])
    assert as_json.exit_code == 0, as_json.output
    result = json.loads(as_json.output.strip().splitlines()[-1])
    chosen = result["devices"][0]["codec"]
    assert chosen["name"].startswith("transform-") and chosen["rate_controlled"]
    text = result["codec_toml"][chosen["name"]]
    policy = CodecPolicy.parse(tomllib.loads(text)["run"]["codec"])
    assert policy == presets.transform_policy(chosen["ratio"])
    table = runner.invoke(app, args)
    assert table.exit_code == 0, table.output
    assert (
        f"codec {chosen['name']} for phone: rate control holds every frame to {chosen['ratio']:g}x"
        in table.output
    )
    assert text.strip() in table.output
    assert f"ratio = {chosen['ratio']!r}" in table.output


def test_codec_toml_of_every_menu_option_parses() -> None:
    for option in build_menu(pareto_only=False).options:
        text = codec_toml(option)
        policy = CodecPolicy.parse(tomllib.loads(text)["run"]["codec"])
        assert policy.up == ChainSpec.parse(option.chain)


def test_the_planner_counts_each_transform_option_s_own_gradient_ratio() -> None:
    menu = build_menu(pareto_only=False)
    for o in menu.options:
        if o.family == "transform":
            assert o.ratio_down == presets.transform_down_ratio(o.ratio) and o.ratio_down >= o.ratio
            assert o.tables()["down"]["quantize"]["ratio"] == o.ratio_down
        else:
            assert o.ratio_down == o.ratio
    assert np.array_equal(menu.down_ratios, [o.ratio_down for o in menu.options])
