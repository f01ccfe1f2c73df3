"""Per-block LoRA averaging with heterogeneous cuts."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from sft_actors.errors import ConfigError, TopologyError
from sft_actors.topology import load_topology
from sft_actors.topology.report import Reporter
from sft_actors.topology.schema import TrainConfig
from sft_actors.topology.validate import validate_tables
from sft_actors.train.aggregate import Contribution, average_per_block, block_of, select_for_device
from sft_actors.train.device_trainer import DeviceTrainer
from sft_actors.train.lora_average import ProjectionErrors, average_lora
from sft_actors.train.summary import RunSummary
from tests.test_sft_run import _run, write_topology


def _lora(blocks: range, value: float) -> dict[str, torch.Tensor]:
    return {f"blocks.{i}.attn.q.lora_A": torch.full((2, 3), value) for i in blocks}


def test_block_of_parses_global_index() -> None:
    assert block_of("blocks.12.attn.q.lora_A") == 12
    assert block_of("embed.lora_A") is None


def test_each_block_is_averaged_over_the_devices_that_hold_it() -> None:
    # dev0 holds blocks 0-1 (cut 2), dev1 holds 0-3 (cut 4); dev1 trained 3x the samples.
    avg = average_per_block(
        [
            Contribution(device="dev0", n_samples=10, tensors=_lora(range(2), 1.0)),
            Contribution(device="dev1", n_samples=30, tensors=_lora(range(4), 5.0)),
        ]
    )
    assert sorted(avg) == sorted(_lora(range(4), 0.0))
    # blocks 0,1: (10*1 + 30*5) / 40 = 4.0; blocks 2,3: only dev1 holds them -> 5.0
    assert torch.allclose(avg["blocks.0.attn.q.lora_A"], torch.full((2, 3), 4.0))
    assert torch.allclose(avg["blocks.1.attn.q.lora_A"], torch.full((2, 3), 4.0))
    assert torch.allclose(avg["blocks.3.attn.q.lora_A"], torch.full((2, 3), 5.0))
    mine = select_for_device(avg, set(_lora(range(2), 0.0)))
    assert sorted(mine) == ["blocks.0.attn.q.lora_A", "blocks.1.attn.q.lora_A"]


def test_zero_sample_devices_do_not_count_and_dtype_is_kept() -> None:
    a = {"blocks.0.x": torch.ones(2, dtype=torch.bfloat16)}
    b = {"blocks.0.x": torch.full((2,), 9.0, dtype=torch.bfloat16)}
    avg = average_per_block(
        [Contribution(device="a", n_samples=4, tensors=a), Contribution(device="b", n_samples=0, tensors=b)]
    )
    assert avg["blocks.0.x"].dtype == torch.bfloat16
    assert torch.equal(avg["blocks.0.x"], a["blocks.0.x"])


def test_mismatched_shapes_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="same LoRA config"):
        average_per_block(
            [
                Contribution(device="a", n_samples=1, tensors={"blocks.0.x": torch.ones(2)}),
                Contribution(device="b", n_samples=1, tensors={"blocks.0.x": torch.ones(3)}),
            ]
        )


# --- lora_averaging: fedavg (the factors) or svd (the products, re-factorized) ----------------
def _pair(b: torch.Tensor, a: torch.Tensor, prefix: str = "blocks.0.q") -> dict[str, torch.Tensor]:
    return {f"{prefix}.lora_A": a, f"{prefix}.lora_B": b}


def _contribs(pairs: list[tuple[torch.Tensor, torch.Tensor]], samples: list[int]) -> list[Contribution]:
    return [
        Contribution(device=f"dev{i}", n_samples=n, tensors=_pair(b, a))
        for i, ((b, a), n) in enumerate(zip(pairs, samples, strict=True))
    ]


def _dense(pairs: list[tuple[torch.Tensor, torch.Tensor]], samples: list[int]) -> torch.Tensor:
    w = torch.tensor(samples, dtype=torch.float64) / sum(samples)
    return sum((wn * b.double() @ a.double() for wn, (b, a) in zip(w, pairs, strict=True)), torch.tensor(0.0))


def _fedavg_product(pairs: list[tuple[torch.Tensor, torch.Tensor]], samples: list[int]) -> torch.Tensor:
    w = torch.tensor(samples, dtype=torch.float64) / sum(samples)
    b = sum((wn * b.double() for wn, (b, _) in zip(w, pairs, strict=True)), torch.tensor(0.0))
    a = sum((wn * a.double() for wn, (_, a) in zip(w, pairs, strict=True)), torch.tensor(0.0))
    return b @ a


def _random_pairs(n: int, out: int = 24, inp: int = 20, r: int = 4, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(out, r, generator=g, dtype=torch.float64),
            torch.randn(r, inp, generator=g, dtype=torch.float64),
        )
        for _ in range(n)
    ]


def test_svd_equals_the_average_of_products_when_it_has_rank_at_most_r() -> None:
    # Every A_n = M_n A0 (M_n invertible): avg(B A) = (Σ w B_n M_n) A0 has rank r, but the
    # factors differ, so FedAvg's avg(B) avg(A) misses the cross terms.
    g = torch.Generator().manual_seed(1)
    a0 = torch.randn(4, 20, generator=g, dtype=torch.float64)
    pairs = [
        (
            torch.randn(24, 4, generator=g, dtype=torch.float64),
            (torch.eye(4) + torch.randn(4, 4, generator=g)).double() @ a0,
        )
        for _ in range(3)
    ]
    samples = [8, 16, 24]
    res = average_lora(_contribs(pairs, samples), "svd")
    got = res.tensors["blocks.0.q.lora_B"] @ res.tensors["blocks.0.q.lora_A"]
    want = _dense(pairs, samples)
    assert torch.allclose(got, want, rtol=0, atol=1e-10 * want.norm())
    e = res.errors["blocks.0.q"]
    assert e.svd < 1e-12 and e.devices == 3
    naive = float((_fedavg_product(pairs, samples) - want).norm() / want.norm())
    assert e.fedavg == pytest.approx(naive, rel=1e-9) and naive > 0.05
    assert set(res.refactorized) == {"blocks.0.q.lora_A", "blocks.0.q.lora_B"}
    assert res.stats.refactorized == res.stats.projections == 1
    # Balanced factors: B' = U √S, A' = √S Vᵀ, so column norms of B' equal row norms of A'.
    b_new, a_new = res.tensors["blocks.0.q.lora_B"], res.tensors["blocks.0.q.lora_A"]
    assert torch.allclose(b_new.norm(dim=0), a_new.norm(dim=1), rtol=1e-9)


def test_svd_is_the_best_rank_r_approximation_otherwise() -> None:
    pairs, samples = _random_pairs(4, seed=2), [10, 20, 30, 40]
    res = average_lora(_contribs(pairs, samples), "svd")
    want = _dense(pairs, samples)
    u, s, vh = torch.linalg.svd(want)
    best = u[:, :4] * s[:4] @ vh[:4]  # Eckart–Young: the truncated SVD
    got = res.tensors["blocks.0.q.lora_B"] @ res.tensors["blocks.0.q.lora_A"]
    assert torch.allclose(got, best, rtol=0, atol=1e-10 * best.norm())
    e = res.errors["blocks.0.q"]
    assert e.svd == pytest.approx(float(s[4:].norm() / s.norm()), rel=1e-9)
    assert e.svd == pytest.approx(float((want - got).norm() / want.norm()), rel=1e-9)
    assert e.fedavg == pytest.approx(
        float((_fedavg_product(pairs, samples) - want).norm() / want.norm()), rel=1e-9
    )
    assert e.norm == pytest.approx(float(want.norm()), rel=1e-12)
    assert e.svd < e.fedavg  # the best rank-r approximation beats any other rank-r pair
    st = res.stats
    assert (st.method, st.svd_error, st.fedavg_error_max) == (
        "svd",
        pytest.approx(e.svd),
        pytest.approx(e.fedavg),
    )


def test_fedavg_stays_exactly_the_per_block_average_and_still_reports_errors() -> None:
    contributions = _contribs(_random_pairs(3, seed=3), [1, 2, 3])
    res = average_lora(contributions, "fedavg")
    old = average_per_block(contributions)
    assert res.tensors.keys() == old.keys() and all(torch.equal(res.tensors[k], old[k]) for k in old)
    assert res.refactorized == () and res.stats.refactorized == 0 and res.stats.projections == 1
    assert res.stats.fedavg_error > res.stats.svd_error > 0


def test_fresh_adapters_keep_the_averaged_a_and_a_zero_b() -> None:
    g = torch.Generator().manual_seed(4)
    pairs = [(torch.zeros(24, 4), torch.randn(4, 20, generator=g)) for _ in range(3)]
    samples = [4, 4, 8]
    res = average_lora(_contribs(pairs, samples), "svd")
    old = average_per_block(_contribs(pairs, samples))
    assert torch.equal(res.tensors["blocks.0.q.lora_A"], old["blocks.0.q.lora_A"])  # A not zeroed
    assert res.tensors["blocks.0.q.lora_A"].abs().sum() > 0
    assert torch.equal(res.tensors["blocks.0.q.lora_B"], torch.zeros(24, 4))
    assert res.refactorized == ()
    assert res.errors["blocks.0.q"] == ProjectionErrors(svd=0.0, fedavg=0.0, norm=0.0, devices=3)


def test_a_zero_average_of_products_gives_b_zero_and_the_averaged_a() -> None:
    # B1 A1 + B2 A2 = 0 although avg(B) avg(A) ≠ 0 (rank-1 example: 1·1 + 2·(−½) = 0).
    a = torch.ones(1, 3, dtype=torch.float64)
    b = torch.ones(2, 1, dtype=torch.float64)
    pairs = [(b, a), (2 * b, -0.5 * a)]
    res = average_lora(_contribs(pairs, [1, 1]), "svd")
    assert torch.equal(res.tensors["blocks.0.q.lora_B"], torch.zeros(2, 1, dtype=torch.float64))
    assert torch.allclose(res.tensors["blocks.0.q.lora_A"], 0.25 * a)
    e = res.errors["blocks.0.q"]
    assert e.norm == 0 and e.svd == 0 and math.isinf(e.fedavg)


def test_components_without_a_singular_value_keep_a_live_a_row() -> None:
    # The average has rank 1 < r = 2: the second component gets B' = 0 and Ā's row (not 0·0).
    g = torch.Generator().manual_seed(5)
    u, v = (
        torch.randn(6, 1, generator=g, dtype=torch.float64),
        torch.randn(1, 5, generator=g, dtype=torch.float64),
    )
    pairs = [
        (torch.cat([u, torch.zeros_like(u)], 1), torch.cat([v, torch.randn(1, 5, generator=g).double()], 0)),
        (
            torch.cat([2 * u, torch.zeros_like(u)], 1),
            torch.cat([3 * v, torch.randn(1, 5, generator=g).double()], 0),
        ),
    ]
    res = average_lora(_contribs(pairs, [1, 1]), "svd")
    b_new, a_new = res.tensors["blocks.0.q.lora_B"], res.tensors["blocks.0.q.lora_A"]
    assert torch.allclose(b_new @ a_new, _dense(pairs, [1, 1]), atol=1e-12)
    assert torch.equal(b_new[:, 1], torch.zeros(6, dtype=torch.float64))
    assert torch.allclose(a_new[1], (pairs[0][1][1] + pairs[1][1][1]) / 2)


def test_heterogeneous_cuts_average_each_block_over_its_holders() -> None:
    # dev0 cut 1, dev1 cut 2, dev2 cut 3 (trained nothing: weight 0): block 1 is dev1's alone.
    g = torch.Generator().manual_seed(6)

    def lora(blocks: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i in range(blocks):
            out |= _pair(torch.randn(8, 2, generator=g), torch.randn(2, 6, generator=g), f"blocks.{i}.q")
        return out

    t0, t1, t2 = lora(1), lora(2), lora(3)
    res = average_lora(
        [
            Contribution(device="dev0", n_samples=8, tensors=t0),
            Contribution(device="dev1", n_samples=24, tensors=t1),
            Contribution(device="dev2", n_samples=0, tensors=t2),
        ],
        "svd",
    )
    assert sorted(res.errors) == ["blocks.0.q"]  # block 1 has one holder; block 2 none
    assert torch.equal(res.tensors["blocks.1.q.lora_A"], t1["blocks.1.q.lora_A"])  # exact, unchanged
    assert torch.equal(res.tensors["blocks.1.q.lora_B"], t1["blocks.1.q.lora_B"])
    assert "blocks.2.q.lora_A" not in res.tensors
    assert set(res.refactorized) == {"blocks.0.q.lora_A", "blocks.0.q.lora_B"}
    pairs = [(t["blocks.0.q.lora_B"], t["blocks.0.q.lora_A"]) for t in (t0, t1)]
    want = _dense(pairs, [8, 24])
    u, s, vh = torch.linalg.svd(want)
    got = (res.tensors["blocks.0.q.lora_B"] @ res.tensors["blocks.0.q.lora_A"]).double()
    assert torch.allclose(got, u[:, :2] * s[:2] @ vh[:2], atol=1e-5 * float(want.norm()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_svd_keeps_the_adapters_dtype(dtype: torch.dtype) -> None:
    pairs = [(b.to(dtype), a.to(dtype)) for b, a in _random_pairs(2, seed=7)]
    res = average_lora(_contribs(pairs, [1, 3]), "svd")
    assert {t.dtype for t in res.tensors.values()} == {dtype} and res.refactorized


def test_bad_method_and_half_pairs_are_config_errors() -> None:
    contributions = _contribs(_random_pairs(2), [1, 1])
    with pytest.raises(ConfigError, match="'fedavg', 'svd'"):
        average_lora(contributions, "product")
    half = [Contribution(device="dev9", n_samples=1, tensors={"blocks.0.q.lora_A": torch.ones(4, 20)})]
    with pytest.raises(ConfigError, match="without its lora_B"):
        average_lora(half, "svd")


def test_lora_averaging_is_checked_when_the_topology_loads(tmp_path: Path) -> None:
    path = write_topology(tmp_path, cuts=[1])
    path.write_text(
        path.read_text().replace("aggregate_every = 1", 'aggregate_every = 1\nlora_averaging = "svdd"')
    )
    with pytest.raises(
        TopologyError, match=r"\[run\.train\], key 'lora_averaging'.*'fedavg', 'svd'.*did you mean 'svd'"
    ):
        load_topology(path)
    path.write_text(path.read_text().replace('"svdd"', '"svd"'))
    topo = load_topology(path)
    assert topo.run.train.lora_averaging == "svd" and TrainConfig().lora_averaging == "fedavg"
    bad = dataclasses.replace(topo.run, train=dataclasses.replace(topo.run.train, lora_averaging="x"))  # type: ignore[arg-type]
    with pytest.raises(TopologyError, match="lora_averaging"):
        validate_tables(Reporter("<test>"), dataclasses.replace(topo, run=bad))


def test_reset_moments_gives_a_fresh_adamw() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    q = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p, q], lr=0.1)
    for _ in range(3):
        p.grad, q.grad = torch.full((3,), 2.0), torch.full((3,), 2.0)
        opt.step()
    trainer = DeviceTrainer.__new__(DeviceTrainer)
    trainer.optimizer = opt
    assert trainer.reset_moments([p]) == 1
    assert all(float(v.abs().sum()) == 0 for v in opt.state[p].values())
    assert float(opt.state[q]["exp_avg"].abs().sum()) > 0  # others keep theirs
    fresh_p = torch.nn.Parameter(p.detach().clone())
    fresh = torch.optim.AdamW([fresh_p], lr=0.1)
    p.grad = fresh_p.grad = torch.full((3,), 0.5)
    opt.step()
    fresh.step()
    assert torch.equal(p, fresh_p)


@pytest.mark.asyncio
async def test_a_run_with_svd_averaging_trains_and_reports_its_errors(tmp_path: Path) -> None:
    path = write_topology(tmp_path, cuts=[1, 2, 2], rounds=2, steps=2, codec="")
    path.write_text(
        path.read_text().replace("aggregate_every = 1", 'aggregate_every = 1\nlora_averaging = "svd"')
    )
    s = await _run(path)
    assert all(math.isfinite(r["loss"]) for r in s["rounds"])
    for r in s["rounds"]:
        avg = r["averaging"]
        assert avg["method"] == "svd" and avg["projections"] == 8  # blocks 0-1 (q, k, v, o): 2+ holders
        assert avg["refactorized"] == avg["projections"]  # trained adapters: FedAvg is not exact
        assert 0 <= avg["svd_error"] <= avg["svd_error_max"] < 1 and avg["fedavg_error"] > 0
        assert avg["ms"] > 0
    json.dumps(s, allow_nan=False)  # strict JSON
    assert RunSummary.from_json(s).rounds[0].averaging == s["rounds"][0]["averaging"]
