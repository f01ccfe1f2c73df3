"""Partitioning across devices, the per-device batch iterator, the registry and `sft data info`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sft_actors.cli.main import app
from sft_actors.data import (
    ShardBatches,
    dirichlet_partition,
    format_histogram,
    iid_partition,
    label_entropy,
    label_histogram,
    load_dataset,
    load_image_dataset,
    load_text_corpus,
    pack_token_streams,
    partition,
)
from sft_actors.errors import ConfigError

LABELS = np.repeat(np.arange(10), 300)  # 3000 samples, 10 balanced classes


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    together = np.concatenate(parts)
    assert together.size == n and np.array_equal(np.sort(together), np.arange(n))


# ---------------------------------------------------------------- partitioning


def test_iid_partition_is_seeded_balanced_and_exact() -> None:
    parts = iid_partition(1001, 4, seed=3)
    _assert_exact_cover(parts, 1001)
    assert sorted(p.size for p in parts) == [250, 250, 250, 251]
    assert all(np.array_equal(a, b) for a, b in zip(parts, iid_partition(1001, 4, seed=3), strict=True))
    assert not np.array_equal(parts[0], iid_partition(1001, 4, seed=4)[0])


def test_dirichlet_partition_is_deterministic_and_exact() -> None:
    parts = dirichlet_partition(LABELS, 8, alpha=0.5, seed=11)
    again = dirichlet_partition(LABELS, 8, alpha=0.5, seed=11)
    other = dirichlet_partition(LABELS, 8, alpha=0.5, seed=12)
    _assert_exact_cover(parts, LABELS.size)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_small_alpha_is_more_skewed_than_large_alpha() -> None:
    def mean_entropy(alpha: float) -> float:
        values = [
            label_entropy(
                label_histogram(LABELS, dirichlet_partition(LABELS, 10, alpha=alpha, seed=s))
            ).mean()
            for s in range(5)
        ]
        return float(np.mean(values))

    skewed, mild, near_iid = mean_entropy(0.05), mean_entropy(1.0), mean_entropy(1000.0)
    assert skewed < 1.2 < mild < 3.1 < near_iid <= np.log2(10) + 1e-9
    iid = label_entropy(label_histogram(LABELS, iid_partition(LABELS.size, 10, seed=0))).mean()
    assert iid > 3.25


def test_every_device_gets_a_sample_even_when_alpha_is_tiny() -> None:
    labels = np.repeat(np.arange(3), 20)  # 60 samples, 3 classes, 50 devices
    for seed in range(5):
        parts = dirichlet_partition(labels, 50, alpha=0.001, seed=seed)
        _assert_exact_cover(parts, labels.size)
        assert min(p.size for p in parts) >= 1
    parts = dirichlet_partition(labels, 6, alpha=0.001, seed=0, min_per_device=10)
    assert [p.size for p in parts] == [10] * 6


def test_dirichlet_does_not_favour_any_device_for_small_classes() -> None:
    # One sample per class (like single-module stdlib packages): every device should get ~1/4.
    sizes = [p.size for p in dirichlet_partition(np.arange(4000), 4, alpha=1.0, seed=0)]
    assert max(sizes) < 1150 and min(sizes) > 850


def test_partition_errors_are_clear() -> None:
    with pytest.raises(ConfigError, match="5 samples cannot give 6 devices"):
        partition(np.zeros(5, dtype=np.int64), 6, alpha=None, seed=0)
    with pytest.raises(ConfigError, match="5 samples cannot give 6 devices"):
        partition(np.zeros(5, dtype=np.int64), 6, alpha=1.0, seed=0)
    with pytest.raises(ConfigError, match="alpha"):
        dirichlet_partition(LABELS, 2, alpha=0.0, seed=0)
    with pytest.raises(ConfigError, match="integer"):
        dirichlet_partition(LABELS.astype(float), 2, alpha=1.0, seed=0)


def test_text_partition_over_module_groups() -> None:
    corpus = load_dataset(
        "stdlib-docs", packages=["email", "json", "asyncio", "collections"], heldout_fraction=0.0
    )
    labels = corpus.label_array()
    parts = partition(labels, 3, alpha=0.1, seed=0)
    _assert_exact_cover(parts, len(corpus))
    shards = [corpus.subset(p) for p in parts]
    assert sum(len(s) for s in shards) == len(corpus)
    hist = label_histogram(labels, parts, len(corpus.class_names))
    assert hist.shape == (3, 4) and hist.sum() == len(corpus)
    assert {d.group for s in shards for d in s.documents} == set(corpus.class_names)


def test_histogram_table_wide_and_narrow() -> None:
    parts = partition(LABELS, 3, alpha=0.3, seed=1)
    hist = label_histogram(LABELS, parts)
    names = [f"class{i}" for i in range(10)]
    table = format_histogram(hist, names)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["device", "samples", "classes", "entropy"] and "class9" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["dev0", "dev1", "dev2", "all"]
    assert lines[-1].split()[1] == "3000"
    narrow = format_histogram(hist, names, max_columns=5, top=2)
    top_class = int(hist[0].argmax())
    assert "top 2 classes" in narrow and f"class{top_class}:{hist[0, top_class]}" in narrow.splitlines()[1]


# ---------------------------------------------------------------- batch iterator


class _Indexed:
    """A dataset whose batches are their own indices, to check what the iterator visits."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def collate(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        return {"idx": torch.as_tensor(indices)}


