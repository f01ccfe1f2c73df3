"""Fixed-rate component quantization (``quantize.scale = "component"``): size, allocation, error."""

from __future__ import annotations

import functools
import itertools
import math
import re
from typing import Any

import numpy as np
import pytest
import torch

from sft_actors.codec import Basis, BasisRegistry, ChainSpec, Codec, allocate
from sft_actors.codec.project import project, unproject
from sft_actors.errors import CodecError, ConfigError

C = 32


def _mixing(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    spectrum = torch.exp(-torch.arange(C, dtype=torch.float32) / 6)
    q, _ = torch.linalg.qr(torch.randn(C, C, generator=gen))
    mix: torch.Tensor = (q * spectrum).T.contiguous()  # (latent, channel)
    mix[:, :3] *= 10.0  # a few heavy channels
    return mix


def sample(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Correlated activations (..., C) with a decaying spectrum and three heavy channels."""
    gen = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(*shape[:-1], C, generator=gen)
    out: torch.Tensor = z @ _mixing() + 0.5
    return out


@functools.cache
def fitted(kind: str, seed: int = 7) -> Basis:
    return Basis.fit(sample((4000, C), seed=seed), kind=kind)


def setup(kind: str, table: dict[str, Any]) -> tuple[Codec, BasisRegistry]:
    registry = BasisRegistry()
    registry.register("cut", fitted(kind))
    spec = ChainSpec.parse({"project": {"basis": "cut", "transform": kind}, **table})
    return Codec(spec, bases=registry), registry


def chain(ratio: float, rounding: str = "nearest", outliers: bool = False) -> dict[str, Any]:
    table: dict[str, Any] = {"quantize": {"scale": "component", "ratio": ratio, "rounding": rounding}}
    if outliers:
        table["outliers"] = {"first_tokens": 1}
    return table


def mse(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).square().mean())


@pytest.mark.parametrize("kind", ["klt", "center"])
@pytest.mark.parametrize("shape,outliers", [((4, 33, C), True), ((96, C), False)])
def test_round_trip_shape_and_outlier_rows(kind: str, shape: tuple[int, ...], outliers: bool) -> None:
    x = sample(shape, seed=1)
    if outliers:
        x[:, 0, 5] = 300.0  # attention-sink token
    codec, registry = setup(kind, chain(8.0, outliers=outliers))
    enc = codec.encode(x, seed=3)
    out = Codec.decode(enc.meta, enc.payload, bases=registry)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert enc.report.stage_bytes["quantize"] == len(enc.payload)
    if outliers:  # first tokens come back from the outlier stage (float16)
        torch.testing.assert_close(out[:, 0], x[:, 0], rtol=1e-3, atol=1e-3)
    assert mse(out, x) < 0.05 * float(x.double().var())


@pytest.mark.parametrize("kind", ["klt", "center"])
@pytest.mark.parametrize("ratio", [3.0, 6.0, 10.0, 14.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_size_is_the_computed_fixed_size(kind: str, ratio: float, dtype: torch.dtype) -> None:
    x = sample((4, 33, C), seed=2).to(dtype)
    codec, _ = setup(kind, chain(ratio, outliers=True))
    enc = codec.encode(x, seed=0)
    raw = x.numel() * x.element_size()
    live = 4 * 32
    overhead = sum(size for name, size, _ in enc.meta["sections"] if name != "codes")
    row_bits = allocate.row_bits_for(raw_bytes=raw, ratio=ratio, overhead=overhead, live_rows=live, rank=C)
    assert enc.meta["quantize"] == {"row_bits": row_bits, "rows": live}
    assert len(enc.payload) == overhead + allocate.code_nbytes(live, row_bits)
    assert len(enc.payload) <= math.floor(raw / ratio)
    if row_bits < 8 * C:  # the budget is used up to less than one bit per row
        assert math.floor(raw / ratio) - len(enc.payload) <= live // 8 + 1


@pytest.mark.parametrize("kind", ["klt", "center"])
def test_error_falls_as_ratio_falls(kind: str) -> None:
    x = sample((8, 33, C), seed=3)
    errors = []
    for ratio in (28.0, 16.0, 10.0, 8.0, 6.0, 5.0, 4.0, 3.0):
        codec, registry = setup(kind, chain(ratio, outliers=True))
        enc = codec.encode(x, seed=1)
        errors.append(mse(Codec.decode(enc.meta, enc.payload, bases=registry), x))
    assert all(a > b for a, b in itertools.pairwise(errors)), errors


def _greedy_reference(scales: np.ndarray, budget: int) -> np.ndarray:
    """The allocation rule written as the literal loop (one bit per step)."""
    bits = np.zeros(scales.size, dtype=np.int64)
    var = scales.astype(np.float64) ** 2
    for _ in range(min(budget, 8 * scales.size)):
        d = np.where(bits < 8, var * 4.0 ** (-bits), -1.0)
        bits[int(np.argmax(d))] += 1  # argmax: first (lowest) index among ties
    return bits


def test_allocation_follows_variance_and_spends_the_budget() -> None:
    rng = np.random.default_rng(0)
    scales = np.sort(rng.lognormal(size=24)).astype(np.float32)[::-1].copy()
    scales[5] = scales[6]  # a tie
    scales[-1] = 0.0
    for budget in (0, 1, 7, 40, 96, 150, 191, 192, 500):
        bits = allocate.allocate_bits(scales, budget)
        assert int(bits.sum()) == min(budget, 8 * scales.size)
        assert bool((np.diff(bits) <= 0).all()), bits  # larger variance, at least as many bits
        assert bits.max() <= 8
        np.testing.assert_array_equal(bits, _greedy_reference(scales, budget))
    shuffled = rng.permutation(scales.size)
    np.testing.assert_array_equal(
        allocate.allocate_bits(scales[shuffled], 96), _greedy_reference(scales[shuffled], 96)
    )


def test_loading_table_is_the_gaussian_optimum() -> None:
    x = np.linspace(-9, 9, 180001)
    w = np.exp(-0.5 * x * x)
    w /= w.sum()

    def err(a: float, levels: int, rounding: str) -> float:
        step = 2 * a / (levels - 1)
        t = (np.clip(x, -a, a) + a) / step
        if rounding == "nearest":
            return float((np.square(x - (np.rint(t) * step - a)) * w).sum())
        frac = t - np.floor(t)
        return float(((frac * (1 - frac) * step * step + np.square(x - np.clip(x, -a, a))) * w).sum())

    for rounding, table in allocate.LOADING.items():
        for b, g in enumerate(table, start=1):
            best = err(g, 1 << b, rounding)
            assert best <= err(g * 1.01, 1 << b, rounding) and best <= err(g * 0.99, 1 << b, rounding)


def test_nearest_beats_stochastic_at_the_same_ratio() -> None:
    x = sample((8, 33, C), seed=4)
    errors = {}
    for rounding in ("nearest", "stochastic"):
        codec, registry = setup("klt", chain(8.0, rounding, outliers=True))
        enc = codec.encode(x, seed=2)
        errors[rounding] = mse(Codec.decode(enc.meta, enc.payload, bases=registry), x)
    assert errors["nearest"] < errors["stochastic"]


@pytest.mark.parametrize("kind,ratio", [("klt", 5.0), ("center", 10.0)])
def test_stochastic_is_unbiased_inside_the_clip_range(kind: str, ratio: float) -> None:
    codec, registry = setup(kind, chain(ratio, "stochastic"))
    basis = registry.get("cut")
    n, repeats = 24, 400
    rng = np.random.default_rng(5)
    # Every row of the frame draws its own rounding noise: ``repeats`` copies of n rows in one
    # frame are ``repeats`` independent encodes of them (one encode instead of 400: fast).
    row_bits = allocate.row_bits_for(
        raw_bytes=4 * n * repeats * C, ratio=ratio, overhead=0, live_rows=n * repeats, rank=C
    )
    bits = allocate.allocate_bits(basis.scales, row_bits)
    assert bits.min() >= 1  # every component coded (a dropped one decodes as the mean: biased)
    ranges = allocate.clip_ranges(basis.scales, basis.clip, bits, "stochastic")
    coeffs = (rng.uniform(-0.9, 0.9, size=(n, C)) * ranges).astype(np.float32)
    x = torch.from_numpy(unproject(coeffs, basis, C))
    target = unproject(project(x.numpy(), basis, C), basis, C).astype(np.float64)  # what infinite bits give
    enc = codec.encode(x.repeat(repeats, 1), seed=11)
    assert enc.meta["quantize"]["row_bits"] == row_bits
    outs = (
        Codec.decode(enc.meta, enc.payload, bases=registry).numpy().reshape(repeats, n, C).astype(np.float64)
    )
    seeds = repeats
    # Rounding noise of coefficient j: frac·(1 − frac)·step² (independent across j and seeds),
    # carried to the output by the basis: var(out_i) = sum_j V_ij² var_j.
    c = project(x.numpy(), basis, C).astype(np.float64)
    step = 2 * ranges.astype(np.float64) / ((1 << bits) - 1)
    t = (c + ranges) / step
    frac = t - np.floor(t)
    var_c = frac * (1 - frac) * step**2
    var = var_c if basis.vectors is None else var_c @ np.square(basis.vectors.astype(np.float64)).T
    # The seed mean is ~N(target, var/seeds) per element: 5.5 sigma over 768 elements fails
    # with probability ~3e-5 if unbiased, and any bias above ~0.3 sigma/sqrt(seeds) shows.
    z = np.abs(outs.mean(axis=0) - target) / (np.sqrt(var / seeds) + 1e-5)
    assert float(z.max()) < 5.5, float(z.max())
    assert float(np.sqrt(var.mean() / seeds)) < 0.01 * float(np.abs(target).mean())  # tight test


def test_wrong_or_missing_basis_and_truncated_payload() -> None:
    x = sample((4, 33, C), seed=5)
    codec, registry = setup("klt", chain(8.0, outliers=True))
    enc = codec.encode(x, seed=0)
    with pytest.raises(CodecError):
        Codec.decode(enc.meta, enc.payload, bases=None)
    other = BasisRegistry()
    other.register("cut", fitted("klt", seed=99))
    with pytest.raises(CodecError, match="digest"):
        Codec.decode(enc.meta, enc.payload, bases=other)
    with pytest.raises(CodecError):
        Codec.decode(enc.meta, enc.payload[:-1], bases=registry)
    meta = dict(enc.meta, sections=[list(s) for s in enc.meta["sections"]])
    meta["sections"][-1][1] -= 1  # a shorter codes section with a consistent table
    with pytest.raises(CodecError, match="codes"):
        Codec.decode(meta, enc.payload[:-1], bases=registry)
    meta = dict(enc.meta, quantize={"row_bits": enc.meta["quantize"]["row_bits"] + 1, "rows": 128})
    with pytest.raises(CodecError, match="quantize"):
        Codec.decode(meta, enc.payload, bases=registry)


def test_unreachable_ratio_names_the_highest_achievable_one() -> None:
    x = sample((16, 2, C), seed=6)  # half the rows are first tokens sent densely
    codec, _ = setup("center", chain(100.0, outliers=True))
    with pytest.raises(CodecError, match="highest achievable ratio") as info:
        codec.encode(x, seed=0)
    found = re.search(r"highest achievable ratio is ([0-9.]+)", str(info.value))
    assert found is not None
    best = float(found.group(1))
    ok, registry = setup("center", chain(best * 0.999, outliers=True))
    enc = ok.encode(x, seed=0)
    assert enc.meta["quantize"]["row_bits"] == 1
    Codec.decode(enc.meta, enc.payload, bases=registry)


def test_component_scale_refuses_sparsify() -> None:
    with pytest.raises(ConfigError, match="sparsify"):
        ChainSpec.parse(
            {
                "project": {"basis": "b"},
                "sparsify": {"keep": 0.5},
                "quantize": {"scale": "component", "ratio": 8.0},
            }
        )


def test_klt_outlier_channels_do_not_break_the_calibrated_ranges() -> None:
    """Zeroing the outlier channels before the KLT breaks the cancellations that make the small
    components small: they clip and the error spreads over every channel (17x the MSE here)."""
    x = sample((8, 33, C), seed=8)
    errors = {}
    for outliers in (False, True):
        codec, registry = setup("klt", chain(6.0, outliers=outliers))
        enc = codec.encode(x, seed=0)
        if outliers:
            assert enc.meta["outliers"]["cols"] > 0  # the heavy channels go densely
        out = Codec.decode(enc.meta, enc.payload, bases=registry)
        errors[outliers] = mse(out[:, 1:], x[:, 1:])
    assert errors[True] < 2 * errors[False], errors
