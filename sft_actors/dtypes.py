"""The one table of tensor dtypes by name (wire descriptors, codec frames, topology ``dtype``).

The names are part of the wire protocol: never rename one.
"""

from __future__ import annotations

from typing import Final

import torch

from sft_actors.errors import ConfigError

TORCH_DTYPES: Final[dict[str, torch.dtype]] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
#: Floating-point dtypes (what a codec chain encodes, what base weights may be).
FLOAT_DTYPES: Final[dict[str, torch.dtype]] = {
    name: dt for name, dt in TORCH_DTYPES.items() if dt.is_floating_point
}
DTYPE_NAMES: Final[dict[torch.dtype, str]] = {dt: name for name, dt in TORCH_DTYPES.items()}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name``; :class:`ConfigError` naming the choices otherwise."""
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; use one of {sorted(TORCH_DTYPES)}") from None
