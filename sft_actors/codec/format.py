"""What encoder and decoder share: the format version, dtype tables and the 2-D row view.

Both ``chain`` (encode) and ``decode`` import this module; ``decode`` never imports ``chain``,
so the receiver's side carries no encoder code and the two modules form no import cycle.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import torch

from sft_actors.codec.spec import SparsifySpec
from sft_actors.dtypes import FLOAT_DTYPES

#: Version written to (and required from) every codec metadata table.
FORMAT_VERSION: Final[int] = 1
#: Decode refuses metadata that would allocate more output elements than this (2^28).
DEFAULT_MAX_ELEMENTS: Final[int] = 1 << 28
#: Tensor dtype name in the metadata -> torch dtype: the package's one table, floats only (a
#: codec encodes floating-point tensors). Names are part of the format.
DTYPES: Final[dict[str, torch.dtype]] = FLOAT_DTYPES
DTYPE_NAMES: Final[dict[torch.dtype, str]] = {v: k for k, v in DTYPES.items()}
# Raw-bytes view of each dtype (numpy has no bfloat16).
RAW_VIEW: Final[dict[str, tuple[torch.dtype, type[np.generic]]]] = {
    "float32": (torch.int32, np.int32),
    "bfloat16": (torch.int16, np.int16),
    "float16": (torch.int16, np.int16),
    "float64": (torch.int64, np.int64),
}


def rows_view(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(tokens N, channels C, tokens per sequence T) of the 2-D view of a tensor of ``shape``."""
    if len(shape) == 0:
        return 1, 1, 1
    channels = shape[-1]
    numel = math.prod(shape)
    rows = numel // channels if channels else 0
    seq_len = shape[-2] if len(shape) >= 2 else rows
    return rows, channels, seq_len


def per_row_lo(s: SparsifySpec) -> bool:
    """Whether the sparsifier's threshold differs per row (then each row's ``lo`` is sent)."""
    return s.scope == "token" or s.score == "row_normalized"
