"""The device side as a pure state machine: built from a plan, no sockets."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sft_actors.codec import Basis, CodecPolicy
from sft_actors.errors import ProtocolViolation
from sft_actors.model import lora_state_dict
from sft_actors.plan.assign import device_plans
from sft_actors.topology import parse_topology
from sft_actors.train.device_session import DeviceSession, EvalMeter, RoundMeter
from sft_actors.train.device_trainer import StepOrderError
from sft_actors.wire import DevicePlan
from sft_actors.wire.coded import pack_tensor, unpack_tensor


def tiny_doc(codec: dict) -> dict:
    """A one-device llama-tiny topology (as a dict) with ``codec`` as its [run.codec]."""
    return {
        "run": {
            "name": "t",
            "model": "llama-tiny",
            "train": {"steps_per_round": 3, "batch_size": 2, "seq_len": 16, "max_inflight": 2},
            "data": {"options": {"max_documents": 30}},
            "lora": {"rank": 4},
            "codec": codec,
        },
        "actors": [
            {"name": "c", "role": "coordinator", "port": 0},
            {"name": "s", "role": "server", "port": 0},
            {"name": "dev0", "role": "device", "cut": 2},
        ],
    }


def plan(**codec: dict) -> DevicePlan:
    doc = tiny_doc(codec)
    return device_plans(parse_topology(doc))[0]


def test_round_meter_freezes_what_a_round_measured() -> None:
    m = RoundMeter()
    m.sent(raw=400, coded=40, encode_ms=1.5)
    m.sent(raw=400, coded=60, encode_ms=0.5)
    m.received(raw=400, coded=20)
    m.step_done(loss=2.0, targets=10, step_ms=5.0)
    m.step_done(loss=4.0, targets=6, step_ms=9.0)
    s = m.stats(round_s=0.25)
    assert (s.bytes_up, s.raw_up, s.bytes_down, s.raw_down) == (100, 800, 20, 400)
    assert (s.encode_ms, s.round_s, s.step_ms_median, s.targets) == (2.0, 0.25, 7.0, 16)
    assert m.loss == 3.0 and RoundMeter().loss == 0.0


def test_eval_meter_sums_shares_exactly() -> None:
    e = EvalMeter(task="classification")
    e.add(loss=0.5, targets=4, correct=3)
    e.add(loss=1.0, targets=2, correct=0)
    s = e.stats()
    assert (s.loss_sum, s.targets, s.correct, s.batches, s.task) == (4.0, 6, 3, 2, "classification")


def test_session_runs_micro_batches_in_flight_and_counts_samples() -> None:
    s = DeviceSession(plan())
    assert not s.whole_model and s.codec_up is None and s.eval_task == "lm"
    steps = []
    for _ in range(2):  # max_inflight = 2: two forwards before any gradient
        step, inputs, _ = s.next_batch()
        steps.append((step, s.forward(step, inputs)))
    assert [st for st, _ in steps] == [0, 1]
    assert steps[0][1].shape == (2, 16, 64)  # (B, T, C) at the cut of llama-tiny
    step, inputs, _ = s.next_batch()
    with pytest.raises(StepOrderError, match="already in flight"):
        s.forward(step, inputs)
    before = {k: v.clone() for k, v in lora_state_dict(s.part).items()}
    for st, hidden in steps:
        s.backward(st, torch.ones_like(hidden))
    after = lora_state_dict(s.part)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the optimizer stepped
    with pytest.raises(StepOrderError, match="not in flight"):
        s.backward(0, torch.ones_like(steps[0][1]))
    assert s.finish_round() == 3 * 2  # steps_per_round × batch_size
    state, weight = s.adapters()
    assert weight == 6 and s.adapters()[1] == 0  # the averaging weight resets when collected
    assert set(state) == set(after)


def test_adapters_for_blocks_it_does_not_hold_are_refused() -> None:
    s = DeviceSession(plan())
    state, _ = s.adapters()
    assert s.load_adapters(dict(state)) == 0
    alien = {k.replace("blocks.1.", "blocks.3."): v for k, v in state.items() if k.startswith("blocks.1.")}
    with pytest.raises(ProtocolViolation, match="does not hold"):
        s.load_adapters(alien)


def test_re_factorized_adapters_start_with_fresh_adamw_moments() -> None:
    # lora_averaging = "svd" sends new factors (a new basis) and names them in reset_moments.
    s = DeviceSession(plan())
    step, inputs, _ = s.next_batch()
    s.backward(step, torch.ones_like(s.forward(step, inputs)))
    state, _ = s.adapters()
    reset = ["blocks.0.q.lora_A", "blocks.0.q.lora_B"]
    assert s.load_adapters(dict(state), reset) == 0
    moments = {n: s.trainer.optimizer.state[p] for n, p in s.trainer.params.items()}
    zeroed = {n for n, st in moments.items() if all(float(v.abs().sum()) == 0 for v in st.values())}
    assert len(zeroed) == 2 and all(".0." in n and ".q." in n for n in zeroed)  # only those two
    with pytest.raises(ProtocolViolation, match="not sent"):
        s.load_adapters({}, ["blocks.0.q.lora_A"])


def test_projecting_chain_fits_a_basis_on_its_own_activations() -> None:
    up = {
        "outliers": {"first_tokens": 1},
        "project": {"basis": "pca"},
        "quantize": {"bits": 8, "scale": "channel"},
    }
    p = plan(up=up)
    assert p.codec == CodecPolicy.parse({"up": up})
    s = DeviceSession(p)
    assert DeviceSession(plan()).fit_basis() is None
    basis = s.fit_basis()
    assert isinstance(basis, Basis) and basis.vectors.shape == (64, 64)
    assert s.bases.get("pca").digest == basis.digest
    _, inputs, _ = s.next_batch()
    hidden = s.forward_eval(inputs)
    assert s.codec_up is not None
    wire, report = pack_tensor(hidden, s.codec_up, seed=1)
    assert report is not None and wire.desc.nbytes < hidden.numel() * 4 / 3
    decoded = unpack_tensor(wire, s.bases, max_shape=hidden.shape)
    cos = torch.nn.functional.cosine_similarity(decoded.flatten(), hidden.flatten(), dim=0)
    assert decoded.shape == hidden.shape and float(cos) > 0.99


def test_a_plan_for_the_whole_model_trains_locally() -> None:
    s = DeviceSession(dataclasses.replace(plan(), mode="fedlora", server=""))
    assert s.whole_model
    _, inputs, labels = s.next_batch()
    loss, targets = s.local_step(inputs, labels)
    assert loss > 0 and targets == int((labels[:, 1:] != -100).sum())  # next-token targets, as eval
    eval_loss, eval_targets, correct = s.local_eval(*s.heldout[0])
    assert eval_loss > 0 and eval_targets == int((s.heldout[0][1][:, 1:] != -100).sum()) and correct == 0
