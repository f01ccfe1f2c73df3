"""What one actor needs to continue exactly: named tensors and integer counters.

A trainer's state is flat, so it crosses the wire (STATE_REPORT / RESTORE) and lands in a
safetensors file as it is: trainable parameters under ``param.<name>``, the optimizer's
per-parameter state under ``optim.<name>.<entry>`` (AdamW: ``exp_avg``, ``exp_avg_sq`` and the
0-d ``step``), and counters (steps done, samples since the last averaging) as ints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from sft_actors.errors import CheckpointError

PARAM_PREFIX = "param."
OPTIM_PREFIX = "optim."


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainerState:
    """One actor's state between rounds: ``tensors`` (CPU, contiguous, not sharing storage)
    and ``counters`` (non-negative ints such as ``step`` or ``batches_done``)."""

    tensors: dict[str, torch.Tensor]
    counters: dict[str, int]


def counter(state: TrainerState, name: str) -> int:
    """``state.counters[name]``; raises :class:`CheckpointError` when it is missing or negative."""
    value = state.counters.get(name)
    if not isinstance(value, int) or value < 0:
        raise CheckpointError(f"the state has no valid counter {name!r} (got {value!r})")
    return value


def param_tensors(
    params: Mapping[str, torch.nn.Parameter], prefix: str = PARAM_PREFIX
) -> dict[str, torch.Tensor]:
    """Detached CPU copies of ``params`` under ``f"{prefix}{name}"``."""
    return {f"{prefix}{name}": p.detach().to("cpu", copy=True) for name, p in params.items()}


@torch.no_grad()
def load_param_tensors(
    params: Mapping[str, torch.nn.Parameter],
    tensors: Mapping[str, torch.Tensor],
    prefix: str = PARAM_PREFIX,
) -> None:
    """Copy ``tensors[f"{prefix}{name}"]`` into every parameter, in place.

    Raises :class:`CheckpointError` naming the key when a parameter is missing, a key names no
    parameter, or a shape or dtype differs; nothing is copied then."""
    given = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    unknown = sorted(set(given) - set(params))
    if unknown:
        raise CheckpointError(f"state tensor {prefix}{unknown[0]} names no trainable parameter here")
    for name, p in params.items():
        t = given.get(name)
        if t is None:
            raise CheckpointError(f"the state lacks {prefix}{name}")
        _check_like(f"{prefix}{name}", t, p.shape, p.dtype)
    for name, p in params.items():
        p.copy_(given[name])


def optimizer_tensors(
    optimizer: torch.optim.Optimizer,
    params: Mapping[str, torch.nn.Parameter],
    prefix: str = OPTIM_PREFIX,
) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state, flat: ``f"{prefix}{name}.{entry}"`` → a CPU copy
    (AdamW: ``exp_avg`` and ``exp_avg_sq`` shaped like the parameter, ``step`` 0-d float32).

    A parameter with no state yet (never stepped) is left out; a numeric non-tensor entry is
    stored as a 0-d tensor."""
    out: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        for entry, value in optimizer.state.get(p, {}).items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            out[f"{prefix}{name}.{entry}"] = t.detach().to("cpu", copy=True)
    return out


def _required_entries(optimizer: torch.optim.Optimizer, group: dict[str, object]) -> set[str]:
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if group.get("amsgrad") else set())
    return set()


def _check_like(key: str, t: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> None:
    if t.shape != shape or t.dtype != dtype:
        raise CheckpointError(
            f"state tensor {key} is {t.dtype} {tuple(t.shape)}, expected {dtype} {tuple(shape)}: "
            "the checkpoint is from another model, LoRA or split"
        )


def _group_of(optimizer: torch.optim.Optimizer) -> dict[torch.Tensor, dict[str, object]]:
    return {p: g for g in optimizer.param_groups for p in g["params"]}


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer,
    params: Mapping[str, torch.nn.Parameter],
    tensors: Mapping[str, torch.Tensor],
    prefix: str = OPTIM_PREFIX,
) -> None:
    """Inverse of :func:`optimizer_tensors`: replace the optimizer's per-parameter state.

    Parameters with no entry in ``tensors`` get no state (their next step is a first step).
    0-d entries (``step``) keep their dtype; others must have the parameter's shape and dtype.
    Raises :class:`CheckpointError` naming the key for an unknown parameter, a shape or dtype
    mismatch or an incomplete AdamW state; the optimizer is unchanged then. The following
    steps are bit-identical to those of an optimizer that never went through the round trip."""
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not key.startswith(prefix):
            continue
        name, _, entry = key[len(prefix) :].rpartition(".")
        if name not in params:
            raise CheckpointError(f"optimizer state {key} names no trainable parameter here")
        p = params[name]
        if t.dim() != 0:
            _check_like(key, t, p.shape, p.dtype)
        by_param.setdefault(name, {})[entry] = t
    groups = _group_of(optimizer)
    for name, entries in by_param.items():
        missing = sorted(_required_entries(optimizer, groups.get(params[name], {})) - set(entries))
        if missing:
            raise CheckpointError(f"optimizer state {prefix}{name}.{missing[0]} is missing")
    for name, p in params.items():
        loaded = by_param.get(name)
        if loaded is None:
            optimizer.state.pop(p, None)
            continue
        optimizer.state[p] = {
            entry: t.to(p.device, copy=True) if t.dim() else t.clone() for entry, t in loaded.items()
        }


def trainer_tensors(
    params: Mapping[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer | None
) -> dict[str, torch.Tensor]:
    """``param.*`` copies of ``params`` and ``optim.*`` state of ``optimizer`` (if any)."""
    tensors = param_tensors(params)
    if optimizer is not None:
        tensors.update(optimizer_tensors(optimizer, params))
    return tensors


def load_trainer_tensors(
    params: Mapping[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer | None,
    tensors: Mapping[str, torch.Tensor],
) -> None:
    """Inverse of :func:`trainer_tensors`; clears the parameters' ``.grad``.

    Raises :class:`CheckpointError` naming the key for a key outside ``param.*``/``optim.*``,
    a missing or unknown parameter, or a shape/dtype mismatch (parameters then unchanged)."""
    stray = sorted(k for k in tensors if not k.startswith((PARAM_PREFIX, OPTIM_PREFIX)))
    if stray:
        raise CheckpointError(f"state tensor {stray[0]} is neither {PARAM_PREFIX}* nor {OPTIM_PREFIX}*")
    load_param_tensors(params, tensors)
    if optimizer is not None:
        load_optimizer_tensors(optimizer, params, tensors)
    for p in params.values():
        p.grad = None
