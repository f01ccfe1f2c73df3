"""The resource planner: models, both timescales, baselines, infeasibility, data refits."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest

from sft_actors.errors import ConfigError, ModelSpecError, PlanInfeasible
from sft_actors.plan import (
    AccuracyPoint,
    ChannelConfig,
    CompressionMenu,
    DeviceProfile,
    ModelCosts,
    PlanProblem,
    ServerProfile,
    TrainingShape,
    build_menu,
    build_terms,
    channel_for,
    draw_channel,
    equal_bandwidth,
    equal_bandwidth_plan,
    exhaustive_plan,
    fit_accuracy_curve,
    fixed_cut_plan,
    load_accuracy_curve,
    load_codec_table,
    minmax_bandwidth,
    no_compression_plan,
    plan,
    random_problem,
    replan_bandwidth,
    shannon_rate,
    slsqp_bandwidth,
)
from sft_actors.plan.compression import codec_entry_from_bench, refit_codec_table
from sft_actors.plan.toml_out import dumps

SMALL_CODECS = ["identity", "int8-token", "transform-16x", "topk-0.1-b8"]


def problem(
    memory_mb: tuple[float, ...] = (1000.0, 1500.0),
    *,
    server_flops: float = 2e12,
    device_flops: float = 2e10,
    bandwidth_hz: float = 20e6,
    codecs: list[str] | None = None,
    max_loss: float = 0.1,
) -> PlanProblem:
    devices = tuple(
        DeviceProfile(name=f"d{i}", memory_mb=m, flops=device_flops, distance_m=40.0 + 60 * i)
        for i, m in enumerate(memory_mb)
    )
    return PlanProblem(
        model=ModelCosts.known("smollm2-135m"),
        training=TrainingShape(batch=4, seq=128, max_accuracy_loss=max_loss),
        devices=devices,
        server=ServerProfile(flops=server_flops),
        channel=ChannelConfig(bandwidth_hz=bandwidth_hz),
        menu=build_menu(names=codecs),
    )


# --- models ----------------------------------------------------------------------------------
def test_shannon_rate_matches_the_formula_and_saturates() -> None:
    cfg = ChannelConfig(
        noise_psd_dbm_hz=-174.0, path_loss_exponent=3.0, reference_loss_db=40.0, fading="none"
    )
    dev = DeviceProfile(name="d", memory_mb=1000, flops=1e10, distance_m=100.0, tx_power_dbm=20.0)
    state = draw_channel([dev], ServerProfile(flops=1e12), cfg)
    gain = 10 ** (-(40.0 + 30.0 * 2.0) / 10)  # 100 dB at 100 m
    p_w, n0 = 0.1, 10 ** ((-174.0 - 30.0) / 10)
    assert state.gains[0] == pytest.approx(gain)
    b = 1e6
    assert shannon_rate(b, state.snr_up_hz)[0] == pytest.approx(b * math.log2(1 + p_w * gain / (n0 * b)))
    rates = shannon_rate(np.array([1e5, 1e6, 1e7, 1e9, 1e14]), state.snr_up_hz[0])
    assert np.all(np.diff(rates) > 0)
    ceiling = state.snr_up_hz[0] / math.log(2)
    assert rates[-1] < ceiling and rates[-1] == pytest.approx(ceiling, rel=1e-4)  # the power-limited ceiling


def test_fading_is_seeded() -> None:
    pb = problem((1000.0, 1000.0, 1000.0))
    a = draw_channel(pb.devices, pb.server, pb.channel, seed=3)
    b = draw_channel(pb.devices, pb.server, pb.channel, seed=3)
    c = draw_channel(pb.devices, pb.server, pb.channel, seed=4)
    mean = draw_channel(pb.devices, pb.server, pb.channel, mean=True)
    assert np.array_equal(a.gains, b.gains) and not np.array_equal(a.gains, c.gains)
    assert np.allclose(mean.gains, pb.channel.path_gain([d.distance_m for d in pb.devices]))


def test_smollm2_costs_follow_the_architecture() -> None:
    m = ModelCosts.known("smollm2-135m")
    linear = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
    assert m.bytes_per_block == (linear + 2 * 576) * 4
    assert m.embed_bytes == 49152 * 576 * 4
    assert m.flops_per_block_per_token == 2 * linear
    assert m.lora_params_per_block == 8 * (1152 + 768 + 768 + 1152)
    vit = ModelCosts.known("vit-small")
    assert vit.default_seq == 197 and vit.sequence_fixed
    info = {f.name: getattr(m, f.name) for f in dataclasses.fields(m)} | {"extra": 1}
    assert ModelCosts.from_model_info(info) == m
    with pytest.raises(ModelSpecError, match="bytes_per_block"):
        ModelCosts.from_model_info({"num_blocks": 2, "hidden": 8})


def test_memory_cap_grows_with_memory_and_plans_respect_it() -> None:
    def cap(mb: float) -> int:
        pb = problem((mb,))
        return int(build_terms(pb, channel_for(pb, None, 0)).cut_cap[0])

    caps = [cap(mb) for mb in (400.0, 800.0, 1600.0, 3200.0)]
    assert caps == sorted(caps) and caps[-1] > caps[0]
    result = plan(problem((400.0, 3000.0)))
    for d in result.devices:
        assert d.memory_bytes <= d.memory_limit_bytes


# --- accuracy and codec data -----------------------------------------------------------------
def test_packaged_accuracy_curve_reproduces_the_measured_points() -> None:
    curve = load_accuracy_curve()
    # Least squares in log space through the measured points: within their scatter.
    assert curve.loss("topk", 17.6, "trained") == pytest.approx(0.1645, rel=0.6)
    assert curve.loss("topk", 25.0, "untrained") == pytest.approx(1.28, rel=1e-6)
    # Rate-controlled transform, trained: up 11 -> +0.6 %, 12 -> +1.5..2.3 %, 16 -> +8 %, 24 -> +17 %.
    assert 0.003 < curve.loss("transform", 11.0, "trained") < 0.025
    assert curve.loss("transform", 16.0, "trained") == pytest.approx(0.08, rel=0.5)
    assert curve.loss("transform", 24.0, "trained") == pytest.approx(0.168, rel=0.5)
    assert curve.loss("transform", 15.86, "untrained") == pytest.approx(0.0216, rel=0.3)
    assert curve.loss("identity", 1.0) == 0.0
    assert curve.loss("topk", 1.0) == 0.0


def test_fit_accuracy_curve_fits_power_laws_per_family() -> None:
    pts = [
        AccuracyPoint(family="topk", ratio=5.0, loss=0.04, basis="trained"),
        AccuracyPoint(family="topk", ratio=9.0, loss=0.16, basis="trained"),
        AccuracyPoint(family="transform", ratio=11.0, loss=0.1, basis="trained"),
    ]
    curve = fit_accuracy_curve(pts, default_exponent=1.5)
    fits = {f.family: f for f in curve.fits}
    assert fits["topk"].p == pytest.approx(2.0) and fits["topk"].a == pytest.approx(0.04 / 16)
    assert fits["transform"].p == 1.5 and curve.loss("transform", 11.0) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="refit"):
        curve.loss("topk", 4.0, "untrained")


def test_codec_table_uses_measurements_then_calibrated_estimates() -> None:
    table = load_codec_table()
    assert table.ratio(0.2, 6, "tensor") == 15.7
    est = table.ratio(0.3, 8, "tensor")
    assert 5.0 < est < 12.0
    record = {"ratio": 19.0, "keep": 0.2, "bits": 6, "scope": "tensor", "encode_mb_s": 500}
    refitted = refit_codec_table(table, [codec_entry_from_bench(record)])
    assert refitted.ratio(0.2, 6, "tensor") == 19.0
    assert len(refitted.entries) == len(table.entries)
    with pytest.raises(ConfigError, match="ratio"):
        codec_entry_from_bench({"keep": 0.1})


def test_menu_is_pareto_and_its_hull_convex() -> None:
    menu = build_menu()
    names = [o.name for o in menu.options]
    assert "identity" in names and "transform-16x" in names
    assert "topk-0.2-b6" not in names  # transform coding has a higher ratio and a lower loss
    assert np.all(np.diff(menu.ratios) > 0) and np.all(np.diff(menu.losses) > 0)
    s, loss = menu.hull()
    slopes = np.diff(loss) / np.diff(s)
    assert np.all(np.diff(slopes) >= -1e-12)


def test_codec_chains_in_the_data_parse() -> None:
    from sft_actors.codec.spec import ChainSpec, CodecPolicy

    for option in build_menu(pareto_only=False).options:
        ChainSpec.parse(dict(option.chain))
        CodecPolicy.parse(option.tables())


# --- fast timescale --------------------------------------------------------------------------
def _links(n: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.1, 2.0, n)
    u = rng.uniform(1e6, 5e7, n)
    v = u * rng.uniform(0.5, 1.5, n)
    pu = rng.uniform(1e6, 1e10, n)
    return a, u, v, pu, pu * 10


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_slsqp_beats_equal_split_and_keeps_the_constraints(seed: int) -> None:
    a, u, v, pu, pd = _links(8, seed)
    total, floor = 20e6, 2e5
    sqp = slsqp_bandwidth(a, u, v, pu, pd, total, floor)
    eq = equal_bandwidth(a, u, v, pu, pd, total)
    exact = minmax_bandwidth(a, u, v, pu, pd, total, floor)
    assert sqp.method == "slsqp"
    assert float(sqp.max_delay_s) <= float(eq.max_delay_s) * (1 + 1e-9)
    assert sqp.bandwidth_hz.sum() <= total * (1 + 1e-9) and np.all(sqp.bandwidth_hz >= floor * (1 - 1e-9))
    assert float(sqp.max_delay_s) == pytest.approx(float(exact.max_delay_s), rel=1e-6)
    assert exact.bandwidth_hz.sum() == pytest.approx(total) and np.all(exact.bandwidth_hz >= floor)


def test_newton_split_is_batched_and_equalises_delays() -> None:
    rows = [_links(5, s) for s in range(4)]
    batch = [np.stack([r[i] for r in rows]) for i in range(5)]
    together = minmax_bandwidth(*batch, 10e6, 1e5)
    for i, r in enumerate(rows):
        alone = minmax_bandwidth(*r, 10e6, 1e5)
        assert float(alone.max_delay_s) == pytest.approx(float(together.max_delay_s[i]), rel=1e-9)
        free = alone.bandwidth_hz > 1e5 * (1 + 1e-6)
        assert np.ptp(alone.delays_s[free]) <= 1e-6 * float(alone.max_delay_s)


def test_a_hint_only_speeds_the_split_up() -> None:
    a, u, v, pu, pd = _links(12, 9)
    near = minmax_bandwidth(a * 1.1, u * 0.9, v, pu, pd, 20e6, 1e5)
    cold = minmax_bandwidth(a, u, v, pu, pd, 20e6, 1e5)
    warm = minmax_bandwidth(a, u, v, pu, pd, 20e6, 1e5, hint=near)
    assert warm.method == "newton(joint)" and warm.iterations < cold.iterations + 3
    assert np.allclose(warm.bandwidth_hz, cold.bandwidth_hz, rtol=1e-7)


def test_more_bandwidth_means_less_delay() -> None:
    totals = [
        plan(problem(bandwidth_hz=b, codecs=SMALL_CODECS)).total_delay_s for b in (5e6, 10e6, 20e6, 40e6)
    ]
    assert all(later < earlier for earlier, later in itertools.pairwise(totals))
    a, u, v, pu, pd = _links(6, 5)
    oracle = [float(minmax_bandwidth(a, u, v, pu, pd, b, 1e5).max_delay_s) for b in (5e6, 10e6, 20e6)]
    assert oracle[0] > oracle[1] > oracle[2]


def test_more_memory_lets_the_cut_grow() -> None:
    # A slow server and fast devices: every block a device can hold is a block the server sheds.
    def cuts(mb: float) -> list[int]:
        return plan(problem((mb, mb), server_flops=2e11, device_flops=5e11, codecs=SMALL_CODECS)).cuts

    small, large = cuts(400.0), cuts(1200.0)
    assert all(b >= a for a, b in zip(small, large, strict=True)) and sum(large) > sum(small)


def test_replanning_bandwidth_keeps_the_slow_decisions() -> None:
    pb = problem((800.0, 1200.0, 2000.0), codecs=SMALL_CODECS)
    first = plan(pb, channel_seed=1)
    again = replan_bandwidth(pb, first, draw_channel(pb.devices, pb.server, pb.channel, seed=2))
    assert again.cuts == first.cuts and again.codecs == first.codecs
    assert [d.bandwidth_hz for d in again.devices] != [d.bandwidth_hz for d in first.devices]
    assert sum(d.bandwidth_hz for d in again.devices) <= pb.channel.bandwidth_hz * (1 + 1e-9)


def test_mean_channel_planning_keeps_cuts_across_fading_draws() -> None:
    pb = problem((800.0, 1200.0, 2000.0), codecs=SMALL_CODECS)
    plans = [plan(pb, channel_seed=seed, slow_channel="mean") for seed in (1, 2, 3)]
    assert all(p.cuts == plans[0].cuts and p.codecs == plans[0].codecs for p in plans)
    assert len({round(p.round_delay_s, 9) for p in plans}) == 3  # the split follows each draw


# --- slow timescale and baselines ----------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_plan_is_within_tolerance_of_exhaustive_search(seed: int) -> None:
    pb = random_problem(
        3 + seed % 2,
        seed,
        codecs=SMALL_CODECS,
        max_device_blocks=3,
        server_flops=[5e11, 2e12][seed % 2],
        device_flops=(1e10, 2e11),
        memory_mb=(300.0, 3000.0),
    )
    channel = channel_for(pb, None, seed)
    ours = plan(pb, channel=channel)
    best = exhaustive_plan(pb, channel)
    assert best.total_delay_s <= ours.total_delay_s * (1 + 1e-9)
    assert ours.total_delay_s <= best.total_delay_s * 1.02
    assert ours.accuracy_loss <= pb.training.max_accuracy_loss + 1e-12


def test_baselines_are_no_better_than_the_plan() -> None:
    pb = random_problem(5, 7, codecs=SMALL_CODECS, server_flops=1e12, device_flops=(1e10, 2e11))
    channel = channel_for(pb, None, 7)
    ours = plan(pb, channel=channel)
    fixed, raw = fixed_cut_plan(pb, channel), no_compression_plan(pb, channel)
    # Same cuts and codecs: the optimal split can only beat the equal one.
    assert ours.total_delay_s <= equal_bandwidth_plan(pb, ours, channel).total_delay_s * (1 + 1e-9)
    # The restricted problems are solved by the same heuristic: allow it 1 %.
    assert ours.total_delay_s <= fixed.total_delay_s * 1.01
    assert ours.total_delay_s <= raw.total_delay_s * 1.01
    assert set(raw.codecs) == {"identity"} and len(set(fixed.cuts)) == 1


def test_exhaustive_search_refuses_large_instances() -> None:
    with pytest.raises(ConfigError, match="max_plans"):
        exhaustive_plan(random_problem(8, 0), max_plans=1000)


def test_uniform_codec_plan_uses_one_codec() -> None:
    pb = random_problem(4, 3, codecs=SMALL_CODECS)
    uniform = plan(pb, uniform_codec=True)
    assert len(set(uniform.codecs)) == 1
    assert plan(pb).total_delay_s <= uniform.total_delay_s * (1 + 1e-6)


# --- infeasible input ------------------------------------------------------------------------------
def test_device_too_small_for_one_block_is_named() -> None:
    with pytest.raises(PlanInfeasible, match=r"device 'd1'.*memory_mb = 120"):
        plan(problem((1000.0, 120.0)))


def test_unreachable_accuracy_names_the_limit() -> None:
    with pytest.raises(PlanInfeasible, match=r"accuracy target unreachable.*max_accuracy_loss 0.1"):
        plan(problem(codecs=["topk-0.1-b8", "topk-0.05-b8"]))


def test_too_many_devices_for_the_band_names_the_limit() -> None:
    pb = dataclasses.replace(problem((1000.0,) * 4), channel=ChannelConfig(bandwidth_hz=1e6, b_min_hz=3e5))
    with pytest.raises(PlanInfeasible, match="b_min_hz"):
        plan(pb)


def test_fixed_cut_beyond_a_device_memory_is_refused() -> None:
    pb = problem((400.0, 3000.0))
    with pytest.raises(PlanInfeasible, match=r"device 'd0'.*fixed cut 20"):
        plan(pb, fixed_cut=20)


def test_menu_needs_an_option() -> None:
    with pytest.raises(ConfigError, match="empty"):
        CompressionMenu(options=())


# --- TOML writer ---------------------------------------------------------------------------------
def test_toml_writer_round_trips() -> None:
    data = {
        "run": {
            "name": "x",
            "seed": 0,
            "lr": 1e-3,
            "codec": {"up": {"quantize": {"bits": 8}}, "down": {}},
            "lora": {"targets": ["q", "k"], "mlp": False},
        },
        "actors": [
            {"name": "d0", "role": "device", "cut": 2, "profile": {"memory_mb": 512.0}},
            {"name": "s", "role": "server", "port": 1},
        ],
    }
    assert tomllib.loads(dumps(data, header="test")) == data


def test_refit_commands_write_the_data_files(tmp_path: Path) -> None:
    from sft_actors.plan import refit

    tmp = tmp_path
    bench_out = tmp / "bench.txt"
    bench_out.write_text("table…\n" + json.dumps({"ratio": 30.0, "encode_mb_s": 900}) + "\n")
    out = tmp / "codec.json"
    refit.main(
        ["codec", "--keep", "0.1", "--bits", "8", "--scope", "tensor", str(bench_out), "--out", str(out)]
    )
    assert load_codec_table(out).ratio(0.1, 8, "tensor") == 30.0
    acc_out = tmp / "acc.json"
    points = tmp / "points.json"
    points.write_text(
        json.dumps({"points": [{"family": "topk", "ratio": 3.0, "loss": 0.08, "basis": "trained"}]})
    )
    refit.main(["accuracy", str(points), "--out", str(acc_out)])
    assert load_accuracy_curve(acc_out).loss("topk", 3.0) == pytest.approx(0.08)


def test_planner_costs_follow_an_explicit_head_dim() -> None:
    """Qwen3-style blocks (head_dim ≠ dim / heads): the planner's bytes and LoRA sizes per block
    are the model layer's own counts (linear weights + two norms), not dim-square guesses."""
    from sft_actors.model import LlamaConfig, LoraConfig
    from sft_actors.model.memory import lora_param_count

    config = LlamaConfig(
        vocab_size=128, dim=64, num_blocks=2, num_heads=4, num_kv_heads=2, ffn_dim=96, explicit_head_dim=32
    )
    assert config.q_dim == 128 != config.dim
    costs = ModelCosts.from_config("qwen3-like", config, weight_bytes=4, lora_rank=8)
    linear = 2 * 64 * 128 + 2 * 64 * 64 + 3 * 64 * 96
    assert costs.bytes_per_block == (linear + 2 * 64) * 4
    assert costs.lora_params_per_block == lora_param_count(config, LoraConfig(rank=8))
    assert costs.attn_flops_per_block_per_token_per_pos == 2.0 * 128
