"""A deterministic, resumable batch iterator over one device's shard.

It cycles forever: each epoch visits every index of the shard once, in an order drawn from
``default_rng((seed, epoch))``. Deriving the order from ``(seed, epoch)`` instead of one running
generator means the position ``(epoch, batch)`` is the whole state: a restarted device resumes
with :meth:`ShardBatches.load_state_dict` and produces exactly the batches it would have.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypedDict

import numpy as np
import torch

from sft_actors.data.common import CollatableDataset
from sft_actors.errors import ConfigError


class BatchState(TypedDict):
    epoch: int
    batch: int


class ShardBatches(Iterator[dict[str, torch.Tensor]]):
    """Infinite batches of ``dataset.collate(indices)`` over the shard ``indices``.

    ``drop_last=True`` skips an epoch's final partial batch (every batch has ``batch_size``
    rows); ``False`` yields it. ``shuffle=False`` keeps the shard order (for evaluation).
    """

    def __init__(
        self,
        dataset: CollatableDataset,
        indices: np.ndarray | None = None,
        *,
        batch_size: int,
        seed: int,
        drop_last: bool = True,
        shuffle: bool = True,
    ) -> None:
        shard = (
            np.arange(len(dataset), dtype=np.int64)
            if indices is None
            else np.asarray(indices, dtype=np.int64)
        )
        if shard.ndim != 1 or shard.size == 0:
            raise ConfigError("a shard needs at least one sample index")
        if shard.min() < 0 or shard.max() >= len(dataset):
            raise ConfigError(f"shard indices fall outside the dataset's {len(dataset)} samples")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if drop_last and batch_size > shard.size:
            raise ConfigError(
                f"batch_size {batch_size} exceeds the shard's {shard.size} samples with drop_last=True; "
                "lower batch_size or set drop_last=False"
            )
        self.dataset = dataset
        self.shard = shard
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.shuffle = shuffle
        self._epoch = 0
        self._batch = 0
        self._order = self._epoch_order(0)

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.shard.size, self.batch_size)
        return full + int(rest > 0 and not self.drop_last)

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._epoch

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.shard
        return self.shard[np.random.default_rng((self.seed, epoch)).permutation(self.shard.size)]

    def next_indices(self) -> np.ndarray:
        """The dataset indices of the next batch (advances the iterator)."""
        if self._batch >= self.batches_per_epoch:
            self._epoch += 1
            self._batch = 0
            self._order = self._epoch_order(self._epoch)
        start = self._batch * self.batch_size
        self._batch += 1
        return self._order[start : start + self.batch_size]

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.dataset.collate(self.next_indices())

    def __iter__(self) -> ShardBatches:
        return self

    def state_dict(self) -> BatchState:
        return {"epoch": self._epoch, "batch": self._batch}

    def seek(self, batches_consumed: int) -> None:
        """Position the iterator as if ``batches_consumed`` batches had been drawn from a fresh
        one: the next batch is batch ``n % batches_per_epoch`` of epoch ``n // batches_per_epoch``.

        Raises :class:`ConfigError` for a negative count."""
        if batches_consumed < 0:
            raise ConfigError(f"cannot seek to {batches_consumed} batches consumed (must be >= 0)")
        epoch, batch = divmod(batches_consumed, self.batches_per_epoch)
        self._epoch, self._batch = epoch, batch
        self._order = self._epoch_order(epoch)

    def load_state_dict(self, state: BatchState) -> None:
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch <= self.batches_per_epoch:
            raise ConfigError(
                f"invalid batch iterator state {state}; batches per epoch: {self.batches_per_epoch}"
            )
        self._epoch, self._batch = epoch, batch
        self._order = self._epoch_order(epoch)
