"""Rate control, round-to-nearest and per-column ANS contexts of common-step transform codes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from sft_actors.codec import BasisRegistry, ChainSpec, Codec, fit_basis
from sft_actors.codec.bitpack import encode_varints, zigzag
from sft_actors.errors import CodecError, ConfigError

pytest.importorskip("constriction")


def cut_like(shape: tuple[int, int, int] = (4, 48, 64), seed: int = 0) -> torch.Tensor:
    """Activations shaped like a transformer's cut: channels of very different scales, a mean,
    correlated channels and a massive first token (an attention sink)."""
    g = torch.Generator().manual_seed(seed)
    b, t, c = shape
    mix = torch.randn(c, c, generator=g) / c**0.5
    scales = torch.logspace(1, -1.5, c)
    laplace = torch.empty(b, t, c).exponential_(generator=g) - torch.empty(b, t, c).exponential_(generator=g)
    x = (laplace @ mix) * scales + torch.linspace(-2, 2, c)
    x[:, 0] *= 40.0
    return x.float()


def chain(
    ratio: float | None = None,
    *,
    step: float | None = None,
    rounding: str = "nearest",
    contexts: str = "column_scale",
    transform: str | None = "center",
) -> ChainSpec:
    table: dict[str, Any] = {
        "outliers": {"first_tokens": 1, "max_channels": 0},
        "quantize": {
            "scale": "common",
            "rounding": rounding,
            **({"ratio": ratio} if ratio else {"step": step}),
        },
        "lossless": {"entropy": "ans", "contexts": contexts},
    }
    if transform is not None:
        table["project"] = {"basis": "b", "transform": transform}
    return ChainSpec.parse(table)


def codec_for(spec: ChainSpec) -> tuple[Codec, BasisRegistry]:
    bases = BasisRegistry()
    if spec.project is not None:
        bases.register("b", fit_basis(spec, torch.cat([cut_like(seed=s) for s in (10, 11, 12)])))
    return Codec(spec, bases=bases), bases


@pytest.mark.parametrize("transform", ["center", "klt", None])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("contexts", ["column_scale", "single"])
@pytest.mark.parametrize("ratio", [6.0, 16.0, 32.0])
def test_rate_control_hits_the_byte_target(
    transform: str | None, rounding: str, contexts: str, ratio: float
) -> None:
    codec, bases = codec_for(chain(ratio, rounding=rounding, contexts=contexts, transform=transform))
    x = cut_like(seed=1)
    enc = codec.encode(x, seed=3)
    target = x.numel() * 4 / ratio
    assert abs(len(enc.payload) - target) <= 0.03 * target, (len(enc.payload), target)
    assert enc.meta["rate"]["target"] == int(target)
    y = Codec.decode(enc.meta, enc.payload, bases=bases)
    assert y.shape == x.shape and torch.equal(y[:, 0], y[:, 0])


def test_error_falls_as_the_ratio_falls_and_nearest_beats_stochastic() -> None:
    x = cut_like(seed=2)
    errors = {}
    for rounding in ("nearest", "stochastic"):
        for ratio in (32.0, 16.0, 8.0):
            codec, _ = codec_for(chain(ratio, rounding=rounding))
            errors[rounding, ratio] = codec.encode(x, seed=0, measure_error=True).report.rel_error
    for rounding in ("nearest", "stochastic"):
        assert errors[rounding, 32.0] > errors[rounding, 16.0] > errors[rounding, 8.0]
    for ratio in (32.0, 16.0, 8.0):
        assert errors["nearest", ratio] < errors["stochastic", ratio]


def test_column_contexts_cost_fewer_bytes_than_one_histogram_at_the_same_step() -> None:
    x = cut_like(seed=4)
    sizes = {}
    for contexts in ("column_scale", "single"):
        codec, bases = codec_for(chain(step=0.5, contexts=contexts))
        enc = codec.encode(x, seed=0)
        sizes[contexts] = len(enc.payload)
        # Same step, same rounding: the same values come back whatever the entropy model.
        sizes[contexts, "x"] = Codec.decode(enc.meta, enc.payload, bases=bases)
    assert sizes["column_scale"] < 0.95 * sizes["single"]
    assert torch.equal(sizes["column_scale", "x"], sizes["single", "x"])


def test_rate_control_is_reproducible_from_the_seed() -> None:
    codec, _ = codec_for(chain(12.0, rounding="stochastic"))
    x = cut_like(seed=5)
    assert codec.encode(x, seed=9).payload == codec.encode(x, seed=9).payload
    assert codec.encode(x, seed=9).payload != codec.encode(x, seed=10).payload


def test_stochastic_common_codes_are_unbiased() -> None:
    codec, bases = codec_for(chain(12.0, rounding="stochastic", transform=None))
    x = cut_like((2, 16, 32), seed=6)
    runs = torch.stack([Codec.decode(*_parts(codec.encode(x, seed=s)), bases=bases) for s in range(300)])
    err = runs.mean(0) - x
    # Each code's rounding error is in (-step, step) with variance <= step²/4: the mean of 300
    # independent draws is within 6 standard errors (step/2/√300 each) everywhere.
    step = max(codec.encode(x, seed=s).meta["quantize"]["step"] for s in range(3))
    assert float(err[:, 1:].abs().max()) < 6 * (step / 2) / 300**0.5
    assert float(runs.std(0)[:, 1:].mean()) > 0.05 * step  # it did add noise: not nearest


def _parts(enc: Any) -> tuple[dict[str, Any], bytes]:
    return enc.meta, enc.payload


def test_an_unreachable_target_gives_the_coarsest_frame_not_an_error() -> None:
    codec, bases = codec_for(chain(1000.0))
    x = cut_like((1, 8, 64), seed=7)
    enc = codec.encode(x, seed=0)
    assert enc.report.ratio < 1000.0  # the dense first token alone costs more than the target
    y = Codec.decode(enc.meta, enc.payload, bases=bases)
    assert torch.allclose(y[:, 0], x[:, 0], rtol=1e-2)


def test_spec_rules() -> None:
    with pytest.raises(ConfigError, match="exactly one of step"):
        ChainSpec.parse({"quantize": {"scale": "common"}})
    with pytest.raises(ConfigError, match="exactly one of step"):
        ChainSpec.parse({"quantize": {"scale": "common", "step": 0.5, "ratio": 8.0}})
    with pytest.raises(ConfigError, match="ratio must be in"):
        ChainSpec.parse({"quantize": {"scale": "common", "ratio": 0.5}})
    with pytest.raises(ConfigError, match="remove the sparsify stage"):
        ChainSpec.parse({"sparsify": {"keep": 0.5}, "quantize": {"scale": "common", "ratio": 8.0}})
    with pytest.raises(ConfigError, match="needs entropy = 'ans'"):
        ChainSpec.parse(
            {"quantize": {"scale": "common", "step": 0.5}, "lossless": {"contexts": "column_scale"}}
        )
    with pytest.raises(ConfigError, match="is not one of"):
        ChainSpec.parse({"quantize": {"scale": "common", "step": 0.5, "rounding": "floor"}})
    with pytest.raises(ConfigError, match="rank needs transform = 'klt'"):
        ChainSpec.parse({"project": {"basis": "b", "transform": "center", "rank": 8}})


def test_nearest_rounding_on_per_token_grids() -> None:
    x = cut_like(seed=8)
    spec = {"quantize": {"bits": 4, "scale": "token", "rounding": "nearest"}}
    a = Codec(ChainSpec.parse(spec)).encode(x, seed=0, measure_error=True)
    b = Codec(ChainSpec.parse(spec)).encode(x, seed=1, measure_error=True)
    assert a.payload == b.payload  # no randomness
    s = Codec(ChainSpec.parse({"quantize": {"bits": 4, "scale": "token"}})).encode(
        x, seed=0, measure_error=True
    )
    assert a.report.rel_error is not None and s.report.rel_error is not None
    assert a.report.rel_error < s.report.rel_error


def _tampered(enc: Any, section: str, data: bytes) -> tuple[dict[str, Any], bytes]:
    """The frame with one section's bytes replaced (the section table updated to match)."""
    offset, out, sections = 0, b"", []
    for name, size, encoding in enc.meta["sections"]:
        part = enc.payload[offset : offset + size]
        offset += size
        if name == section:
            part, encoding = data, "raw"
        out += part
        sections.append([name, len(part), encoding])
    return {**enc.meta, "sections": sections}, out


def test_corrupt_context_frames_are_codec_errors() -> None:
    codec, bases = codec_for(chain(12.0))
    x = cut_like(seed=9)
    enc = codec.encode(x, seed=0)
    k = x.shape[-1]
    bad_groups = np.full(k, 200, np.uint8).tobytes()
    with pytest.raises(CodecError, match="context"):
        Codec.decode(*_tampered(enc, "ctx_groups", bad_groups), bases=bases)
    n_table = enc.meta["quantize"]["contexts"]
    wrong_counts = encode_varints(zigzag(np.ones(n_table, np.int64))).tobytes()
    with pytest.raises(CodecError):
        Codec.decode(*_tampered(enc, "ctx_table", wrong_counts), bases=bases)
    codes = next(s for s in enc.meta["sections"] if s[0] == "codes")
    with pytest.raises(CodecError):
        Codec.decode(*_tampered(enc, "codes", b"\x01\x02\x03\x04" * (codes[1] // 8)), bases=bases)
    meta = {**enc.meta, "quantize": {**enc.meta["quantize"], "contexts": 10**9}}
    with pytest.raises(CodecError):
        Codec.decode(meta, enc.payload, bases=bases)
