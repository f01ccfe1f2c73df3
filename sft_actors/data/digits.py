"""scikit-learn's handwritten digits: 1797 gray 8 × 8 images, 10 classes, shipped with sklearn.

The data has no official train/test split, so one is drawn here, seeded, from the whole set.
Pixel values are 0..16 in sklearn; they are rescaled to 0..255 uint8 so every image dataset in
this package looks the same to the transforms.
"""

from __future__ import annotations

import numpy as np
import torch

from sft_actors.data.common import TRAIN, canonical_split, heldout_split_indices
from sft_actors.data.images import ImageDataset

DIGITS_CLASSES = tuple(str(d) for d in range(10))


def load_digits(split: str = TRAIN, *, heldout_fraction: float = 0.2, seed: int = 0) -> ImageDataset:
    """The digits ``split`` as ``(N, 1, 8, 8)`` uint8; train and test are disjoint for one seed."""
    from sklearn.datasets import load_digits as sklearn_load_digits  # slow import, only when used

    split = canonical_split(split)
    bunch = sklearn_load_digits()
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = heldout_split_indices(len(labels), heldout_fraction, seed)
    idx = train_idx if split == TRAIN else test_idx
    return ImageDataset(
        name="digits",
        split=split,
        images=torch.from_numpy(images[idx]).unsqueeze(1),  # (N, 1, 8, 8)
        labels=torch.from_numpy(labels[idx]),
        class_names=DIGITS_CLASSES,
    )
