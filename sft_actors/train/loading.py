"""From a plan's model description to the frozen model every part of the split shares.

Frozen models are loaded once per process and shared (see ``sft_actors.sharing``): in-process
devices and the server all reference the same base tensors. The share is per (model, dtype,
device): actors placed on one GPU share one copy there; a CUDA copy is loaded on the host and
moved once, never by moving the CPU copy other actors reference.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch

from sft_actors.dtypes import torch_dtype
from sft_actors.model import SplitLM, load_model, resolve_spec
from sft_actors.sharing import SHARED
from sft_actors.wire.plans import ModelPlan

Cache = Callable[[Hashable, Callable[[], Any]], Any]


def model_key(plan: ModelPlan, device: torch.device) -> tuple[str, ...]:
    """The share-cache key of ``plan``'s frozen model on ``device`` (CPU keeps the old key)."""
    dtype = str(torch_dtype(plan.dtype))
    if device.type == "cpu":
        return ("model", plan.model, dtype)
    return ("model", plan.model, dtype, str(device))


def load_shared_model(
    plan: ModelPlan, cache: Cache | None = None, device: torch.device | str = "cpu"
) -> SplitLM:
    """The frozen base model of ``plan`` in the plan's dtype on ``device``, loaded (and moved)
    once per process and (model, dtype, device) (thread-safe)."""
    get = cache or SHARED.get
    dtype = torch_dtype(plan.dtype)
    where = torch.device(device)

    def make() -> SplitLM:
        model = load_model(resolve_spec(plan.model), dtype=dtype)
        return model if where.type == "cpu" else model.to(where)

    model: SplitLM = get(model_key(plan, where), make)
    return model
