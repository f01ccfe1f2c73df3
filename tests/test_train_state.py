"""Trainer state for checkpoints and rejoins: a restored trainer continues bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sft_actors.data import ShardBatches
from sft_actors.errors import CheckpointError, ConfigError
from sft_actors.model import LoraConfig, Part, load_model, lora_state_dict, resolve_spec, split_model
from sft_actors.train.accumulate import OrderedGradients, device_of, order_key
from sft_actors.train.checkpoint import load_checkpoint, write_checkpoint
from sft_actors.train.device_session import DeviceSession
from sft_actors.train.device_trainer import DeviceTrainer
from sft_actors.train.server_trainer import ServerTrainer
from sft_actors.train.state import TrainerState, load_optimizer_tensors, optimizer_tensors
from tests.test_device_session import plan

# --- optimizer state --------------------------------------------------------------------------


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _adam(model: torch.nn.Module) -> tuple[torch.optim.AdamW, dict[str, torch.nn.Parameter]]:
    params = dict(model.named_parameters())
    return torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.1), params


def _steps(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(n):
        x = torch.randn(4, 6, generator=g)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def test_optimizer_round_trip_gives_bit_identical_next_steps() -> None:
    m1 = _model()
    opt1, p1 = _adam(m1)
    _steps(m1, opt1, 3, seed=1)
    flat = optimizer_tensors(opt1, p1)
    assert set(flat) == {f"optim.{n}.{e}" for n in p1 for e in ("exp_avg", "exp_avg_sq", "step")}
    assert flat["optim.0.weight.step"].dim() == 0 and float(flat["optim.0.weight.step"]) == 3.0

    m2 = _model(seed=5)  # other weights: everything must come from the state
    opt2, p2 = _adam(m2)
    with torch.no_grad():
        for name, p in p2.items():
            p.copy_(p1[name])
    load_optimizer_tensors(opt2, p2, {k: v.clone() for k, v in flat.items()})
    assert _steps(m1, opt1, 4, seed=2) == _steps(m2, opt2, 4, seed=2)
    for name in p1:
        assert torch.equal(p1[name], p2[name]), name
    for k, v in optimizer_tensors(opt1, p1).items():
        assert torch.equal(v, optimizer_tensors(opt2, p2)[k]), k


def test_load_optimizer_refuses_mismatches_and_leaves_absent_parameters_fresh() -> None:
    m = _model()
    opt, params = _adam(m)
    _steps(m, opt, 1, seed=0)
    flat = optimizer_tensors(opt, params)
    fresh_opt, fresh_params = _adam(_model())
    bad = dict(flat, **{"optim.0.weight.exp_avg": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match=r"optim\.0\.weight\.exp_avg .*expected"):
        load_optimizer_tensors(fresh_opt, fresh_params, bad)
    with pytest.raises(CheckpointError, match=r"optim\.9\.bias\.step names no trainable"):
        load_optimizer_tensors(fresh_opt, fresh_params, {**flat, "optim.9.bias.step": torch.tensor(1.0)})
    incomplete = {k: v for k, v in flat.items() if k != "optim.2.bias.exp_avg_sq"}
    with pytest.raises(CheckpointError, match=r"optim\.2\.bias\.exp_avg_sq is missing"):
        load_optimizer_tensors(fresh_opt, fresh_params, incomplete)
    assert not fresh_opt.state  # nothing was loaded by a refused call
    only_first = {k: v for k, v in flat.items() if k.startswith("optim.0.")}
    load_optimizer_tensors(opt, params, only_first)
    assert params["0.weight"] in opt.state and params["2.bias"] not in opt.state


# --- batches ------------------------------------------------------------------------------------


class _Indexed:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def collate(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        return {"idx": torch.as_tensor(indices)}


@pytest.mark.parametrize("drop_last", [True, False])
def test_seek_matches_consuming(drop_last: bool) -> None:
    shard = np.arange(3, 20)  # 17 samples: 5 full batches of 3 and a partial one
    ref = ShardBatches(_Indexed(20), shard, batch_size=3, seed=4, drop_last=drop_last)
    drawn = [ref.next_indices().tolist() for _ in range(25)]
    for n in (0, 1, 4, 5, 6, 11, 12, 17, 20):
        it = ShardBatches(_Indexed(20), shard, batch_size=3, seed=4, drop_last=drop_last)
        it.seek(n)
        assert [it.next_indices().tolist() for _ in range(25 - n)] == drawn[n:], n
    with pytest.raises(ConfigError, match="seek"):
        ref.seek(-1)


# --- accumulated micro-batches of a lost device -------------------------------------------------


def test_discard_drops_only_the_rejected_keys() -> None:
    acc = OrderedGradients()
    for d in range(3):
        for s in range(2):
            acc.add(order_key(d, s), {"w": torch.full((2,), float(d))})
    assert acc.discard(lambda k: device_of(k) != 1) == 2 and len(acc) == 4
    params = {"w": torch.nn.Parameter(torch.zeros(2))}
    acc.apply_mean(params, 0)
    assert params["w"].grad is not None and params["w"].grad.tolist() == [1.0, 1.0]  # (0+0+2+2)/4


def _split(cut: int = 2, rank: int = 4) -> tuple[Part, Part]:
    model = load_model(resolve_spec("llama-tiny"))
    return split_model(model, cut, lora=LoraConfig(rank=rank, alpha=8), seed=3)


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, 12), generator=g)
    return ids, ids.clone()


def test_server_drop_devices_equals_never_seeing_that_device() -> None:
    results = []
    for devices, drop in (((0, 1, 2), True), ((0, 2), False)):
        device, server = _split()
        st = ServerTrainer(server, lr=1e-2, update="per_round")
        for d in devices:
            for s in range(2):
                ids, labels = _batch(10 * d + s)
                with torch.no_grad():
                    hidden = device(ids)
                st.train_step(hidden, labels, 2, key=order_key(d, s))
        if drop:
            assert st.drop_devices(lambda i: i != 1) == 2
        assert st.end_round() == 4
        results.append({k: v.clone() for k, v in lora_state_dict(server).items()})
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k


def test_stage_trainer_drops_accumulated_micro_batches_of_a_lost_device() -> None:
    device, _ = _split()
    dt = DeviceTrainer(device, lr=1e-2, max_inflight=4, accumulate=True)
    for d in (0, 1):
        key = order_key(d, 0)
        hidden = dt.forward(key, _batch(d)[0])
        dt.backward(key, torch.ones_like(hidden))
    assert dt.drop_devices(lambda i: i == 0) == 1
    assert dt.end_round() == 1


# --- trainers -----------------------------------------------------------------------------------


def _server_steps(st: ServerTrainer, device: torch.nn.Module, seeds: range) -> list[float]:
    losses = []
    for s in seeds:
        ids, labels = _batch(s)
        with torch.no_grad():
            hidden = device(ids)
        losses.append(st.train_step(hidden, labels, 2).loss)
    return losses


def test_server_trainer_restore_continues_exactly() -> None:
    device, server = _split()
    st = ServerTrainer(server, lr=1e-2)
    _server_steps(st, device, range(3))
    state = st.state()
    assert state.counters == {"batches_done": 3}
    assert any(k.startswith("param.") for k in state.tensors) and any(
        k.endswith(".step") for k in state.tensors
    )
    _, server2 = _split()
    st2 = ServerTrainer(server2, lr=1e-2)
    st2.restore(state)
    assert st2.batches_done == 3
    assert _server_steps(st, device, range(3, 6)) == _server_steps(st2, device, range(3, 6))
    after, after2 = lora_state_dict(server), lora_state_dict(server2)
    assert all(torch.equal(after[k], after2[k]) for k in after)


def test_restore_refuses_a_state_of_another_lora_or_without_counters() -> None:
    _, server = _split()
    state = ServerTrainer(server, lr=1e-2).state()
    _, other = _split(rank=2)
    with pytest.raises(CheckpointError, match=r"param\..*expected"):
        ServerTrainer(other, lr=1e-2).restore(state)
    with pytest.raises(CheckpointError, match="batches_done"):
        ServerTrainer(server, lr=1e-2).restore(TrainerState(tensors=state.tensors, counters={}))
    with pytest.raises(CheckpointError, match="neither"):
        ServerTrainer(server, lr=1e-2).restore(
            TrainerState(tensors={"x": torch.ones(1)}, counters={"batches_done": 0})
        )
    device, _ = _split()
    dt = DeviceTrainer(device, lr=1e-2)
    missing = {k: v for i, (k, v) in enumerate(dt.state_tensors().items()) if i}
    with pytest.raises(CheckpointError, match="lacks param"):
        dt.load_state_tensors(missing)


# --- the device session -------------------------------------------------------------------------


def _session_round(s: DeviceSession, steps: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """``steps`` micro-batches, two in flight at a time, backward with the gradient of
    0.005·‖h‖² (a fixed synthetic loss): (step, inputs, activations) of each."""
    out = []
    pending = []
    for _ in range(steps):
        step, inputs, _ = s.next_batch()
        pending.append((step, inputs, s.forward(step, inputs)))
        if len(pending) == 2:
            for st, x, h in pending:
                s.backward(st, h * 0.01)
                out.append((st, x, h))
            pending.clear()
    assert not pending
    s.finish_round()
    return out


def test_device_session_restored_from_a_checkpoint_continues_exactly(tmp_path: Path) -> None:
    p = plan()  # llama-tiny, max_inflight 2, batch 2, 3 steps per round
    a = DeviceSession(p)
    _session_round(a, 4)
    _session_round(a, 4)
    path = write_checkpoint(tmp_path, 2, meta={}, states={"dev0": a.state()})
    state = load_checkpoint(path).states["dev0"]
    assert state.counters == {"step": 8, "samples_since_aggregation": 2 * 3 * 2}

    b = DeviceSession(p)
    b.restore(state)
    ra, rb = _session_round(a, 6), _session_round(b, 6)
    for (sa, xa, ha), (sb, xb, hb) in zip(ra, rb, strict=True):
        assert sa == sb and torch.equal(xa, xb) and torch.equal(ha, hb), sa
    (la, na), (lb, nb) = a.adapters(), b.adapters()
    assert na == nb and all(torch.equal(la[k], lb[k]) for k in la)
    assert b.state().counters == a.state().counters


def test_device_session_restore_needs_its_counters() -> None:
    s = DeviceSession(plan())
    with pytest.raises(CheckpointError, match="'step'"):
        s.restore(TrainerState(tensors=s.state().tensors, counters={"samples_since_aggregation": 0}))
