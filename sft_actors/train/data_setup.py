"""What one device trains and evaluates on: its shard of the training split, its share of held-out.

Every device derives the same partition independently (same dataset, same seed), then keeps
shard ``shard``; nothing but the shard index crosses the network. Text corpora are partitioned
by *document* (IID, or Dirichlet over the source package of each document), then each device
packs its documents into ``seq_len`` token sequences with the model's own tokenizer.
Instruction data (``kind = "instruction"``) is partitioned by conversation and encoded one
conversation per row, rendered with the model's chat template, labels on responses only
(:mod:`sft_actors.data.instruct`). Image datasets are partitioned by sample over their labels.

Held-out evaluation is split across devices (device *i* of *n* takes batches i, i+n, …), so a
run's evaluation uses every device's path through the model and costs each device ``1/n``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sft_actors.data import (
    ImageDataset,
    InstructionCorpus,
    ShardBatches,
    TextCorpus,
    label_histogram,
    load_dataset,
    partition,
)
from sft_actors.data.instruct import resolve_chat_template
from sft_actors.errors import ConfigError
from sft_actors.wire.plans import DataPlan

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, labels)
Cache = Callable[[Hashable, Callable[[], Any]], Any]


def _no_cache(key: Hashable, make: Callable[[], Any]) -> Any:
    return make()


@dataclass(kw_only=True, slots=True)
class DeviceData:
    train: ShardBatches
    heldout: list[Batch]  # this device's share of the fixed held-out batches
    n_train_samples: int  # sequences (text) or images in the shard
    label_histogram: list[int]


def _split(batch: dict[str, torch.Tensor]) -> Batch:
    inputs = batch["input_ids"] if "input_ids" in batch else batch["pixel_values"]
    return inputs, batch["labels"]


class BatchIterator:
    """Adapts :class:`ShardBatches` (dicts) to ``(inputs, labels)`` pairs."""

    def __init__(self, batches: ShardBatches) -> None:
        self.batches = batches

    def __next__(self) -> Batch:
        return _split(next(self.batches))


def _load(s: DataPlan, split: str, cache: Cache) -> Any:
    key = ("dataset", s.dataset, s.root, split, s.heldout_fraction, s.seed, tuple(sorted(s.options.items())))

    def make() -> Any:
        opts = dict(s.options)
        if not s.dataset.startswith(("cifar100", "tiny-imagenet", "fashion-mnist")):
            opts.setdefault("heldout_fraction", s.heldout_fraction)
            opts.setdefault("seed", s.seed)
        return load_dataset(s.dataset, s.root, split, **opts)

    return cache(key, make)


def build_device_data(
    s: DataPlan,
    *,
    model: Any,
    num_devices: int,
    shard: int,
    cache: Cache = _no_cache,
) -> DeviceData:
    """Shard ``shard`` of ``num_devices`` for a model (``model.family`` "llama" or "vit")."""
    if not 0 <= shard < num_devices:
        raise ConfigError(f"shard {shard} is outside [0, {num_devices})")
    train = _load(s, "train", cache)
    test = _load(s, "test", cache)
    alpha = s.alpha if s.partition == "dirichlet" else None
    labels = train.label_array()
    parts = cache(
        ("partition", id(train), num_devices, alpha, s.seed),
        lambda: partition(labels, num_devices, alpha=alpha, seed=s.seed),
    )
    mine = np.sort(parts[shard])
    hist = label_histogram(labels, [mine], len(train.class_names))[0].tolist()
    if isinstance(train, TextCorpus | InstructionCorpus):
        if model.family != "llama":
            raise ConfigError(f"dataset {s.dataset!r} is text; model family {model.family!r} needs images")
        tok = model.tokenizer
        if tok is None:
            raise ConfigError(
                f"dataset {s.dataset!r} is text but model {getattr(model, 'name', '')!r} has no tokenizer; "
                "put its tokenizer.json in the model's folder"
            )
    if isinstance(train, InstructionCorpus):
        template = resolve_chat_template(train.chat_template, tok)

        def encode(corpus: InstructionCorpus) -> Any:
            return corpus.encode(tok, seq_len=s.seq_len, template=template).sequences

        packed = encode(train.subset(mine))
        heldout_set = cache(("instruct-heldout", id(test), id(tok), s.seq_len), lambda: encode(test))
    elif isinstance(train, TextCorpus):
        eos = tok.eos_id if tok.eos_id is not None else tok.pad_id

        def pack(corpus: TextCorpus) -> Any:
            return corpus.pack(tok.encode, eos_id=eos, seq_len=s.seq_len, pad_id=tok.pad_id)

        packed = pack(train.subset(mine))
        heldout_set = cache(("packed-heldout", id(test), id(tok), s.seq_len), lambda: pack(test))
    elif isinstance(train, ImageDataset):
        if model.family != "vit":
            raise ConfigError(f"dataset {s.dataset!r} holds images; model family {model.family!r} needs text")
        size, chans = model.config.image_size, model.config.in_chans
        packed = train.subset(mine).for_vit(size=size, channels=chans)
        heldout_set = cache(
            ("vit-heldout", id(test), size, chans), lambda: test.for_vit(size=size, channels=chans)
        )
    else:  # pragma: no cover - load_dataset returns one of the two
        raise ConfigError(f"unsupported dataset type {type(train).__name__}")
    if len(packed) == 0:
        raise ConfigError(f"shard {shard} of {s.dataset!r} is empty: use fewer devices or a larger dataset")
    batches = ShardBatches(
        packed, batch_size=s.batch_size, seed=s.seed * 1000 + shard, drop_last=len(packed) >= s.batch_size
    )
    n_eval = min(s.eval_batches, -(-len(heldout_set) // s.batch_size))
    heldout = []
    for b in range(shard, n_eval, num_devices):
        idx = np.arange(b * s.batch_size, min((b + 1) * s.batch_size, len(heldout_set)))
        heldout.append(_split(heldout_set.collate(idx)))
    return DeviceData(train=batches, heldout=heldout, n_train_samples=len(packed), label_histogram=hist)
