"""Turn tokenized documents into fixed-length causal-LM sequences.

Documents are concatenated with ``eos_id`` after each one and the stream is cut into rows of
``seq_len`` tokens (the "group texts" recipe): no tokens are wasted on padding except in the
last row. ``labels`` equal ``input_ids`` — the model shifts them by one itself — except that
right padding of the last, partial row is ``-100`` (PyTorch's ``ignore_index``). With
``drop_remainder=True`` the partial row is dropped instead (so is a partial row of a single
token, which has nothing to predict). Because padding is only ever on the
right and attention is causal, no attention mask is needed: real tokens never attend to pads.

The tokenizer is passed in (``Callable[[str], list[int]]``), so this layer does not depend on
any model package.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sft_actors.errors import ConfigError

Tokenizer = Callable[[str], list[int]]
IGNORE_INDEX = -100


@dataclass(frozen=True, kw_only=True, slots=True)
class PackedSequences:
    """Rows of ``seq_len`` tokens ready for a causal LM."""

    input_ids: torch.Tensor  # (N, T) int64
    labels: torch.Tensor  # (N, T) int64; IGNORE_INDEX at right padding
    num_tokens: int  # real tokens (EOS included), padding excluded

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def collate(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """``{"input_ids": (B, T), "labels": (B, T)}`` int64 for ``indices``."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return {"input_ids": self.input_ids[idx], "labels": self.labels[idx]}


def pack_token_streams(
    streams: Iterable[Sequence[int]],
    *,
    eos_id: int,
    seq_len: int,
    pad_id: int | None = None,
    drop_remainder: bool = False,
) -> PackedSequences:
    """Pack per-document token lists (each followed by ``eos_id``) into ``seq_len`` rows.

    ``pad_id`` fills the last row's tail (default ``eos_id``; its labels are ``IGNORE_INDEX``
    whatever the id). Raises :class:`ConfigError` when nothing is left to train on.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2 for next-token prediction, got {seq_len}")
    if eos_id < 0:
        raise ConfigError(f"eos_id must be a non-negative token id, got {eos_id}")
    pad = eos_id if pad_id is None else pad_id
    pieces: list[np.ndarray] = []
    for tokens in streams:
        arr = np.asarray(tokens, dtype=np.int64)
        if arr.ndim != 1:
            raise ConfigError("the tokenizer must return a flat list of ints per document")
        if arr.size and arr.min() < 0:
            raise ConfigError("the tokenizer returned a negative token id")
        pieces.extend((arr, np.array([eos_id], dtype=np.int64)))
    stream = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)
    full_rows, remainder = divmod(stream.size, seq_len)
    keep_partial = remainder >= 2 and not drop_remainder
    rows = full_rows + int(keep_partial)
    if rows == 0:
        raise ConfigError(
            f"{stream.size} tokens do not fill one sequence of {seq_len}; add text, shorten seq_len "
            "or set drop_remainder=False"
        )
    input_ids = np.full((rows, seq_len), pad, dtype=np.int64)
    labels = np.full((rows, seq_len), IGNORE_INDEX, dtype=np.int64)
    used = full_rows * seq_len + (remainder if keep_partial else 0)
    input_ids.reshape(-1)[:used] = stream[:used]
    labels.reshape(-1)[:used] = stream[:used]
    return PackedSequences(
        input_ids=torch.from_numpy(input_ids), labels=torch.from_numpy(labels), num_tokens=int(used)
    )
