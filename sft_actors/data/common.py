"""What every dataset in this package offers, and the helpers the loaders share.

Two small protocols keep the rest of the package generic:

* :class:`LabelledDataset` — ``len``, one integer label per sample and the class names. The
  partitioner and the CLI need nothing else. For text corpora a "sample" is a source document
  and its "label" is the document's group (the top-level package of a stdlib module, the
  folder of a text file), so non-IID text shards are skewed by source.
* :class:`CollatableDataset` — ``len`` and ``collate(indices) -> dict of tensors``. The batch
  iterator needs nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from sft_actors.errors import ConfigError, DatasetNotFound

# Canonical split names; loaders accept the aliases too.
TRAIN = "train"
TEST = "test"
_SPLIT_ALIASES = {
    "train": TRAIN,
    "test": TEST,
    "heldout": TEST,
    "held-out": TEST,
    "val": TEST,
    "validation": TEST,
}


@runtime_checkable
class LabelledDataset(Protocol):
    """A dataset whose samples carry integer labels in ``[0, len(class_names))``."""

    @property
    def name(self) -> str: ...

    @property
    def split(self) -> str: ...

    @property
    def class_names(self) -> tuple[str, ...]: ...

    def __len__(self) -> int: ...

    def label_array(self) -> np.ndarray:
        """``(N,)`` int64 labels, one per sample (a copy the caller may keep)."""
        ...


@runtime_checkable
class CollatableDataset(Protocol):
    """A dataset that turns a list of sample indices into a batch of tensors."""

    def __len__(self) -> int: ...

    def collate(self, indices: np.ndarray) -> dict[str, torch.Tensor]: ...


def canonical_split(split: str) -> str:
    """``"train"`` or ``"test"`` for ``split`` or one of its aliases (heldout, val, ...)."""
    try:
        return _SPLIT_ALIASES[split.strip().lower()]
    except KeyError:
        raise ConfigError(
            f"unknown split {split!r}; use 'train' or 'test' (aliases: heldout, val, validation)"
        ) from None


def heldout_split_indices(n: int, heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded disjoint ``(train, heldout)`` index arrays over ``range(n)``, each sorted.

    The held-out part has ``round(n * fraction)`` items, at least 1 when ``fraction > 0`` and
    ``n >= 2``, so a tiny corpus still has something to evaluate on. Sorting keeps the original
    (deterministic) order inside each part.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ConfigError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    n_heldout = round(n * heldout_fraction)
    if heldout_fraction > 0 and n >= 2:
        n_heldout = min(max(n_heldout, 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_heldout:]), np.sort(order[:n_heldout])


def split_members(
    name: str, count: int, split: str, *, heldout_fraction: float, seed: int, unit: str
) -> tuple[str, np.ndarray]:
    """(canonical split, indices of its members) among ``count`` units (documents, conversations),
    drawn by unit and seeded (:func:`heldout_split_indices`). Raises :class:`DatasetNotFound`
    when there is no unit and :class:`ConfigError` for an empty held-out split."""
    split = canonical_split(split)
    if not count:
        raise DatasetNotFound(f"{name}: no {unit} were found")
    train_idx, test_idx = heldout_split_indices(count, heldout_fraction, seed)
    chosen = train_idx if split == TRAIN else test_idx
    if split == TEST and not len(chosen):
        raise ConfigError(f"{name}: the held-out split is empty; use heldout_fraction > 0 and >= 2 {unit}")
    return split, chosen


def require_dir(path: Path, what: str, how: str) -> Path:
    """``path`` if it is a directory; otherwise a DatasetNotFound that says what to put there."""
    if not path.is_dir():
        raise DatasetNotFound(f"{what}: directory {path} does not exist. {how}")
    return path


def require_file(path: Path, what: str, how: str) -> Path:
    """``path`` if it is a regular file; otherwise a DatasetNotFound that says what to put there."""
    if not path.is_file():
        raise DatasetNotFound(f"{what}: file {path} is missing. {how}")
    return path
