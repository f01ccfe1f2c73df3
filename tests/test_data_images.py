"""Image loaders on generated files in the real formats (Tiny-ImageNet folders with real JPEGs,
gzipped IDX), on the real Fashion-MNIST and digits data, and the ViT transforms."""

from __future__ import annotations

import gzip
import re
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sft_actors.data import NORMALIZATION_STATS, ImageTransform, channel_stats, load_image_dataset
from sft_actors.data.idx import FASHION_MNIST_ROOT, load_fashion_mnist, read_idx
from sft_actors.data.tiny_imagenet import load_tiny_imagenet
from sft_actors.errors import ConfigError, DatasetCorrupt, DatasetNotFound

# ---------------------------------------------------------------- Tiny-ImageNet

WNIDS = ["n09999999", "n01443537", "n02085620"]  # deliberately unsorted, as in the release
COLORS = {"n01443537": (200, 30, 30), "n02085620": (30, 200, 30), "n09999999": (30, 30, 200)}


def _jpeg(path: Path, color: tuple[int, int, int], *, gray: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (64, 64), color)
    (img.convert("L") if gray else img).save(path, format="JPEG", quality=95)


def write_tiny_imagenet(root: Path, per_class: int = 3) -> Path:
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    words = [
        "n00000001\tentity",
        "n01443537\tgoldfish, Carassius auratus",
        "n02085620\tChihuahua",
        "n09999999\tvolcano",
    ]
    (folder / "words.txt").write_text("\n".join(words) + "\n")
    for wnid in WNIDS:
        for k in range(per_class):
            _jpeg(folder / "train" / wnid / "images" / f"{wnid}_{k}.JPEG", COLORS[wnid])
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    annotations = []
    for k, wnid in enumerate(WNIDS * 2):
        _jpeg(folder / "val" / "images" / f"val_{k}.JPEG", COLORS[wnid], gray=(k == 0))
        annotations.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    return folder


def test_tiny_imagenet_train_and_val_from_real_jpegs(tmp_path: Path) -> None:
    write_tiny_imagenet(tmp_path)
    train = load_tiny_imagenet(tmp_path, "train", workers=2)
    assert train.images.shape == (9, 3, 64, 64) and train.images.dtype == torch.uint8
    # labels index the sorted wnids; names are the first synonym from words.txt
    assert train.class_names == ("goldfish", "Chihuahua", "volcano")
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for i, label in enumerate(train.labels.tolist()):
        wnid = sorted(WNIDS)[label]
        mean_rgb = train.images[i].float().mean(dim=(1, 2))
        assert torch.allclose(mean_rgb, torch.tensor(COLORS[wnid], dtype=torch.float32), atol=6)

    val = load_image_dataset("tiny-imagenet", str(tmp_path), "val")  # "test" and "val" both mean val/
    assert len(val) == 6 and val.split == "test"
    assert sorted(val.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    gray = val.images[val.labels.tolist().index(2)]  # val_0 was saved as a 1-channel JPEG
    assert gray.shape == (3, 64, 64) and torch.equal(gray[0], gray[1])

    capped = load_tiny_imagenet(tmp_path / "tiny-imagenet-200", "train", max_per_class=1)
    assert capped.labels.tolist() == [0, 1, 2]


def test_tiny_imagenet_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound, match=r"tiny-imagenet-200.*wnids\.txt.*val_annotations\.txt"):
        load_tiny_imagenet(tmp_path, "train")
    folder = write_tiny_imagenet(tmp_path, per_class=1)
    bad = folder / "train" / "n02085620" / "images" / "n02085620_0.JPEG"
    bad.write_bytes(b"\xff\xd8 this is not really a jpeg")
    with pytest.raises(DatasetCorrupt, match=re.escape(str(bad))):
        load_tiny_imagenet(tmp_path, "train")
    (folder / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn00000000\t0\t0\t1\t1\n")
    with pytest.raises(DatasetCorrupt, match=r"val_annotations\.txt:1"):
        load_tiny_imagenet(tmp_path, "test")
    (folder / "words.txt").unlink()
    with pytest.raises(DatasetNotFound, match=r"words\.txt"):
        load_tiny_imagenet(tmp_path, "test")


def test_tiny_imagenet_refuses_images_of_the_wrong_size(tmp_path: Path) -> None:
    folder = write_tiny_imagenet(tmp_path, per_class=1)
    odd = folder / "train" / "n01443537" / "images" / "n01443537_0.JPEG"
    Image.new("RGB", (32, 32)).save(odd, format="JPEG")
    with pytest.raises(DatasetCorrupt, match="64×64"):
        load_tiny_imagenet(tmp_path, "train")


# ---------------------------------------------------------------- IDX / Fashion-MNIST


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion_mnist(
    folder: Path, n_train: int = 7, n_test: int = 3
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    made = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images)))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels)))
        made[split] = (images, labels)
    return made


