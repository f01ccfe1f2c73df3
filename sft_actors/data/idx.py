"""IDX files (the MNIST family's format) and the Fashion-MNIST loader built on them.

An IDX file is a 4-byte magic number ``00 00 <type> <ndim>``, then ``ndim`` big-endian uint32
dimensions, then the values in row-major order. Fashion-MNIST ships four gzipped IDX files;
Debian's ``dataset-fashion-mnist`` package installs them under
``/usr/share/datasets/fashion-mnist``, which is the default root. Every check that fails names
the file and what was expected, because a truncated download is the usual cause.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from sft_actors.data.common import TEST, TRAIN, canonical_split, require_dir
from sft_actors.data.images import ImageDataset
from sft_actors.errors import DatasetCorrupt, DatasetNotFound
from sft_actors.log import get_logger

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    TRAIN: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    TEST: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_HOW = (
    "Install Debian's package (`apt-get install dataset-fashion-mnist`, which puts the files in "
    f"{FASHION_MNIST_ROOT}), or put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (from "
    "https://github.com/zalandoresearch/fashion-mnist) in one folder and pass it as root."
)
# IDX type code → numpy dtype (big-endian, as the format specifies).
_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# A decompressed IDX file larger than this is refused rather than exhausting memory.
_MAX_IDX_BYTES = 2 << 30


def _read_maybe_gzip(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            data = f.read(_MAX_IDX_BYTES + 1)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DatasetCorrupt(f"{path}: not a valid gzip file ({exc}); re-download or reinstall it") from exc
    if len(data) > _MAX_IDX_BYTES:
        raise DatasetCorrupt(f"{path}: decompresses to more than {_MAX_IDX_BYTES} bytes")
    return data


def read_idx(
    path: str | Path, *, expect_ndim: int | None = None, expect_type: int | None = 0x08
) -> np.ndarray:
    """The array stored in an IDX file (gzipped when the name ends in ``.gz``), native byte order.

    ``expect_ndim``/``expect_type`` (the magic's 4th and 3rd byte) are checked when given.
    """
    path = Path(path)
    data = _read_maybe_gzip(path)
    if len(data) < 4:
        raise DatasetCorrupt(f"{path}: {len(data)} bytes is too short for an IDX header")
    zero0, zero1, type_code, ndim = data[0], data[1], data[2], data[3]
    if zero0 or zero1 or type_code not in _IDX_TYPES:
        raise DatasetCorrupt(f"{path}: bad IDX magic number {data[:4].hex()} (expected 0000<type><ndim>)")
    if expect_type is not None and type_code != expect_type:
        raise DatasetCorrupt(f"{path}: IDX value type 0x{type_code:02x}, expected 0x{expect_type:02x}")
    if expect_ndim is not None and ndim != expect_ndim:
        raise DatasetCorrupt(f"{path}: IDX file has {ndim} dimensions, expected {expect_ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetCorrupt(f"{path}: truncated IDX header ({len(data)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_TYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetCorrupt(
            f"{path}: IDX dimensions {dims} need {expected} bytes of values, the file holds "
            f"{len(data) - header}; the file is truncated or corrupt"
        )
    values = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return values.astype(dtype.newbyteorder("="), copy=True)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DatasetNotFound(f"Fashion-MNIST: file {root / (stem + '.gz')} is missing. {_HOW}")


def load_fashion_mnist(root: str | Path | None = None, split: str = TRAIN) -> ImageDataset:
    """Fashion-MNIST ``split`` ("train": 60000, "test": 10000) as ``(N, 1, 28, 28)`` uint8."""
    split = canonical_split(split)
    folder = require_dir(
        Path(root).expanduser() if root is not None else FASHION_MNIST_ROOT, "Fashion-MNIST", _HOW
    )
    images_stem, labels_stem = _FILES[split]
    images_path, labels_path = _find(folder, images_stem), _find(folder, labels_stem)
    images = read_idx(images_path, expect_ndim=3)
    labels = read_idx(labels_path, expect_ndim=1)
    if images.shape[1:] != (28, 28):
        raise DatasetCorrupt(f"{images_path}: images are {images.shape[1:]}, Fashion-MNIST's are (28, 28)")
    if images.shape[0] != labels.shape[0]:
        raise DatasetCorrupt(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels"
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DatasetCorrupt(f"{labels_path}: labels outside [0, {len(FASHION_MNIST_CLASSES)})")
    # bound per call: a module-level logger would keep the config from import time
    get_logger(component="data.idx").debug(
        "dataset_loaded", dataset="fashion-mnist", split=split, samples=int(images.shape[0])
    )
    return ImageDataset(
        name="fashion-mnist",
        split=split,
        images=torch.from_numpy(images).unsqueeze(1),  # (N, 1, 28, 28)
        labels=torch.from_numpy(labels.astype(np.int64)),
        class_names=FASHION_MNIST_CLASSES,
    )
