"""A device's reports and tensors are checked against its plan before anyone believes them."""

from __future__ import annotations

import pytest
import torch

from sft_actors.codec import ChainSpec, Codec
from sft_actors.errors import MalformedFrame, ProtocolViolation
from sft_actors.topology.schema import TrainConfig
from sft_actors.train.claims import check_adapters_up, check_eval, check_round_done
from sft_actors.wire.coded import pack_tensor, unpack_tensor
from sft_actors.wire.messages import AdaptersUp, RoundDone
from sft_actors.wire.plans import EvalStats, RoundStats
from sft_actors.wire.tensors import WireTensor

TRAIN = TrainConfig(steps_per_round=4, batch_size=8, aggregate_every=2, eval_batches=3, seq_len=16)
STATS = RoundStats(
    bytes_up=1, bytes_down=1, raw_up=1, raw_down=1, encode_ms=0.0, round_s=0.1, step_ms_median=1.0, targets=1
)


def done(**change: object) -> RoundDone:
    fields: dict[str, object] = {"device": "dev0", "round": 3, "n_samples": 32, "loss": 2.5, "stats": STATS}
    return RoundDone(**{**fields, **change})  # type: ignore[arg-type]


def test_an_honest_round_passes_and_inflated_claims_are_refused() -> None:
    check_round_done(done(), device="dev0", round_=3, train=TRAIN)
    for change, match in [
        ({"n_samples": 10**9}, "claims 1000000000 samples in one round; its plan allows at most 32"),
        ({"n_samples": -1}, "claims -1 samples"),
        ({"device": "dev1"}, "answered as 'dev1'"),
        ({"round": 2}, "for round 2, not round 3"),
        ({"loss": float("nan")}, "training loss of nan"),
        ({"loss": -1.0}, "training loss of -1.0"),
    ]:
        with pytest.raises(ProtocolViolation, match=match):
            check_round_done(done(**change), device="dev0", round_=3, train=TRAIN)


def test_the_averaging_weight_is_bounded_by_the_rounds_between_averages() -> None:
    up = AdaptersUp(device="dev0", round=4, n_samples=64, tensors={})
    check_adapters_up(up, device="dev0", round_=4, train=TRAIN)  # 2 rounds × 4 steps × 8
    with pytest.raises(ProtocolViolation, match=r"claims 65 samples since the last averaging; .* at most 64"):
        check_adapters_up(
            AdaptersUp(device="dev0", round=4, n_samples=65, tensors={}), device="dev0", round_=4, train=TRAIN
        )


def test_held_out_shares_beyond_the_plan_are_refused() -> None:
    ok = EvalStats(task="lm", loss_sum=100.0, targets=3 * 8 * 16, correct=0, batches=3)
    check_eval(ok, device="dev0", train=TRAIN, tokens_per_sample=16)
    for bad in [
        EvalStats(task="lm", loss_sum=1.0, targets=10**9, correct=0, batches=3),
        EvalStats(task="lm", loss_sum=1.0, targets=10, correct=0, batches=4),
        EvalStats(task="lm", loss_sum=float("inf"), targets=10, correct=0, batches=1),
        EvalStats(task="classification", loss_sum=1.0, targets=10, correct=11, batches=1),
    ]:
        with pytest.raises(ProtocolViolation, match="dev0 reports"):
            check_eval(bad, device="dev0", train=TRAIN, tokens_per_sample=16)


def _coded(x: torch.Tensor) -> WireTensor:
    codec = Codec(ChainSpec.parse({"quantize": {"bits": 8, "scale": "token"}}))
    wt, _ = pack_tensor(x, codec, seed=1)
    return wt


def test_a_coded_tensor_decodes_only_within_the_plans_shape() -> None:
    x = torch.randn(2, 4, 8)
    wt = _coded(x)
    assert unpack_tensor(wt, max_shape=(2, 4, 8)).shape == (2, 4, 8)
    with pytest.raises(ProtocolViolation, match=r"shape \[2, 4, 8\]; the plan allows at most \[2, 3, 8\]"):
        unpack_tensor(wt, max_shape=(2, 3, 8))
    with pytest.raises(ProtocolViolation, match="coded tensor where the plan expects a raw one"):
        unpack_tensor(wt)


def test_a_small_payload_cannot_declare_a_huge_tensor() -> None:
    wt = _coded(torch.randn(2, 4, 8))
    meta = dict(wt.desc.codec or {})
    # The descriptor says what the plan allows; the codec header claims 2^30 elements.
    lying = WireTensor.coded({**meta, "shape": [1024, 1024, 1024]}, wt.data, dtype="float32", shape=(2, 4, 8))
    with pytest.raises(MalformedFrame, match="codec header shape"):
        unpack_tensor(lying, max_shape=(2, 4, 8))
    huge = WireTensor.coded(
        {**meta, "shape": [4096, 4096, 16]}, wt.data, dtype="float32", shape=(4096, 4096, 16)
    )
    with pytest.raises(ProtocolViolation, match="the plan allows at most"):
        unpack_tensor(huge, max_shape=(8, 128, 576))


def test_raw_tensors_are_still_bounded_by_the_plan_when_one_is_given() -> None:
    wt = WireTensor.from_torch(torch.zeros(3, 5))
    assert unpack_tensor(wt).shape == (3, 5)
    with pytest.raises(ProtocolViolation):
        unpack_tensor(wt, max_shape=(3, 4))
