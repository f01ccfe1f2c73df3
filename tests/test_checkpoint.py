"""Durable checkpoints: atomic, hashed, pruned; deterministic bytes; strict summary JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sft_actors.errors import CheckpointError, ConfigError
from sft_actors.train.checkpoint import (
    checkpoint_bytes,
    latest_checkpoint,
    load_checkpoint,
    write_checkpoint,
)
from sft_actors.train.files import atomic_write_bytes
from sft_actors.train.state import TrainerState
from sft_actors.train.summary import RoundRecord, RunSummary, write_adapters, write_summary


def _state(seed: int) -> TrainerState:
    g = torch.Generator().manual_seed(seed)
    return TrainerState(
        tensors={
            "param.b": torch.randn(3, 4, generator=g),
            "param.a": torch.randn(5, generator=g).to(torch.bfloat16),
            "optim.a.step": torch.tensor(float(seed)),
            "optim.a.exp_avg": torch.randn(5, generator=g),
        },
        counters={"step": seed, "samples_since_aggregation": 2 * seed},
    )


def _states(seed: int) -> dict[str, TrainerState]:
    return {"dev0": _state(seed), "dev1": _state(seed + 100), "s": TrainerState(tensors={}, counters={})}


def _assert_same(a: TrainerState, b: TrainerState) -> None:
    assert a.counters == b.counters and set(a.tensors) == set(b.tensors)
    for k, t in a.tensors.items():
        assert t.dtype == b.tensors[k].dtype and torch.equal(t, b.tensors[k]), k


def _rounds(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_write_latest_load_round_trip(tmp_path: Path) -> None:
    meta = {"topology": {"name": "t"}, "losses": [1.5, float("nan")], "rounds_done": 3}
    path = write_checkpoint(tmp_path, 3, meta=meta, states=_states(1))
    assert path == tmp_path / "checkpoints" / "round-000003"
    assert sorted(p.name for p in path.iterdir()) == [
        "checkpoint.json",
        "dev0.safetensors",
        "dev1.safetensors",
        "s.safetensors",
    ]
    doc = json.loads((path / "checkpoint.json").read_text())
    assert doc["format"] == 1 and doc["round"] == 3
    assert doc["actors"]["dev0"]["counters"] == {"samples_since_aggregation": 2, "step": 1}
    assert len(doc["actors"]["dev0"]["sha256"]) == 64 and doc["actors"]["dev0"]["file"] == "dev0.safetensors"
    got = latest_checkpoint(tmp_path)
    assert got.round == 3 and got.path == path
    assert got.meta == {"topology": {"name": "t"}, "losses": [1.5, None], "rounds_done": 3}  # NaN -> null
    for name, state in _states(1).items():
        _assert_same(state, got.states[name])
    again = load_checkpoint(path)
    assert again.round == 3 and again.meta == got.meta
    assert checkpoint_bytes(path) == sum(f.stat().st_size for f in path.iterdir())


def test_equal_states_give_byte_identical_files(tmp_path: Path) -> None:
    a = write_checkpoint(tmp_path / "a", 1, meta={"x": 1, "a": [2]}, states=_states(7))
    b = write_checkpoint(tmp_path / "b", 1, meta={"a": [2], "x": 1}, states=_states(7))
    for f in a.iterdir():
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    for r in range(1, 6):
        write_checkpoint(tmp_path, r, meta={}, states=_states(r), keep=3)
    assert _rounds(tmp_path) == ["round-000003", "round-000004", "round-000005"]
    write_checkpoint(tmp_path, 6, meta={}, states=_states(6), keep=1)
    assert _rounds(tmp_path) == ["round-000006"]
    with pytest.raises(ConfigError, match="keep"):
        write_checkpoint(tmp_path, 7, meta={}, states={}, keep=0)


def test_a_crash_during_the_write_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_checkpoint(tmp_path, 1, meta={}, states=_states(1))

    def fail(src: object, dst: object) -> None:
        raise OSError("killed")

    monkeypatch.setattr(os, "rename", fail)  # files written, the final rename fails
    with pytest.raises(OSError, match="killed"):
        write_checkpoint(tmp_path, 2, meta={}, states=_states(2))
    monkeypatch.undo()
    assert _rounds(tmp_path) == ["round-000001"]
    # A kill (no clean-up at all): a half-written directory is left behind.
    half = tmp_path / "checkpoints" / ".tmp-round-000002-abc"
    half.mkdir()
    (half / "dev0.safetensors").write_bytes(b"\0" * 10)
    latest = latest_checkpoint(tmp_path)
    assert latest.round == 1
    _assert_same(latest.states["dev0"], _states(1)["dev0"])
    write_checkpoint(tmp_path, 2, meta={}, states=_states(2))
    assert _rounds(tmp_path) == ["round-000001", "round-000002"]  # the leftover is gone


def test_rewriting_a_round_replaces_it_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_checkpoint(tmp_path, 3, meta={"v": 1}, states=_states(1))
    write_checkpoint(tmp_path, 3, meta={"v": 2}, states=_states(2))
    got = latest_checkpoint(tmp_path)
    assert got.meta == {"v": 2} and _rounds(tmp_path) == ["round-000003"]
    _assert_same(got.states["dev0"], _states(2)["dev0"])

    real_rename = os.rename

    def second_fails(src: str, dst: str) -> None:
        if ".tmp-" in str(src):
            raise OSError("killed")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", second_fails)  # the old one moved away, then the swap fails
    with pytest.raises(OSError, match="killed"):
        write_checkpoint(tmp_path, 3, meta={"v": 3}, states=_states(3))
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).meta == {"v": 2}


def test_a_corrupted_file_is_refused(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path, 1, meta={}, states=_states(1))
    data = bytearray((path / "dev1.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "dev1.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"dev1\.safetensors is corrupted .*delete"):
        latest_checkpoint(tmp_path)
    (path / "dev1.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(path)


def test_unknown_format_and_missing_checkpoints_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        latest_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"checkpoints has none; a run writes one after every \[run"):
        latest_checkpoint(tmp_path)
    path = write_checkpoint(tmp_path, 1, meta={}, states=_states(1))
    manifest = path / "checkpoint.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format": 99}))
    with pytest.raises(CheckpointError, match="format 99; this build reads format 1"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="cannot name"):
        write_checkpoint(tmp_path, 2, meta={}, states={"../x": _state(0)})
    with pytest.raises(CheckpointError, match="not JSON"):
        write_checkpoint(tmp_path, 2, meta={"x": object()}, states={})


# --- run outputs --------------------------------------------------------------------------------


def test_write_adapters_is_deterministic_and_readable(tmp_path: Path) -> None:
    tensors = {f"layers.{i}.lora_A": torch.full((2, 3), float(i)) for i in range(6)}
    meta = {f"key{i}": str(i) for i in range(12)}
    a = write_adapters(tensors, tmp_path / "a.safetensors", meta)
    b = write_adapters(
        dict(reversed(tensors.items())), tmp_path / "b.safetensors", dict(reversed(meta.items()))
    )
    assert a.read_bytes() == b.read_bytes()
    with safe_open(str(a), framework="pt") as f:
        assert f.metadata() == meta
        assert sorted(f.keys()) == sorted(tensors)
        assert torch.equal(f.get_tensor("layers.3.lora_A"), tensors["layers.3.lora_A"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_summary_is_strict_json(tmp_path: Path) -> None:
    s = RunSummary(name="t", mode="sft", model="llama-tiny", devices={"dev0": 2})
    s.rounds.append(
        RoundRecord(
            round=1,
            loss=float("nan"),
            bytes_up=1,
            bytes_down=1,
            raw_up=1,
            raw_down=1,
            seconds=float("inf"),
            step_ms_median=0.0,
            encode_ms=0.0,
        )
    )
    text = write_summary(s, tmp_path).read_text()

    def refuse(name: str) -> float:
        raise AssertionError(f"bare {name} in summary.json")

    doc = json.loads(text, parse_constant=refuse)
    assert doc["rounds"][0]["loss"] is None and doc["rounds"][0]["seconds"] is None
    assert list(doc)[:3] == ["name", "mode", "model"]  # the summary keeps its field order


def test_atomic_write_keeps_the_old_file_when_the_replace_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "x.json"
    atomic_write_bytes(target, b"old")
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)

    def fail(src: object, dst: object) -> None:
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="killed"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.json"]
