"""Refitting the transform-coding basis as the device's activations drift: the refit policy,
the basis on the wire, the bytes it costs and the device/server behaviour."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sft_actors.codec import Basis, BasisRegistry, CodecPolicy, RefitSpec
from sft_actors.errors import CodecError, ConfigError
from sft_actors.plan.assign import device_plans
from sft_actors.runtime import run_topology
from sft_actors.topology import load_topology, parse_topology
from sft_actors.train.device_session import DeviceSession
from sft_actors.train.meters import RoundMeter
from sft_actors.train.summary import RoundRecord, RunSummary, round_record
from sft_actors.wire import BasisUpload, DevicePlan, RoundDone, WireLimits, decode, encode
from sft_actors.wire.basis import basis_from_upload, basis_upload, upload_bytes
from sft_actors.wire.coded import pack_tensor, unpack_tensor
from sft_actors.wire.tensors import WireTensor
from tests.test_device_session import tiny_doc
from tests.test_sft_run import write_topology

PROJECT_UP = {
    "project": {"basis": "pca", "rank": 32},
    "quantize": {"bits": 8, "scale": "channel", "rounding": "nearest"},
}


_doc = tiny_doc


def _plan(refit: dict) -> DevicePlan:
    return device_plans(parse_topology(_doc({"up": PROJECT_UP, "refit": refit})))[0]


def _wire(msg: BasisUpload) -> BasisUpload:
    env = decode([bytes(f) for f in encode(msg, sender="dev0", msg_id=1)], WireLimits())
    assert isinstance(env.msg, BasisUpload)
    return env.msg


# --- the policy ------------------------------------------------------------------------------
def test_refit_spec_parses_validates_and_round_trips() -> None:
    assert RefitSpec.parse({}) == RefitSpec() == RefitSpec(threshold=1.25, check_every=4, window=8)
    spec = RefitSpec.parse({"threshold": 2, "check_every": 1, "window": 3})
    assert spec == RefitSpec(threshold=2.0, check_every=1, window=3) and spec.enabled
    assert not RefitSpec.parse({"threshold": 0}).enabled
    policy = CodecPolicy.parse({"up": PROJECT_UP, "refit": {"window": 2}})
    assert policy.refit.window == 2 and CodecPolicy.parse(policy.to_dict()) == policy
    with pytest.raises(ConfigError, match=r"codec\.refit\.treshold.*did you mean 'threshold'"):
        RefitSpec.parse({"treshold": 2.0})
    for bad, match in [
        ({"threshold": 1.0}, "threshold must be 0"),
        ({"threshold": -1}, "threshold must be 0"),
        ({"threshold": float("nan")}, "threshold must be 0"),
        ({"check_every": 0}, "check_every must be in"),
        ({"window": 0}, "window must be in"),
        ({"window": 2.5}, "window must be an integer"),
        ({"window": True}, "window must be a number"),
    ]:
        with pytest.raises(ConfigError, match=match):
            RefitSpec.parse(bad)


def test_topology_carries_the_refit_policy_to_the_device_and_refuses_a_bad_one() -> None:
    plan = _plan({"threshold": 1.5, "check_every": 2, "window": 4})
    assert plan.codec.refit == RefitSpec(threshold=1.5, check_every=2, window=4)
    frames = encode(plan, sender="c", msg_id=3)
    assert decode([bytes(f) for f in frames], WireLimits()).msg == plan  # the typed plan travels
    with pytest.raises(ConfigError, match=r"codec\.refit.*window"):
        parse_topology(_doc({"up": PROJECT_UP, "refit": {"window": 0}}))
    with pytest.raises(ConfigError, match=r"codec\.refit.*did you mean 'check_every'"):
        parse_topology(_doc({"up": PROJECT_UP, "refit": {"check_evry": 2}}))


# --- the basis on the wire -------------------------------------------------------------------
def _calibration(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 16, 12, generator=g) * torch.linspace(0.1, 3.0, 12) + 0.5


@pytest.mark.parametrize("kind", ["klt", "center"])
def test_basis_upload_round_trips_with_exactly_the_basis_bytes(kind: str) -> None:
    basis = Basis.fit(_calibration(), kind=kind)
    msg = _wire(basis_upload("dev0", "pca", basis))
    assert msg.kind == kind and (msg.vectors is None) == (kind == "center")
    assert msg.vectors is None or msg.vectors.desc.dtype == "float16"
    assert upload_bytes(msg) == basis.wire_bytes
    back = basis_from_upload(msg)
    assert back.digest == basis.digest and back.kind == kind
    np.testing.assert_array_equal(back.clip, basis.clip)


def test_a_corrupted_or_incomplete_basis_is_a_codec_error() -> None:
    basis = Basis.fit(_calibration())
    good = basis_upload("dev0", "pca", basis)
    with pytest.raises(CodecError, match="digest"):
        basis_from_upload(_wire(dataclasses.replace(good, digest="00" * 16)))
    scales = basis.scales.copy()
    scales[0] += 1.0
    tampered = dataclasses.replace(good, scales=WireTensor.from_torch(torch.from_numpy(scales)))
    with pytest.raises(CodecError, match="digest"):
        basis_from_upload(_wire(tampered))
    with pytest.raises(CodecError, match="without clip"):
        basis_from_upload(_wire(dataclasses.replace(good, clip=None)))
    as32 = WireTensor.from_torch(torch.from_numpy(basis.vectors if basis.vectors is not None else scales))
    with pytest.raises(CodecError, match="float16"):
        basis_from_upload(_wire(dataclasses.replace(good, vectors=as32)))
    with pytest.raises(CodecError, match="lacks vectors"):
        basis_from_upload(_wire(dataclasses.replace(good, vectors=None)))


# --- the device session: drift, refit, both bases decode -------------------------------------
def test_drifted_activations_trigger_a_refit_and_the_server_decodes_both_bases() -> None:
    s = DeviceSession(_plan({"threshold": 1.5, "check_every": 1, "window": 2}))
    first = s.fit_basis()
    assert first is not None and s.drift is not None and s.drift.baseline is None
    server = BasisRegistry()
    server.register("pca", basis_from_upload(_wire(basis_upload("dev0", "pca", first))))

    _, inputs, _ = s.next_batch()
    x = s.forward_eval(inputs)
    measure, window_bytes = s.drift.observe(x)
    assert measure and window_bytes is None  # window of 2 not full yet
    frame_a, report = pack_tensor(x, s.codec_up, seed=1, measure_error=True)
    assert report is not None and not s.drift.drifted(report.rel_error)  # the baseline
    assert s.drift.baseline == report.rel_error

    perm = torch.randperm(x.shape[-1], generator=torch.Generator().manual_seed(3))
    y = x[..., perm] * 2.0  # what the cut looks like after the adapters moved it
    reported = []
    for _ in range(2):
        measure, window_bytes = s.drift.observe(y)
        reported.append(window_bytes)
    assert reported == [2 * y.numel() * 4, None]  # logged once, when the window is full
    _, report = pack_tensor(y, s.codec_up, seed=2, measure_error=True)
    assert report is not None and report.rel_error is not None and measure
    assert s.drift.drifted(report.rel_error)

    second, after = s.drift.refit()
    assert second.digest != first.digest and after < report.rel_error / 2
    upload = _wire(basis_upload("dev0", "pca", second))  # the server registers it first ...
    server.register("pca", basis_from_upload(upload))
    s.bases.register("pca", second)  # ... then the device encodes with it
    s.drift.fitted()
    assert s.drift.baseline is None
    frame_b, report_b = pack_tensor(y, s.codec_up, seed=3, measure_error=True)
    assert report_b is not None and report_b.rel_error is not None
    assert report_b.rel_error < report.rel_error / 2

    assert frame_a.desc.codec is not None and frame_b.desc.codec is not None
    assert frame_a.desc.codec["project"]["digest"] == first.digest
    assert frame_b.desc.codec["project"]["digest"] == second.digest
    for frame, want in ((frame_a, x), (frame_b, y)):  # a frame coded before the refit still decodes
        on_server = unpack_tensor(frame, server, max_shape=want.shape)
        assert torch.equal(on_server, unpack_tensor(frame, s.bases, max_shape=want.shape))
    meter = RoundMeter()
    meter.basis_sent(upload_bytes(upload), refit=True)
    stats = meter.stats(round_s=1.0)
    assert (stats.basis_bytes, stats.basis_refits) == (second.wire_bytes, 1)


def test_threshold_zero_keeps_nothing_and_never_refits() -> None:
    s = DeviceSession(_plan({"threshold": 0}))
    assert s.fit_basis() is not None and s.drift is not None and not s.drift.enabled
    _, inputs, _ = s.next_batch()
    x = s.forward_eval(inputs)
    assert s.drift.observe(x) == (False, None)
    assert not s.drift.drifted(100.0)


# --- the summary -----------------------------------------------------------------------------
def _record(round_: int, basis_bytes: int, refits: int) -> RoundRecord:
    return RoundRecord(
        round=round_,
        loss=1.0,
        bytes_up=100,
        bytes_down=100,
        raw_up=1000,
        raw_down=600,
        seconds=1.0,
        step_ms_median=1.0,
        encode_ms=1.0,
        basis_bytes=basis_bytes,
        basis_refits=refits,
    )


def test_summary_ratios_count_the_basis_bytes() -> None:
    summary = RunSummary(name="t", mode="sft", model="llama-tiny", devices={"dev0": 2})
    summary.rounds = [_record(1, 600, 0), _record(2, 200, 1)]
    totals = summary.to_json()["totals"]
    assert (totals["basis_bytes"], totals["basis_refits"]) == (800, 1)
    assert totals["ratio_up"] == 2000 / 200 and totals["ratio_down"] == 1200 / 200
    assert totals["ratio_up_with_basis"] == 2000 / 1000
    assert totals["ratio_total"] == 3200 / 1200
    assert summary.rounds[0].ratio_total == 1600 / 800
    # an older summary without the basis fields still loads
    old = {k: v for k, v in summary.to_json().items()}
    old["rounds"] = [{k: v for k, v in r.items() if not k.startswith("basis")} for r in old["rounds"]]
    assert RunSummary.from_json(old).rounds[0].basis_bytes == 0


def test_round_record_sums_the_devices_basis_bytes() -> None:
    meter = RoundMeter()
    meter.basis_sent(300)
    meter.sent(raw=1000, coded=100)
    stats = meter.stats(round_s=0.5)
    done = [RoundDone(device=d, round=1, n_samples=2, loss=1.0, stats=stats) for d in ("a", "b")]
    record = round_record(1, done, seconds=1.0)
    assert (record.basis_bytes, record.basis_refits, record.bytes_up) == (600, 0, 200)


# --- end to end ------------------------------------------------------------------------------
REFIT_UP = """
[run.codec.up]
outliers = {{ first_tokens = 1 }}
project = {{ basis = "pca", rank = 8 }}
quantize = {{ bits = 8, scale = "channel", rounding = "nearest" }}
lossless = {{ zstd_level = 1 }}
[run.codec.refit]
threshold = {threshold}
check_every = 1
window = 2
"""


def _topology(tmp_path: Path, threshold: float, lr: float) -> Path:
    tmp_path.mkdir()
    codec = REFIT_UP.format(threshold=threshold)
    return write_topology(tmp_path, cuts=[2], rounds=2, steps=3, max_inflight=2, codec=codec, lr=lr)


async def _run(tmp_path: Path, threshold: float, lr: float) -> dict:
    path = _topology(tmp_path, threshold, lr)
    result = await run_topology(load_topology(path), transport="inproc", timeout_s=240)
    assert result.ok, result.failures
    (summary,) = (path.parent / "runs").glob("t-*/summary.json")
    return dict(json.loads(summary.read_text()))


@pytest.mark.asyncio
async def test_a_run_counts_the_first_basis_in_round_one_and_refits_as_it_trains(tmp_path: Path) -> None:
    still = await _run(tmp_path / "still", threshold=0, lr=5e-3)
    first = still["rounds"][0]["basis_bytes"]
    assert first > 0 and still["rounds"][1]["basis_bytes"] == 0 and still["totals"]["basis_refits"] == 0
    totals = still["totals"]
    raw = sum(r["raw_up"] + r["raw_down"] for r in still["rounds"])
    assert totals["ratio_total"] == pytest.approx(raw / (totals["bytes_up"] + totals["bytes_down"] + first))

    # A large learning rate moves the cut activations; a tight threshold refits.
    moving = await _run(tmp_path / "moving", threshold=1.01, lr=0.5)
    refits = moving["totals"]["basis_refits"]
    assert refits >= 1 and refits == sum(r["basis_refits"] for r in moving["rounds"])
    assert moving["totals"]["basis_bytes"] == first * (1 + refits)  # same shape: same bytes each time
    assert moving["totals"]["ratio_up_with_basis"] < moving["totals"]["ratio_up"]


@pytest.mark.asyncio
async def test_a_corrupted_upload_is_answered_with_a_codec_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server refuses the basis with a typed error the device receives; it keeps serving."""
    import sft_actors.actors.device as device_module

    def corrupted(device: str, key: str, basis: Basis) -> BasisUpload:
        return dataclasses.replace(basis_upload(device, key, basis), digest="00" * 16)

    monkeypatch.setattr(device_module, "basis_upload", corrupted)
    path = write_topology(tmp_path, cuts=[2], rounds=1, steps=1, codec=REFIT_UP.format(threshold=0))
    result = await run_topology(load_topology(path), transport="inproc", timeout_s=240)
    assert result.status == "failed"
    assert "CodecError from server" in result.reason and "digest does not match" in result.reason
    assert result.outcomes["server"].error is None  # refused the message, kept serving
