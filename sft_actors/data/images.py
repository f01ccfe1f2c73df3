"""Image datasets held as uint8 tensors, and the transforms a ViT needs to consume them.

Every image loader returns an :class:`ImageDataset`: ``images`` is ``(N, C, H, W)`` uint8 in
the dataset's native resolution and channel count, ``labels`` is ``(N,)`` int64. Keeping uint8
in memory costs a quarter of float32 (Fashion-MNIST: 47 MB instead of 188 MB), and the float
conversion, channel change, resize and normalization happen per batch in :meth:`collate`,
as described by the dataset's :class:`ImageTransform`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from sft_actors.errors import ConfigError

# Per-channel mean/std of each training set, on pixel values scaled to [0, 1]. The test
# suite recomputes the Fashion-MNIST and digits values from the real data.
NORMALIZATION_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny-imagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "digits": ((0.3053,), (0.3759,)),  # all 1797 images (no official train split)
}

# ITU-R BT.601 luma weights, for turning RGB into one channel.
_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageTransform:
    """What :meth:`ImageDataset.collate` does to a uint8 batch, in this order.

    1. scale to float32 in ``[0, 1]``;
    2. ``channels``: 1 → 3 repeats the gray channel, 3 → 1 takes BT.601 luma (None: keep);
    3. ``size``: bilinear resize to ``size × size``, antialiased when shrinking (None: keep);
       done at the smaller channel count, which gives the same result more cheaply;
    4. ``mean``/``std``: per-channel normalization (None: stay in ``[0, 1]``). One value is
       broadcast to every channel.
    """

    size: int | None = None
    channels: Literal[1, 3] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.size is not None and self.size < 1:
            raise ConfigError(f"ImageTransform.size must be >= 1, got {self.size}")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"ImageTransform.channels must be 1, 3 or None, got {self.channels}")
        if (self.mean is None) != (self.std is None):
            raise ConfigError("ImageTransform needs both mean and std, or neither")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ConfigError(f"ImageTransform.std must be positive, got {self.std}")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` uint8 → ``(B, C', size, size)`` float32."""
        x = to_float(images)
        # Resize at the smaller channel count: 1 → 3 expands after resizing, 3 → 1 reduces before.
        expand = self.channels is not None and self.channels > x.shape[1]
        if self.channels is not None and not expand:
            x = convert_channels(x, self.channels)
        if self.size is not None:
            x = resize(x, self.size)
        if self.channels is not None and expand:
            x = convert_channels(x, self.channels)
        if self.mean is not None and self.std is not None:
            x = normalize(x, self.mean, self.std)
        return x


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` → float32 in ``[0, 1]``; float input is returned as float32."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images.to(torch.float32)


def convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """``(B, C, H, W)`` float → ``(B, channels, H, W)``; supports 1 ↔ 3."""
    have = x.shape[1]
    if have == channels:
        return x
    if have == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    if have == 3 and channels == 1:
        weights = torch.tensor(_LUMA, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * weights).sum(dim=1, keepdim=True)
    raise ConfigError(f"cannot convert images with {have} channels to {channels}; supported: 1 <-> 3")


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, C, H, W)`` float → ``(B, C, size, size)``, bilinear with antialiasing when shrinking."""
    if x.shape[-2:] == (size, size):
        return x
    shrinking = size < x.shape[-2] or size < x.shape[-1]  # antialiasing only matters then, and costs
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Per-channel ``(x - mean) / std`` on ``(B, C, H, W)``; a single value applies to all channels."""
    channels = x.shape[1]
    if len(mean) not in (1, channels) or len(std) not in (1, channels):
        raise ConfigError(f"mean/std have {len(mean)}/{len(std)} values for images with {channels} channels")
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 ``(N, C, H, W)`` images scaled to [0, 1] (chunked, float64)."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageDataset:
    """A split of an image dataset: uint8 images, int64 labels, class names, a batch transform."""

    name: str
    split: str
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    class_names: tuple[str, ...]
    transform: ImageTransform = field(default_factory=ImageTransform)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ConfigError(
                f"{self.name}: images must be (N, C, H, W) uint8, got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ConfigError(
                f"{self.name}: labels must be (N,) int64 matching {self.images.shape[0]} images"
            )
        if len(self) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < len(self.class_names):
            raise ConfigError(f"{self.name}: labels fall outside [0, {len(self.class_names)})")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` as stored."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def label_array(self) -> np.ndarray:
        return self.labels.numpy().copy()

    def with_transform(self, transform: ImageTransform) -> ImageDataset:
        """The same data (shared, not copied) with another batch transform."""
        return replace(self, transform=transform)

    def for_vit(self, *, size: int, channels: Literal[1, 3]) -> ImageDataset:
        """Batches resized to ``size`` with ``channels`` channels, normalized with this dataset's stats."""
        mean, std = NORMALIZATION_STATS.get(self.name, ((0.5,), (0.5,)))
        if len(mean) != channels:  # stats were measured at the native channel count
            mean, std = (float(np.mean(mean)),) * channels, (float(np.mean(std)),) * channels
        return self.with_transform(ImageTransform(size=size, channels=channels, mean=mean, std=std))

    def subset(self, indices: np.ndarray) -> ImageDataset:
        """A dataset holding only ``indices`` (copied, so shards do not pin the whole tensor)."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return replace(self, images=self.images[idx].clone(), labels=self.labels[idx].clone())

    def collate(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """``{"pixel_values": (B, C', S, S) float32, "labels": (B,) int64}`` for ``indices``."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return {"pixel_values": self.transform(self.images[idx]), "labels": self.labels[idx]}

    def describe(self) -> dict[str, object]:
        """Sizes for logs and the CLI."""
        counts = np.bincount(self.labels.numpy(), minlength=len(self.class_names))
        return {
            "name": self.name,
            "split": self.split,
            "samples": len(self),
            "image_shape": self.image_shape,
            "classes": len(self.class_names),
            "min_per_class": int(counts.min()) if counts.size else 0,
            "max_per_class": int(counts.max()) if counts.size else 0,
            "bytes": self.images.numel(),
        }
