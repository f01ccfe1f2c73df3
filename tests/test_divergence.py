"""A diverging run (non-finite loss, gradients or adapters computed from valid inputs) ends
``failed`` naming device and round — never ``completed``, never a hang; a round no device
finished never counts as completed (test_precision.py: the injected-NaN divergence tests)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import sft_actors.actors.coordinator_rounds as rounds_module
from sft_actors.errors import NonFiniteLoss, ProtocolViolation
from sft_actors.runtime import run_topology
from sft_actors.topology import load_topology
from sft_actors.train.aggregate import Contribution
from sft_actors.train.device_session import DeviceSession
from sft_actors.train.lora_average import average_lora

pytestmark = pytest.mark.timeout(300)


def _topology(tmp_path: Path, *, mode: str, lr: float, averaging: str = "fedavg") -> Path:
    (tmp_path / "runs").mkdir(exist_ok=True)
    text = f"""
[run]
name = "t"
model = "llama-tiny"
seed = 0
dtype = "float32"

[run.train]
mode = "{mode}"
rounds = 2
steps_per_round = 2
batch_size = 2
seq_len = 16
lr = {lr}
max_inflight = 1
eval_batches = 1
lora_averaging = "{averaging}"
# Short: a device that never answered its round (the hang) would be dropped after 30 s and the
# test would still fail on the status, not wait 1800 s.
round_timeout_s = 30.0

[run.lora]
rank = 4
alpha = 8.0

[run.data]
dataset = "stdlib-docs"
options = {{ max_documents = 40 }}

[run.runtime]
heartbeat_interval_s = 0.5
heartbeat_timeout_s = 20.0
request_timeout_s = 30.0
drain_timeout_s = 2.0

[run.output]
dir = "{tmp_path / "runs"}"

[[actors]]
name = "coordinator"
role = "coordinator"
port = 0

[[actors]]
name = "server"
role = "server"
port = 0

[[actors]]
name = "dev0"
role = "device"
cut = 1

[[actors]]
name = "dev1"
role = "device"
cut = 2
"""
    path = tmp_path / "topology.toml"
    path.write_text(text)
    return path


def _summary(tmp_path: Path) -> dict[str, Any]:
    (path,) = (tmp_path / "runs").glob("t-*/summary.json")

    def strict(constant: str) -> None:
        raise AssertionError(f"summary.json holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=strict)  # type: ignore[no-any-return]


async def _run(path: Path) -> Any:
    result = await run_topology(load_topology(path), timeout_s=240)
    json.dumps(result.line(), allow_nan=False, default=str)  # what `sft run` prints: strict JSON
    return result


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["sft", "sfl", "sl"])
async def test_a_too_large_lr_fails_the_run_naming_device_and_round(tmp_path: Path, mode: str) -> None:
    """lr = 1e3 diverges: ``sft`` hung (the device's failed round never answered), ``sfl``/``sl``
    dropped both devices for "non-finite gradients" and completed with a made-up loss 0.0."""
    result = await _run(_topology(tmp_path, mode=mode, lr=1e3))
    assert result.status == "failed" and not result.ok, (result.status, result.reason)
    assert "NonFiniteLoss: non-finite training loss at round " in result.reason, result.reason
    assert " on dev" in result.reason, result.reason
    s = _summary(tmp_path)
    assert s["status"] == "failed"
    assert all(r["loss"] is None or (math.isfinite(r["loss"]) and r["loss"] > 0) for r in s["rounds"])


@pytest.mark.asyncio
async def test_a_round_no_device_finished_fails_the_run_with_the_causes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = rounds_module.check_round_done

    def refuse_round_2(msg: Any, *, device: str, round_: int, train: Any) -> None:
        if round_ == 2:
            raise ProtocolViolation(f"{device} reports nonsense")
        real(msg, device=device, round_=round_, train=train)

    monkeypatch.setattr(rounds_module, "check_round_done", refuse_round_2)
    result = await _run(_topology(tmp_path, mode="sfl", lr=1e-3))
    assert result.status == "failed", (result.status, result.reason)
    assert "RoundFailed: round 2: no device finished it" in result.reason, result.reason
    assert "dev0: ProtocolViolation: dev0 reports nonsense" in result.reason, result.reason
    s = _summary(tmp_path)
    assert s["status"] == "failed" and [r["round"] for r in s["rounds"]] == [1]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("mode", "averaging", "round_"), [("sfl", "fedavg", 1), ("sfl", "svd", 1), ("sl", "fedavg", 2)]
)
async def test_non_finite_adapters_fail_the_run_naming_device_and_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, averaging: str, round_: int
) -> None:
    """dev1's adapters turn NaN (its training diverged without a NaN loss): the coordinator's
    averaging crashed in an SVD (LinAlgError, blamed on the coordinator); now the run fails.
    (``sl`` relays dev1's adapters first at round 2: dev0 → dev1 in round 1, dev1 → dev0 then.)"""
    real = DeviceSession.adapters

    def diverged(self: DeviceSession) -> tuple[dict[str, torch.Tensor], int]:
        state, n = real(self)
        if self.plan.device == "dev1":
            state = {k: v * float("nan") for k, v in state.items()}
        return state, n

    monkeypatch.setattr(DeviceSession, "adapters", diverged)
    result = await _run(_topology(tmp_path, mode=mode, lr=1e-3, averaging=averaging))
    assert result.status == "failed", (result.status, result.reason)
    assert f"NonFiniteLoss: non-finite adapters from dev1 at round {round_}" in result.reason, result.reason
    assert "LinAlgError" not in result.reason


@pytest.mark.parametrize("method", ["fedavg", "svd"])
def test_lora_average_never_raises_a_linalg_error(method: str) -> None:
    g = torch.Generator().manual_seed(0)

    def pair(scale: float) -> dict[str, torch.Tensor]:
        a, b = torch.randn(4, 16, generator=g), torch.randn(16, 4, generator=g)
        return {"blocks.0.q.lora_A": a * scale, "blocks.0.q.lora_B": b * scale}

    good = Contribution(device="dev0", n_samples=4, tensors=pair(1.0))
    bad = Contribution(device="dev1", n_samples=4, tensors=pair(float("nan")))
    result = average_lora([good, bad], method)  # no LinAlgError
    assert set(result.tensors) == set(good.tensors)
    with pytest.raises(NonFiniteLoss, match="non-finite adapters from dev1 at round 3"):
        rounds_module.check_adapters_finite(bad.tensors, device="dev1", round_=3)
