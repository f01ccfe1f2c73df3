"""From a topology's ``[run]`` settings to the objects training needs (model, LoRA, data).

Frozen models are loaded once per process and shared (see ``sft_actors.sharing``): in-process
devices and the server all reference the same base tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch

from sft_actors.errors import ConfigError
from sft_actors.train.data_setup import DataSettings

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}") from None


def load_shared_model(
    spec: str, dtype: torch.dtype, cache: Callable[[Hashable, Callable[[], Any]], Any] | None = None
) -> Any:
    """The frozen model for ``spec``, loaded once per process (thread-safe)."""
    from sft_actors.model import load_model, resolve_spec
    from sft_actors.sharing import SHARED

    get = cache or SHARED.get
    return get(("model", spec, str(dtype)), lambda: load_model(resolve_spec(spec), dtype=dtype))


def lora_config(cfg: Any) -> Any:
    """The model layer's LoraConfig from the topology's ``[run.lora]`` table."""
    from sft_actors.model import LoraConfig

    return LoraConfig(
        rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, targets=tuple(cfg.targets), mlp=cfg.mlp
    )


def data_settings(run: Any) -> DataSettings:
    d, t = run.data, run.train
    return DataSettings(
        dataset=d.dataset,
        root=d.root,
        partition=d.partition,
        alpha=d.alpha,
        heldout_fraction=d.heldout_fraction,
        options=dict(getattr(d, "options", {}) or {}),
        batch_size=t.batch_size,
        seq_len=t.seq_len,
        eval_batches=t.eval_batches,
        seed=run.seed,
    )