def test_fashion_mnist_from_generated_idx_gz(tmp_path: Path) -> None:
    made = write_fashion_mnist(tmp_path)
    for split in ("train", "test"):
        ds = load_fashion_mnist(tmp_path, split)
        images, labels = made[split]
        assert ds.images.shape == (len(labels), 1, 28, 28)
        assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
        assert ds.labels.tolist() == labels.tolist() and ds.labels.dtype == torch.int64
    # uncompressed IDX files are accepted too
    raw = tmp_path / "raw"
    raw.mkdir()
    for gz in tmp_path.glob("*.gz"):
        (raw / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
    assert torch.equal(load_fashion_mnist(raw, "test").images, load_fashion_mnist(tmp_path, "test").images)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda b: b"\x01\x00" + b[2:], "bad IDX magic"),
        (lambda b: b[:2] + b"\x0d" + b[3:], "value type 0x0d"),
        (lambda b: b[:3] + b"\x02" + b[4:], "2 dimensions, expected 3"),
        (lambda b: b[:-5], "truncated or corrupt"),
        (lambda b: b + b"\x00", "truncated or corrupt"),
        (lambda b: b[:6], "truncated IDX header"),
    ],
)
def test_corrupt_idx_is_a_typed_error_naming_the_file(
    tmp_path: Path, damage: Callable[[bytes], bytes], match: str
) -> None:
    write_fashion_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(damage(gzip.decompress(path.read_bytes()))))
    with pytest.raises(DatasetCorrupt, match=match) as info:
        load_fashion_mnist(tmp_path, "train")
    assert str(path) in str(info.value)


def test_fashion_mnist_other_failures(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nowhere", "train")
    write_fashion_mnist(tmp_path)
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(b"not gzip at all")
    with pytest.raises(DatasetCorrupt, match=r"t10k-images-idx3-ubyte\.gz: not a valid gzip"):
        load_fashion_mnist(tmp_path, "test")
    write_fashion_mnist(tmp_path, n_test=4)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros(3, np.uint8))))
    with pytest.raises(DatasetCorrupt, match=r"4 images but .* 3 labels"):
        load_fashion_mnist(tmp_path, "test")
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFound, match=r"train-labels-idx1-ubyte\.gz"):
        load_fashion_mnist(tmp_path, "train")


def test_real_fashion_mnist_from_debian_package() -> None:
    train = load_image_dataset("fashion-mnist", split="train")
    test = load_fashion_mnist(FASHION_MNIST_ROOT, "test")
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert np.bincount(train.label_array()).tolist() == [6000] * 10
    assert len(train.class_names) == 10 and train.class_names[9] == "Ankle boot"
    assert channel_stats(train.images) == NORMALIZATION_STATS["fashion-mnist"]
    assert read_idx(FASHION_MNIST_ROOT / "t10k-labels-idx1-ubyte.gz", expect_ndim=1).shape == (10000,)


# ---------------------------------------------------------------- digits and transforms


def test_real_digits_split_is_disjoint_and_complete() -> None:
    train = load_image_dataset("digits", split="train", seed=3)
    test = load_image_dataset("digits", split="test", seed=3)
    assert len(train) + len(test) == 1797 and len(test) == round(1797 * 0.2)
    assert train.images.shape[1:] == (1, 8, 8) and int(train.images.max()) == 255
    rows = {bytes(img.numpy()) for img in torch.cat([train.images, test.images])}
    assert len(rows) > 1700  # (a few digits images are duplicates in sklearn's data itself)
    whole = load_image_dataset("digits", heldout_fraction=0.0)
    assert channel_stats(whole.images) == NORMALIZATION_STATS["digits"]
    assert load_image_dataset("digits", split="test", seed=4).labels.tolist() != test.labels.tolist()


def test_for_vit_batches_have_the_requested_shape_and_are_normalized() -> None:
    digits = load_image_dataset("digits")
    batch = digits.for_vit(size=32, channels=3).collate(np.arange(256))
    assert batch["pixel_values"].shape == (256, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.int64
    x = batch["pixel_values"]
    assert abs(float(x.mean())) < 0.15 and 0.8 < float(x.std()) < 1.2
    assert torch.equal(x[:, 0], x[:, 2])  # gray repeated into RGB


def test_transform_steps() -> None:
    rgb = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    rgb[:, 0] = 255  # pure red
    gray = ImageTransform(channels=1)(rgb)
    assert gray.shape == (1, 1, 4, 4) and torch.allclose(gray, torch.full_like(gray, 0.299))
    up = ImageTransform(size=8)(rgb)
    assert up.shape == (1, 3, 8, 8) and torch.allclose(up[:, 0], torch.ones(1, 8, 8))
    norm = ImageTransform(mean=(0.5,), std=(0.25,))(rgb)
    assert torch.allclose(norm[:, 0], torch.full((1, 4, 4), 2.0)) and torch.allclose(
        norm[:, 1], torch.tensor(-2.0)
    )
    with pytest.raises(ConfigError):
        ImageTransform(mean=(0.5,))
    with pytest.raises(ConfigError, match="3 channels"):
        ImageTransform(mean=(0.1, 0.2), std=(1.0, 1.0))(rgb)
