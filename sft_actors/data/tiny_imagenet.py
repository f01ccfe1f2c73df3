"""Tiny-ImageNet, read from the ``tiny-imagenet-200`` folder layout::

    <root>/tiny-imagenet-200/wnids.txt                      200 WordNet ids, one per line
    <root>/tiny-imagenet-200/words.txt                      "<wnid>\\t<names>" for (at least) those ids
    <root>/tiny-imagenet-200/train/<wnid>/images/*.JPEG     500 images per class, 64 × 64
    <root>/tiny-imagenet-200/val/images/*.JPEG              10000 images
    <root>/tiny-imagenet-200/val/val_annotations.txt        "<file>\\t<wnid>\\t<box>" per val image

The release's ``test/`` images carry no labels, so this loader's "test" split is ``val/``.
Labels index the *sorted* WordNet ids (the convention of folder-per-class loaders), so label
numbers do not depend on the order of lines in wnids.txt. Some images are stored as grayscale
JPEGs; all are converted to RGB. Decoding needs Pillow.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from sft_actors.data.common import TRAIN, canonical_split, require_dir, require_file
from sft_actors.data.images import ImageDataset
from sft_actors.errors import ConfigError, DatasetCorrupt
from sft_actors.log import get_logger

FOLDER = "tiny-imagenet-200"
IMAGE_SIZE = 64
_HOW = (
    "Download tiny-imagenet-200.zip (http://cs231n.stanford.edu/tiny-imagenet-200.zip) and unzip it "
    "so that {dir}/wnids.txt, {dir}/words.txt, {dir}/train/<wnid>/images/*.JPEG, {dir}/val/images/*.JPEG "
    "and {dir}/val/val_annotations.txt exist; then pass the parent folder as root."
)


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetCorrupt(f"{path}: not UTF-8 text ({exc})") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def _class_names(words_path: Path, wnids: Sequence[str]) -> tuple[str, ...]:
    words: dict[str, str] = {}
    for line in _read_lines(words_path):
        wnid, _, names = line.partition("\t")
        words[wnid] = names.split(",")[0].strip() or wnid
    missing = [w for w in wnids if w not in words]
    if missing:
        raise DatasetCorrupt(f"{words_path}: no names for {len(missing)} ids such as {missing[:3]}")
    return tuple(words[w] for w in wnids)


def _decode(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DatasetCorrupt(f"{path}: cannot decode the image ({exc}); re-extract the archive") from exc
    if rgb.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise DatasetCorrupt(f"{path}: image is {rgb.shape[1]}×{rgb.shape[0]}, Tiny-ImageNet's are 64×64")
    return rgb


def _decode_all(paths: Sequence[Path], workers: int) -> np.ndarray:
    """``(N, 3, 64, 64)`` uint8; Pillow releases the GIL while decoding, so threads help."""
    out = np.empty((len(paths), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, rgb in enumerate(pool.map(_decode, paths, chunksize=64)):
            out[i] = rgb.transpose(2, 0, 1)
    return out


def _train_items(folder: Path, wnids: Sequence[str], max_per_class: int | None) -> list[tuple[Path, int]]:
    items: list[tuple[Path, int]] = []
    for label, wnid in enumerate(wnids):
        images_dir = require_dir(folder / "train" / wnid / "images", "Tiny-ImageNet", _HOW.format(dir=folder))
        files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
        if not files:
            raise DatasetCorrupt(f"{images_dir}: no JPEG images for class {wnid}")
        items.extend((p, label) for p in files[:max_per_class])
    return items


def _val_items(folder: Path, wnids: Sequence[str], max_per_class: int | None) -> list[tuple[Path, int]]:
    annotations = require_file(
        folder / "val" / "val_annotations.txt", "Tiny-ImageNet", _HOW.format(dir=folder)
    )
    images_dir = require_dir(folder / "val" / "images", "Tiny-ImageNet", _HOW.format(dir=folder))
    index = {w: i for i, w in enumerate(wnids)}
    per_class = [0] * len(wnids)
    items: list[tuple[Path, int]] = []
    for lineno, line in enumerate(_read_lines(annotations), start=1):
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise DatasetCorrupt(
                f"{annotations}:{lineno}: expected '<file>\\t<wnid>\\t...' with a wnid "
                f"from wnids.txt, got {line[:80]!r}"
            )
        label = index[parts[1]]
        if max_per_class is not None and per_class[label] >= max_per_class:
            continue
        per_class[label] += 1
        items.append((images_dir / parts[0], label))
    items.sort(key=lambda item: item[0].name)
    return items


def load_tiny_imagenet(
    root: str | Path,
    split: str = TRAIN,
    *,
    max_per_class: int | None = None,
    workers: int | None = None,
) -> ImageDataset:
    """Tiny-ImageNet ``split`` ("train" or "test" = val) as ``(N, 3, 64, 64)`` uint8.

    ``max_per_class`` keeps the first images of each class in file-name order (the full train
    split is 100000 images, 1.2 GB, and takes a minute to decode). ``workers`` decoding threads
    default to the CPU count (at most 8).
    """
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise ConfigError("Tiny-ImageNet needs Pillow to decode JPEGs: `pip install pillow`") from None
    if max_per_class is not None and max_per_class < 1:
        raise ConfigError(f"max_per_class must be >= 1, got {max_per_class}")
    split = canonical_split(split)
    root_path = Path(root).expanduser()
    folder = root_path if root_path.name == FOLDER else root_path / FOLDER
    how = _HOW.format(dir=folder)
    require_dir(folder, "Tiny-ImageNet", how)
    wnids_path = require_file(folder / "wnids.txt", "Tiny-ImageNet", how)
    words_path = require_file(folder / "words.txt", "Tiny-ImageNet", how)
    wnids = sorted(set(_read_lines(wnids_path)))
    if not wnids:
        raise DatasetCorrupt(f"{wnids_path}: lists no WordNet ids")
    class_names = _class_names(words_path, wnids)

    items = (_train_items if split == TRAIN else _val_items)(folder, wnids, max_per_class)
    for path, _ in items:
        if not path.is_file():
            raise DatasetCorrupt(f"{path}: listed image is missing; re-extract the archive")
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    images = _decode_all([p for p, _ in items], workers)
    labels = np.fromiter((label for _, label in items), dtype=np.int64, count=len(items))
    # bound per call: a module-level logger would keep the config from import time
    get_logger(component="data.tiny_imagenet").debug(
        "dataset_loaded", dataset="tiny-imagenet", split=split, samples=len(items)
    )
    return ImageDataset(
        name="tiny-imagenet",
        split=split,
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels),
        class_names=class_names,
    )
