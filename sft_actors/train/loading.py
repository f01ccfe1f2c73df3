"""From a plan's model description to the frozen model every part of the split shares.

Frozen models are loaded once per process and shared (see ``sft_actors.sharing``): in-process
devices and the server all reference the same base tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from sft_actors.dtypes import torch_dtype
from sft_actors.model import SplitLM, load_model, resolve_spec
from sft_actors.sharing import SHARED
from sft_actors.wire.plans import ModelPlan

Cache = Callable[[Hashable, Callable[[], Any]], Any]


def load_shared_model(plan: ModelPlan, cache: Cache | None = None) -> SplitLM:
    """The frozen base model of ``plan``, loaded once per process (thread-safe)."""
    get = cache or SHARED.get
    dtype = torch_dtype(plan.dtype)
    model: SplitLM = get(
        ("model", plan.model, str(dtype)), lambda: load_model(resolve_spec(plan.model), dtype=dtype)
    )
    return model
