"""CIFAR-100, read from the "python version" release layout.

::

    <root>/cifar-100-python/train   50000 images   (pickle: dict with bytes keys)
    <root>/cifar-100-python/test    10000 images
    <root>/cifar-100-python/meta    fine and coarse label names

Each data file is a dict with ``b"data"`` (N × 3072 uint8: 1024 red, 1024 green, 1024 blue
values, each a row-major 32 × 32 plane), ``b"fine_labels"`` and ``b"coarse_labels"`` (lists of
ints), ``b"filenames"`` and ``b"batch_label"``. The release stores ``b"data"`` as a numpy
array; a re-pickled copy may hold raw bytes instead — both are accepted. The files are pickles,
so they go through :mod:`sft_actors.data.safe_pickle`, which cannot execute code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from sft_actors.data.common import TRAIN, canonical_split, require_dir, require_file
from sft_actors.data.images import ImageDataset
from sft_actors.data.safe_pickle import load_plain_pickle_file
from sft_actors.errors import ConfigError, DatasetCorrupt
from sft_actors.log import get_logger

FOLDER = "cifar-100-python"
_PIXELS = 3 * 32 * 32
_HOW = (
    "Download cifar-100-python.tar.gz (the 'CIFAR-100 python version') from "
    "https://www.cs.toronto.edu/~kriz/cifar.html and extract it so that {dir}/train, {dir}/test "
    "and {dir}/meta exist; then pass the parent folder as root."
)


def _folder(root: Path) -> Path:
    # Accept both the parent folder and the cifar-100-python folder itself.
    folder = root if root.name == FOLDER else root / FOLDER
    return require_dir(folder, "CIFAR-100", _HOW.format(dir=folder))


def _field(record: dict[Any, Any], key: bytes, path: Path) -> Any:
    if key not in record:
        raise DatasetCorrupt(
            f"{path}: key {key!r} is missing (found {sorted(record)[:8]}); "
            f"is this the CIFAR-100 python release?"
        )
    return record[key]


def _names(meta: Any, key: bytes, path: Path) -> tuple[str, ...]:
    names = _field(meta, key, path)
    if not isinstance(names, list) or not all(isinstance(n, bytes | str) for n in names):
        raise DatasetCorrupt(f"{path}: {key!r} must be a list of names")
    return tuple(n.decode("utf-8") if isinstance(n, bytes) else n for n in names)


def _pixels(raw: Any, path: Path) -> np.ndarray:
    """``b"data"`` (ndarray or raw bytes) → ``(N, 3, 32, 32)`` uint8."""
    if isinstance(raw, bytes):
        raw = np.frombuffer(raw, dtype=np.uint8)
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8:
        raise DatasetCorrupt(f"{path}: b'data' must be uint8 pixels, got {type(raw).__name__}")
    if raw.size % _PIXELS:
        raise DatasetCorrupt(f"{path}: b'data' holds {raw.size} bytes, not a multiple of {_PIXELS} (3×32×32)")
    return raw.reshape(-1, 3, 32, 32)


def _labels(raw: Any, key: bytes, count: int, num_classes: int, path: Path) -> np.ndarray:
    if not isinstance(raw, list | np.ndarray) or len(raw) != count:
        raise DatasetCorrupt(f"{path}: {key!r} must list {count} labels, one per image")
    labels = np.asarray(raw, dtype=np.int64)
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetCorrupt(f"{path}: {key!r} has labels outside [0, {num_classes})")
    return labels


def load_cifar100(
    root: str | Path,
    split: str = TRAIN,
    *,
    label_mode: Literal["fine", "coarse"] = "fine",
) -> ImageDataset:
    """CIFAR-100 ``split`` ("train" or "test") with fine (100) or coarse (20) labels."""
    if label_mode not in ("fine", "coarse"):
        raise ConfigError(f"label_mode must be 'fine' or 'coarse', got {label_mode!r}")
    split = canonical_split(split)
    folder = _folder(Path(root).expanduser())
    how = _HOW.format(dir=folder)
    meta_path = require_file(folder / "meta", "CIFAR-100", how)
    data_path = require_file(folder / split, "CIFAR-100", how)

    meta = load_plain_pickle_file(meta_path)
    if not isinstance(meta, dict):
        raise DatasetCorrupt(f"{meta_path}: expected a dict, got {type(meta).__name__}")
    class_names = _names(meta, f"{label_mode}_label_names".encode(), meta_path)

    record = load_plain_pickle_file(data_path)
    if not isinstance(record, dict):
        raise DatasetCorrupt(f"{data_path}: expected a dict, got {type(record).__name__}")
    pixels = _pixels(_field(record, b"data", data_path), data_path)
    key = f"{label_mode}_labels".encode()
    labels = _labels(_field(record, key, data_path), key, pixels.shape[0], len(class_names), data_path)
    # bound per call: a module-level logger would keep the config from import time
    get_logger(component="data.cifar").debug(
        "dataset_loaded", dataset="cifar100", split=split, samples=int(pixels.shape[0])
    )
    return ImageDataset(
        name="cifar100",
        split=split,
        # copy: frombuffer arrays are read-only views of the file bytes
        images=torch.from_numpy(pixels.copy()),
        labels=torch.from_numpy(labels),
        class_names=class_names,
    )
