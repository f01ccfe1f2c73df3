"""Split learning without a codec reproduces a plain LoRA fine-tune of the unsplit model."""

from __future__ import annotations

import pytest
import torch

from sft_actors.model import (
    LoraConfig,
    load_model,
    lora_state_dict,
    make_full_part,
    randomize_lora_B,
    resolve_spec,
    split_model,
)
from sft_actors.train.device_trainer import DeviceTrainer, StepOrderError
from sft_actors.train.reference import reference_finetune
from sft_actors.train.server_trainer import ServerTrainer

LR = 1e-2


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` steps cycling over two fixed batches, so a working fine-tune visibly lowers the loss."""
    g = torch.Generator().manual_seed(seed)
    # Counting sequences (a, a+1, a+2, ...) are easy to learn for a next-token model.
    fixed = [(torch.randint(0, 256, (2, 1), generator=g) + torch.arange(12)) % 256 for _ in range(2)]
    return [(fixed[i % 2], fixed[i % 2].clone()) for i in range(n)]


def _split_run(cut: int, batches: list[tuple[torch.Tensor, torch.Tensor]], max_inflight: int = 1):
    model = load_model(resolve_spec("llama-tiny"))
    lora = LoraConfig(rank=4, alpha=8)
    device, server = split_model(model, cut, lora=lora, seed=3)
    dt = DeviceTrainer(device, lr=LR, max_inflight=max_inflight)
    st = ServerTrainer(server, lr=LR)
    initial = {**lora_state_dict(device), **lora_state_dict(server)}
    initial = {k: v.clone() for k, v in initial.items()}
    losses = []
    pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for step, (ids, labels) in enumerate(batches):
        pending.append((step, dt.forward(step, ids), labels))
        if len(pending) == max_inflight or step == len(batches) - 1:
            while pending:
                s, hidden, lab = pending.pop(0)
                res = st.train_step(hidden, lab, cut)
                assert res.grad is not None
                dt.backward(s, res.grad)
                losses.append(res.loss)
    final = {**lora_state_dict(device), **lora_state_dict(server)}
    return model, lora, initial, losses, final


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_one_device_no_codec_equals_unsplit_finetune(cut: int) -> None:
    batches = _batches(8)
    model, lora, initial, split_losses, split_final = _split_run(cut, batches)
    full = make_full_part(model, lora=lora, seed=99)  # different init, overwritten by `initial`
    ref_losses = reference_finetune(full, batches, lr=LR, initial=initial)
    ref_final = lora_state_dict(full)
    assert split_losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    assert split_losses[-1] < split_losses[0]
    assert sorted(split_final) == sorted(ref_final)
    for k in ref_final:
        torch.testing.assert_close(split_final[k], ref_final[k], rtol=1e-4, atol=1e-6)
    # The adapters really moved (B starts at zero), so the comparison is not vacuous.
    assert any(float(v.abs().sum()) > 0 for k, v in split_final.items() if k.endswith("lora_B"))


def test_pipelined_device_uses_stale_but_exact_gradients() -> None:
    batches = _batches(8)
    _, _, _, losses1, _ = _split_run(2, batches, max_inflight=1)
    _, _, _, losses2, _ = _split_run(2, batches, max_inflight=2)
    assert losses2[0] == pytest.approx(losses1[0])  # first micro-batch sees the same weights
    assert losses2 != pytest.approx(losses1)  # later ones are one update stale
    assert losses2[-2] < losses2[0]  # same batch, seen again after 6 updates


def test_device_trainer_refuses_out_of_order_gradients() -> None:
    model = load_model(resolve_spec("llama-tiny"))
    device, _ = split_model(model, 2, lora=LoraConfig(rank=4))
    randomize_lora_B(device.adapters, seed=0)
    dt = DeviceTrainer(device, lr=LR, max_inflight=1)
    ids = torch.randint(0, 256, (2, 8))
    hidden = dt.forward(0, ids)
    with pytest.raises(StepOrderError, match="already in flight"):
        dt.forward(1, ids)
    with pytest.raises(StepOrderError, match="not in flight"):
        dt.backward(7, torch.zeros_like(hidden))
    with pytest.raises(StepOrderError, match="shape"):
        dt.backward(0, torch.zeros(1, 2, 3))