def test_batches_cycle_forever_with_a_new_order_each_epoch() -> None:
    shard = np.array([3, 5, 7, 11, 13, 17, 19])
    it = ShardBatches(_Indexed(20), shard, batch_size=3, seed=1, drop_last=False)
    assert it.batches_per_epoch == 3
    epochs = [[next(it)["idx"].tolist() for _ in range(3)] for _ in range(3)]
    for batches in epochs:
        assert [len(b) for b in batches] == [3, 3, 1]
        assert sorted(i for b in batches for i in b) == shard.tolist()
    assert epochs[0] != epochs[1] and it.epoch == 2
    dropped = ShardBatches(_Indexed(20), shard, batch_size=3, seed=1, drop_last=True)
    sizes = [len(next(dropped)["idx"]) for _ in range(6)]
    assert sizes == [3] * 6 and dropped.epoch == 2


def test_batches_are_seeded_and_resumable() -> None:
    def run(it: ShardBatches, k: int) -> list[list[int]]:
        return [next(it)["idx"].tolist() for _ in range(k)]

    a = ShardBatches(_Indexed(50), batch_size=4, seed=9)
    reference = run(a, 30)
    assert run(ShardBatches(_Indexed(50), batch_size=4, seed=9), 30) == reference
    assert run(ShardBatches(_Indexed(50), batch_size=4, seed=10), 30) != reference
    first = ShardBatches(_Indexed(50), batch_size=4, seed=9)
    run(first, 17)
    resumed = ShardBatches(_Indexed(50), batch_size=4, seed=9)
    resumed.load_state_dict(first.state_dict())
    assert run(resumed, 13) == reference[17:]
    ordered = ShardBatches(_Indexed(5), batch_size=2, seed=0, shuffle=False, drop_last=False)
    assert run(ordered, 4) == [[0, 1], [2, 3], [4], [0, 1]]


def test_batch_iterator_errors() -> None:
    with pytest.raises(ConfigError, match="exceeds the shard"):
        ShardBatches(_Indexed(10), np.arange(3), batch_size=4, seed=0)
    with pytest.raises(ConfigError, match="outside"):
        ShardBatches(_Indexed(10), np.array([10]), batch_size=1, seed=0)
    with pytest.raises(ConfigError, match="at least one"):
        ShardBatches(_Indexed(10), np.array([], dtype=np.int64), batch_size=1, seed=0)


def test_batches_from_real_datasets() -> None:
    digits = load_image_dataset("digits").for_vit(size=28, channels=1)
    parts = partition(digits.label_array(), 4, alpha=0.5, seed=0)
    batch = next(ShardBatches(digits, parts[2], batch_size=16, seed=0))
    assert batch["pixel_values"].shape == (16, 1, 28, 28) and batch["labels"].shape == (16,)
    assert set(batch["labels"].tolist()) <= set(digits.label_array()[parts[2]].tolist())
    packed = pack_token_streams([list(range(1, 40))] * 5, eos_id=0, seq_len=16)
    lm = next(ShardBatches(packed, batch_size=4, seed=0))
    assert lm["input_ids"].shape == (4, 16) and lm["labels"].dtype == torch.int64


# ---------------------------------------------------------------- registry and CLI


def test_registry_rejects_unknown_names_and_options() -> None:
    with pytest.raises(ConfigError, match="did you mean 'cifar100'"):
        load_dataset("cifar10", "/tmp")
    with pytest.raises(ConfigError, match="did you mean 'max_documents'"):
        load_dataset("stdlib-docs", max_document=3)
    with pytest.raises(ConfigError, match="unknown split"):
        load_dataset("digits", split="dev")
    with pytest.raises(ConfigError, match="needs a path"):
        load_dataset("text:")
    with pytest.raises(ConfigError, match="holds images, not text"):
        load_text_corpus("digits")
    with pytest.raises(ConfigError, match="holds text, not images"):
        load_image_dataset("stdlib-docs", packages=["json"])


def test_cli_data_info_prints_sizes_and_histogram() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["data", "info", "digits", "--devices", "3", "--alpha", "0.5", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert "samples: 1438" in result.output and "Dirichlet(alpha=0.5)" in result.output
    assert [line.split()[0] for line in result.output.splitlines()[-4:]] == ["dev0", "dev1", "dev2", "all"]
    text = runner.invoke(
        app, ["data", "info", "stdlib-docs", "--set", "packages=json,email", "--devices", "2"]
    )
    assert text.exit_code == 0, text.output
    assert "documents:" in text.output and "IID" in text.output


def test_cli_data_info_reports_missing_data(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["data", "info", "cifar100", "--root", str(tmp_path)])
    assert result.exit_code == 2
    assert "cifar-100-python" in result.output and "error:" in result.output
