"""Codec: exactness, unbiasedness, error bounds, edge shapes, hostile input, determinism, threads."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sft_actors.codec import Basis, BasisRegistry, ChainSpec, Codec, CodecPolicy, ans_available
from sft_actors.codec.format import DTYPES
from sft_actors.errors import CodecError, ConfigError

ROOT = Path(__file__).resolve().parents[1]

SPARSE8 = {"sparsify": {"keep": 0.1}, "quantize": {"bits": 8}, "lossless": {"zstd_level": 1}}
FULL = {
    "outliers": {},
    "sparsify": {"keep": 0.1},
    "quantize": {"bits": 4},
    "lossless": {"positions": "channel_bitmap", "zstd_level": 1},
}
BEST = {
    "outliers": {"bits": 8},
    "sparsify": {"keep": 0.19, "score": "row_normalized"},
    "quantize": {"bits": 4},
    "lossless": {"positions": "channel_bitmap", "zstd_level": 1},
}
CHAINS: list[dict[str, Any]] = [
    {},
    {"lossless": {}},
    SPARSE8,
    FULL,
    {"outliers": {}, "sparsify": {"keep": 0.2, "scope": "token"}, "quantize": {"bits": 6}},
    {"sparsify": {"keep": 0.3, "scope": "tokens"}, "quantize": {"bits": 8, "scale": "channel"}},
    {"outliers": {}, "sparsify": {"keep": 0.3, "scope": "channels"}, "quantize": {"bits": 2}},
    {
        "sparsify": {"keep": 0.1},
        "quantize": {"bits": 3, "scale": "channel"},
        "lossless": {"positions": "delta"},
    },
    {"quantize": {"scale": "common", "step": 0.1}, "lossless": {}},
    {"outliers": {}, "cast": {"dtype": "bfloat16"}},
    {"outliers": {}, "quantize": {"bits": 8, "scale": "channel"}},
    BEST,
    {"outliers": {"bits": 8}, "sparsify": {"keep": 0.1, "score": "row_normalized", "method": "exact"}},
]


def activations(shape: tuple[int, ...] = (4, 33, 64), seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape[-1], generator=gen) * 0.5)
    if len(shape) == 3:
        x[:, 0, 3] = 400.0  # attention-sink token with a massive channel
    return x


# --- spec ----------------------------------------------------------------------------------
@pytest.mark.parametrize("table", CHAINS)
def test_spec_round_trips_through_msgpack(table: dict[str, Any]) -> None:
    spec = ChainSpec.parse(table)
    again = ChainSpec.from_dict(msgpack.unpackb(msgpack.packb(spec.to_dict())))
    assert again == spec


@pytest.mark.parametrize(
    "table",
    [
        {"sparsify": {"kepp": 0.1}},
        {"sparsfy": {"keep": 0.1}},
        {"sparsify": {"keep": 1.5}},
        {"sparsify": {"keep": 0.1, "scope": "rows"}},
        {"quantize": {"bits": 9}},
        {"quantize": {"bits": "8"}},
        {"quantize": {"scale": "common"}},
        {"quantize": {"bits": 8}, "cast": {}},
        {"lossless": {"zstd_level": 40}},
        {"outliers": {"bits": 4}},
        {"sparsify": {"keep": 0.1, "score": "row_norm"}},
        {"sparsify": {"keep": 0.1, "scope": "token", "score": "row_normalized"}},
    ],
)
def test_bad_spec_is_config_error(table: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        ChainSpec.parse(table)


def test_policy_per_role() -> None:
    policy = CodecPolicy.parse({"up": SPARSE8})
    assert policy.up == ChainSpec.parse(SPARSE8) and policy.up.sparsify is not None
    assert policy.down.is_identity and not policy.is_identity
    assert CodecPolicy.parse(policy.to_dict()) == policy
    with pytest.raises(ConfigError, match="'up' and 'down'"):
        CodecPolicy.parse({"weights": SPARSE8})


# --- round trips ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_identity_is_bit_exact(dtype: torch.dtype) -> None:
    x = activations().to(dtype)
    for table in ({}, {"lossless": {"zstd_level": 3}}):
        enc = Codec(ChainSpec.parse(table)).encode(x, seed=0)
        y = Codec.decode(enc.meta, enc.payload)
        assert y.dtype == dtype and y.shape == x.shape
        assert torch.equal(
            y.view(torch.uint8) if dtype != torch.float64 else y,
            x.view(torch.uint8) if dtype != torch.float64 else x,
        )


@pytest.mark.parametrize("table", CHAINS)
def test_every_chain_round_trips(table: dict[str, Any]) -> None:
    x = activations()
    codec = Codec(ChainSpec.parse(table))
    enc = codec.encode(x, seed=3, measure_error=True)
    meta = msgpack.unpackb(msgpack.packb(enc.meta))  # what the wire layer will hand back
    y = Codec.decode(meta, enc.payload)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert enc.report.rel_error is not None and enc.report.rel_error < 1.0
    assert enc.report.encoded_bytes == len(enc.payload)
    assert 0 < enc.report.kept_fraction <= 1.0


def test_outlier_stage_keeps_first_token_and_massive_values() -> None:
    x = activations()
    x[1, 9, 7] = -5000.0  # a spike token
    enc = Codec(ChainSpec.parse(FULL)).encode(x, seed=0)
    y = Codec.decode(enc.meta, enc.payload)
    torch.testing.assert_close(y[:, 0], x[:, 0], rtol=1e-3, atol=1e-3)
    assert abs(float(y[1, 9, 7]) + 5000.0) < 5.0
    info = enc.meta["outliers"]
    assert info["elements"] + info["cols"] >= 1  # sent as a massive element or an outlier channel


# --- statistics ----------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("scale", ["token", "channel"])
def test_quantizer_is_unbiased(bits: int, scale: str) -> None:
    x = activations((6, 32), seed=1)
    codec = Codec(ChainSpec.parse({"quantize": {"bits": bits, "scale": scale}}))
    seeds = 400
    samples = torch.stack([Codec.decode(*_pair(codec.encode(x, seed=s))) for s in range(seeds)]).double()
    # One typical standard error per scale group (row or column): an element whose samples happen
    # to agree has zero empirical variance, which would turn float rounding into a huge z.
    dim = 1 if scale == "token" else 0
    stderr = samples.std(0).median(dim=dim, keepdim=True).values / seeds**0.5
    z = (samples.mean(0) - x.double()).abs() / stderr
    # Mean of |z| over elements ~ 0.8 for an unbiased estimator; a bias of a tenth of a step breaks it.
    assert float(z.mean()) < 1.2
    assert float(z.max()) < 6.0


def test_sparse_quantizer_is_unbiased_on_kept_values() -> None:
    x = activations((8, 64), seed=2)
    codec = Codec(ChainSpec.parse({"sparsify": {"keep": 0.25, "method": "exact"}, "quantize": {"bits": 2}}))
    samples = torch.stack([Codec.decode(*_pair(codec.encode(x, seed=s))) for s in range(400)]).double()
    kept = samples[0] != 0
    stderr = float(samples.std(0)[kept].median()) / 20
    z = (samples.mean(0)[kept] - x.double()[kept]).abs() / stderr
    assert float(z.mean()) < 1.2


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_error_bound_per_bit_width(bits: int) -> None:
    """Stochastic rounding has variance <= step^2/4 per element, step = row max / (2^(b-1) - 1)."""
    x = activations((64, 128), seed=4)
    enc = Codec(ChainSpec.parse({"quantize": {"bits": bits}})).encode(x, seed=0, measure_error=True)
    step = x.abs().amax(dim=1).double() / (2 ** (bits - 1) - 1)
    bound = float((x.shape[1] * step.square() / 4).sum().sqrt() / x.double().norm())
    assert enc.report.rel_error is not None and enc.report.rel_error < 1.1 * bound
    assert bound < {2: 3.0, 4: 0.4, 6: 0.1, 8: 0.025}[bits]


@pytest.mark.parametrize("scope", ["tensor", "token", "tokens", "channels"])
@pytest.mark.parametrize("keep", [0.05, 0.1, 0.3])
def test_kept_fraction_matches_keep(scope: str, keep: float) -> None:
    x = activations((16, 64, 96), seed=5)
    enc = Codec(ChainSpec.parse({"sparsify": {"keep": keep, "scope": scope}})).encode(x, seed=0)
    assert enc.report.kept_fraction == pytest.approx(keep, rel=0.1)


@pytest.mark.parametrize("method", ["sample", "exact"])
@pytest.mark.parametrize("keep", [0.05, 0.2])
def test_row_normalized_kept_fraction_and_share_per_row(method: str, keep: float) -> None:
    x = activations((16, 64, 96), seed=6)
    x[::2] *= 1000.0  # loud sequences would take the whole budget of a magnitude threshold
    table = {"sparsify": {"keep": keep, "score": "row_normalized", "method": method}}
    enc = Codec(ChainSpec.parse(table)).encode(x, seed=0)
    assert enc.report.kept_fraction == pytest.approx(keep, rel=0.1)
    quiet_kept = (Codec.decode(enc.meta, enc.payload)[1::2] != 0).float().mean()
    assert float(quiet_kept) == pytest.approx(keep, rel=0.2)
    magnitude = Codec(ChainSpec.parse({"sparsify": {"keep": keep}})).encode(x, seed=0)
    assert float((Codec.decode(magnitude.meta, magnitude.payload)[1::2] != 0).float().mean()) < keep / 10


def test_row_normalized_improves_token_cosine() -> None:
    x = activations((8, 64, 96), seed=7) * torch.exp(
        torch.randn(8, 64, 1, generator=torch.Generator().manual_seed(1))
    )

    def cosine(table: dict[str, Any]) -> float:
        enc = Codec(ChainSpec.parse(table)).encode(x, seed=0)
        y = Codec.decode(enc.meta, enc.payload)
        return float(torch.nn.functional.cosine_similarity(y, x, dim=-1).mean())

    plain = cosine({"sparsify": {"keep": 0.1}, "quantize": {"bits": 8}})
    assert cosine({"sparsify": {"keep": 0.1, "score": "row_normalized"}, "quantize": {"bits": 8}}) > plain


def test_sparse_row_normalized_quantizer_is_unbiased_on_kept_values() -> None:
    x = activations((8, 64), seed=2)
    table = {
        "sparsify": {"keep": 0.25, "score": "row_normalized", "method": "exact"},
        "quantize": {"bits": 2},
    }
    codec = Codec(ChainSpec.parse(table))
    samples = torch.stack([Codec.decode(*_pair(codec.encode(x, seed=s))) for s in range(400)]).double()
    kept = samples[0] != 0
    assert bool((kept == (samples != 0).all(0)).all())  # the selection does not depend on the seed
    stderr = float(samples.std(0)[kept].median()) / 20
    z = (samples.mean(0)[kept] - x.double()[kept]).abs() / stderr
    assert float(z.mean()) < 1.2


def outlier_tensor(seed: int = 0) -> torch.Tensor:
    x = activations((2, 16, 32), seed=seed)
    x[:, 0, 5] = 800.0  # attention sink: massive value on the first token
    x[..., 9] *= 30.0  # outlier feature channel
    x[1, 7, 9] = -6000.0  # spike inside the outlier channel
    return x


def test_outliers8_keeps_massive_values_and_is_unbiased() -> None:
    x = outlier_tensor()
    codec = Codec(ChainSpec.parse({"outliers": {"bits": 8}, "quantize": {"bits": 8}}))
    enc = codec.encode(x, seed=0)
    assert enc.meta["outliers"]["cols"] == 1 and enc.meta["outliers"]["rows"] == 2
    y = Codec.decode(enc.meta, enc.payload)
    assert abs(float(y[0, 0, 5]) - 800.0) < 1.0 and abs(float(y[1, 7, 9]) + 6000.0) < 5.0
    sixteen = Codec(ChainSpec.parse({"outliers": {}, "quantize": {"bits": 8}})).encode(x, seed=0)
    assert len(enc.payload) < len(sixteen.payload)
    samples = torch.stack([Codec.decode(*_pair(codec.encode(x, seed=s))) for s in range(400)]).double()
    dense = torch.zeros_like(x, dtype=torch.bool)
    dense[:, 0] = True
    dense[..., 9] = True
    spread = samples.std(0)
    rounded = dense & (spread > 0)  # the rest are massive values, sent as float16 every time
    fixed = dense & (spread == 0)
    assert int(fixed.sum()) <= 8
    torch.testing.assert_close(samples[0][fixed], x.double()[fixed], rtol=1e-3, atol=0)
    groups = [torch.zeros_like(dense) for _ in range(3)]  # one step per first-token row / channel
    groups[0][0, 0] = groups[1][1, 0] = True
    groups[2][:, 1:, 9] = True
    for group in (g & rounded for g in groups):
        stderr = float(spread[group].median()) / 20
        z = (samples.mean(0)[group] - x.double()[group]).abs() / stderr
        assert float(z.mean()) < 1.2


def test_dequantize_tables_match_the_formula() -> None:
    from sft_actors.codec import quantize

    rng = np.random.default_rng(0)
    for bits in (2, 3, 4, 8):
        codes = rng.integers(0, 1 << bits, size=50).astype(np.uint8)
        lo = rng.random(50).astype(np.float32)
        step = rng.random(50).astype(np.float32)
        k = (codes & quantize.levels(bits)).astype(np.float32)
        sign = np.where(codes >> (bits - 1), -1.0, 1.0).astype(np.float32)
        expected = sign * (lo + k * step)
        assert np.array_equal(quantize.dequantize_sign_magnitude(codes, lo, step, bits), expected)


# --- edge cases ----------------------------------------------------------------------------
@pytest.mark.parametrize("table", [{}, SPARSE8, FULL, CHAINS[5], CHAINS[8], BEST])
@pytest.mark.parametrize(
    "x",
    [
        torch.zeros(0),
        torch.zeros(3, 0, 8),
        torch.tensor(2.5),
        torch.zeros(5, 16),
        torch.arange(12.0),
        torch.randn(8, 24).t(),  # non-contiguous
    ],
    ids=["empty", "empty3d", "scalar", "zeros", "vector", "transposed"],
)
def test_edge_shapes(table: dict[str, Any], x: torch.Tensor) -> None:
    enc = Codec(ChainSpec.parse(table)).encode(x, seed=0)
    y = Codec.decode(enc.meta, enc.payload)
    assert y.shape == x.shape and y.dtype == x.dtype
    if not x.any():
        assert not y.any()


@pytest.mark.parametrize("table", [{}, SPARSE8, FULL, CHAINS[5], CHAINS[8], BEST])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_codec_error(table: dict[str, Any], bad: float) -> None:
    for where in ((0, 0, 0), (2, 5, 3), (3, 17, 40)):
        x = activations()
        x[where] = bad
        with pytest.raises(CodecError, match="NaN or inf"):
            Codec(ChainSpec.parse(table)).encode(x, seed=0)


def test_bad_inputs_are_codec_errors() -> None:
    codec = Codec(ChainSpec.parse(SPARSE8))
    with pytest.raises(CodecError):
        codec.encode(torch.ones(3, dtype=torch.int32), seed=0)
    with pytest.raises(CodecError):
        codec.encode(torch.ones(3), seed=-1)


# --- determinism and threads ---------------------------------------------------------------
def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    x = activations()
    codec = Codec(ChainSpec.parse(FULL))
    a, b, c = codec.encode(x, seed=7), codec.encode(x, seed=7), codec.encode(x, seed=8)
    assert a.payload == b.payload and a.meta == b.meta
    assert a.payload != c.payload


def test_encode_from_threads_matches_serial() -> None:
    x = activations((8, 64, 96))
    codec = Codec(ChainSpec.parse(FULL))
    serial = [codec.encode(x, seed=s).payload for s in range(8)]
    results: dict[int, bytes] = {}
    barrier = threading.Barrier(4)

    def work(worker: int) -> None:
        barrier.wait()
        for s in range(worker, 8, 4):
            results[s] = codec.encode(x, seed=s).payload

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[s] for s in range(8)] == serial


# --- hostile input -------------------------------------------------------------------------
def _pair(enc: Any) -> tuple[dict[str, Any], bytes]:
    return enc.meta, enc.payload


def test_truncated_or_padded_payload_is_codec_error() -> None:
    for table in (SPARSE8, FULL, {}, CHAINS[8]):
        enc = Codec(ChainSpec.parse(table)).encode(activations(), seed=0)
        for payload in (enc.payload[:-1], enc.payload + b"\0", b""):
            with pytest.raises(CodecError):
                Codec.decode(enc.meta, payload)


def test_huge_shape_is_refused_before_allocation() -> None:
    enc = Codec(ChainSpec.parse(SPARSE8)).encode(activations(), seed=0)
    meta = dict(enc.meta, shape=[1 << 20, 1 << 20, 768])
    with pytest.raises(CodecError, match="exceeds"):
        Codec.decode(meta, enc.payload)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_meta_and_payload_raise_only_codec_error(data: st.DataObject) -> None:
    table = data.draw(st.sampled_from([SPARSE8, FULL, CHAINS[4], CHAINS[5], CHAINS[7], CHAINS[8], BEST]))
    enc = Codec(ChainSpec.parse(table)).encode(activations((2, 9, 16)), seed=0)
    meta: dict[str, Any] = msgpack.unpackb(msgpack.packb(enc.meta))
    payload = bytearray(enc.payload)
    action = data.draw(st.sampled_from(["flip", "meta_int", "meta_key", "section"]))
    if action == "flip" and payload:
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(payload) - 1))
            payload[i] ^= data.draw(st.integers(1, 255))
    elif action == "meta_int":
        key = data.draw(
            st.sampled_from([k for k in ("sparsify", "outliers", "quantize") if k in meta] or ["shape"])
        )
        if isinstance(meta[key], dict):
            field = data.draw(st.sampled_from(sorted(meta[key])))
            meta[key][field] = data.draw(
                st.one_of(st.integers(-(2**40), 2**40), st.none(), st.text(max_size=3))
            )
        else:
            meta[key] = data.draw(st.lists(st.integers(-5, 2**33), max_size=4))
    elif action == "meta_key":
        meta.pop(data.draw(st.sampled_from(sorted(meta))))
    else:
        sections = meta["sections"]
        i = data.draw(st.integers(0, len(sections) - 1))
        sections[i][1] = data.draw(st.integers(0, 2 * len(payload) + 1))
    try:
        y = Codec.decode(meta, bytes(payload))
    except CodecError:
        return
    # A flip inside values may decode to other numbers, but never to another shape or dtype
    # than the (validated) meta promises.
    assert isinstance(y, torch.Tensor) and list(y.shape) == meta["shape"]
    assert y.dtype == DTYPES[meta["dtype"]]


# --- projection and entropy coding ---------------------------------------------------------
def test_projection_chain_with_registry() -> None:
    calib = activations((8, 33, 64), seed=9)
    registry = BasisRegistry()
    registry.register("cut4", Basis.fit(calib))
    spec = ChainSpec.parse(
        {
            "outliers": {},
            "project": {"basis": "cut4"},
            "quantize": {"scale": "common", "step": 0.05},
            "lossless": {},
        }
    )
    x = activations((4, 33, 64), seed=10)
    enc = Codec(spec, bases=registry).encode(x, seed=0, measure_error=True)
    assert enc.report.rel_error is not None and enc.report.rel_error < 0.05
    y = Codec.decode(enc.meta, enc.payload, bases=registry)
    assert y.shape == x.shape
    with pytest.raises(CodecError, match="bases"):
        Codec.decode(enc.meta, enc.payload)
    other = BasisRegistry()
    other.register("cut4", Basis.fit(activations((8, 33, 64), seed=11)))
    with pytest.raises(CodecError, match="digest"):
        Codec.decode(enc.meta, enc.payload, bases=other)
    wire_meta, wire_bytes = registry.get("cut4").to_wire()
    assert Basis.from_wire(wire_meta, wire_bytes).digest == registry.get("cut4").digest


def test_ans_entropy_coder_optional() -> None:
    table = {"sparsify": {"keep": 0.2}, "quantize": {"bits": 4}, "lossless": {"entropy": "ans"}}
    if not ans_available():
        with pytest.raises(ConfigError, match="constriction"):
            Codec(ChainSpec.parse(table))
        return
    x = activations()
    enc = Codec(ChainSpec.parse(table)).encode(x, seed=0)
    plain = Codec(ChainSpec.parse({**table, "lossless": {}})).encode(x, seed=0)
    torch.testing.assert_close(Codec.decode(enc.meta, enc.payload), Codec.decode(plain.meta, plain.payload))


# --- benchmark smoke -----------------------------------------------------------------------
def test_bench_smoke() -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "codec.py"),
            "--shape",
            "2,17,64",
            "--outliers",
            *("--keep", "0.18", "--bits", "4"),
            "--repeats",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    import json

    result = json.loads(out.stdout.strip().splitlines()[-1])
    raw_bytes = 2 * 17 * 64 * 4
    assert result["shape"] == [2, 17, 64]
    assert result["chain"].startswith("outliers8+topk0.18/tensor/row_normalized+q4")
    # The spec it reports is the chain it was asked for (defaults of the other options).
    asked = {
        "outliers": {"bits": 8},
        "sparsify": {"keep": 0.18, "scope": "tensor", "method": "sample", "score": "row_normalized"},
        "quantize": {"bits": 4, "scale": "token"},
        "lossless": {"positions": "channel_bitmap", "zstd_level": 1},
    }
    assert ChainSpec.from_dict(result["spec"]) == ChainSpec.parse(asked)
    assert result["ratio"] == raw_bytes / result["encoded_bytes"] and result["ratio"] > 2
    assert result["stage_bytes"]["input"] == raw_bytes
    assert result["stage_bytes"]["lossless"] == result["encoded_bytes"]
    # Quality of a seeded lossy chain: some error, most of it from the dropped elements.
    assert 0 < result["rel_error_kept"] < result["rel_error"] < 0.1
    assert 0.9 < result["token_cosine"] < 1.0
    lossless = result["baselines"]["raw_fp32"], result["baselines"]["zstd_only"]
    assert [(b["rel_error"], b["token_cosine"]) for b in lossless] == [(0.0, 1.0)] * 2
    assert result["baselines"]["raw_fp32"]["ratio"] == 1.0 and result["baselines"]["fp16"]["ratio"] == 2.0
    # Speeds are reported, not asserted: they depend on the machine.
    assert {"encode_mb_s", "decode_mb_s"} <= result.keys()


def test_projection_keeps_outlier_channels_and_massive_elements() -> None:
    """Regression: with outliers + project, the outlier channels were zeroed before projection
    but never sent (the exclusions were reset for the projected tensor), and the massive-element
    filter ran again on projected coefficients. A full-rank basis must reconstruct (≈ fp16)."""
    from sft_actors.codec import Basis, BasisRegistry

    gen = torch.Generator().manual_seed(0)
    scale = torch.linspace(0.1, 5, 64)
    calib = torch.randn(512, 64, generator=gen) * scale + 3.0
    calib[:, 5] *= 300
    x = torch.randn(4, 16, 64, generator=gen) * scale + 3.0
    x[..., 5] *= 300  # a massive channel
    x[1, 3, 7] = 5000.0  # a massive element
    registry = BasisRegistry()
    registry.register("pca", Basis.fit(calib))
    spec = ChainSpec.parse({"outliers": {"first_tokens": 1}, "project": {"basis": "pca"}})
    enc = Codec(spec, bases=registry).encode(x, seed=0)
    assert enc.meta["outliers"]["cols"] >= 1
    y = Codec.decode(enc.meta, enc.payload, bases=registry)
    rel_rows = (y - x).norm(dim=-1) / x.norm(dim=-1)
    assert float(rel_rows.max()) < 1e-3
