"""Datasets in their native on-disk formats, device partitioning and batch iteration.

Pure: numpy and torch only, no actors, transport or runtime. The tokenizer for text corpora
is passed in. Nothing is ever downloaded; a missing dataset raises
:class:`~sft_actors.errors.DatasetNotFound` saying where to put which files.
"""

from sft_actors.data.batching import BatchState, ShardBatches
from sft_actors.data.common import CollatableDataset, LabelledDataset, canonical_split, heldout_split_indices
from sft_actors.data.images import NORMALIZATION_STATS, ImageDataset, ImageTransform, channel_stats
from sft_actors.data.instruct import Conversation, InstructionCorpus
from sft_actors.data.packing import IGNORE_INDEX, PackedSequences, Tokenizer, pack_token_streams
from sft_actors.data.partition import (
    dirichlet_partition,
    format_histogram,
    iid_partition,
    label_entropy,
    label_histogram,
    partition,
)
from sft_actors.data.registry import (
    DATASET_NAMES,
    Dataset,
    load_dataset,
    load_image_dataset,
    load_text_corpus,
)
from sft_actors.data.text import Document, TextCorpus, make_corpus

__all__ = [
    "DATASET_NAMES",
    "IGNORE_INDEX",
    "NORMALIZATION_STATS",
    "BatchState",
    "CollatableDataset",
    "Conversation",
    "Dataset",
    "Document",
    "ImageDataset",
    "ImageTransform",
    "InstructionCorpus",
    "LabelledDataset",
    "PackedSequences",
    "ShardBatches",
    "TextCorpus",
    "Tokenizer",
    "canonical_split",
    "channel_stats",
    "dirichlet_partition",
    "format_histogram",
    "heldout_split_indices",
    "iid_partition",
    "label_entropy",
    "label_histogram",
    "load_dataset",
    "load_image_dataset",
    "load_text_corpus",
    "make_corpus",
    "pack_token_streams",
    "partition",
]
