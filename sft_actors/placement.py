"""Where an actor computes: ``device = "cpu" | "cuda" | "cuda:N"``, and how tensors get there.

Placement is a property of the process an actor runs in (like its host and port), not of the
run: the topology's actor entry carries it and the actor reads it at start; the plan does not
(two actors of one run may sit on different GPUs, and the wire schema stays as it is).

Tensors cross the wire through host memory. :func:`to_compute` moves a tensor decoded on the
CPU to the actor's device — from a pinned host buffer with one ``non_blocking`` copy when that
device is CUDA, untouched on CPU — and :func:`to_host` brings an outgoing tensor back into a
(pinned) host buffer for the wire. On CPU both are the identity, so the CPU path is unchanged.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

from sft_actors.errors import ConfigError

if TYPE_CHECKING:  # torch only where tensors move: the topology layer parses specs without it
    import torch

#: The default placement (and the only one CI has).
CPU: Final[str] = "cpu"
#: The largest CUDA index a spec may name (no host has more; bounds what reaches torch).
MAX_CUDA_INDEX: Final[int] = 1023
_SPEC = re.compile(r"(cpu|cuda)(?::([0-9]{1,4}))?")


class DeviceUnavailable(ConfigError):
    """An actor is placed on a CUDA device this host does not have (no CUDA, or the index is
    past ``torch.cuda.device_count()``). The message names the actor, the device and what the
    host has."""


def parse_device_spec(spec: str) -> tuple[str, int | None]:
    """``"cpu"`` → ``("cpu", None)``; ``"cuda"`` → ``("cuda", 0)``; ``"cuda:N"`` → ``("cuda", N)``
    (torch-free). Raises :class:`ConfigError` for anything else (``"cpu:1"``, ``"gpu"``, …)."""
    m = _SPEC.fullmatch(spec)
    if m is None or (m.group(1) == "cpu" and m.group(2) is not None) or int(m.group(2) or 0) > MAX_CUDA_INDEX:
        raise ConfigError(f'device {spec!r} is not "cpu", "cuda" or "cuda:N" (N from 0 to {MAX_CUDA_INDEX})')
    if m.group(1) == "cpu":
        return "cpu", None
    return "cuda", int(m.group(2) or 0)


def parse_device(spec: str) -> torch.device:
    """:func:`parse_device_spec` as a :class:`torch.device` (``"cuda"`` is ``cuda:0``)."""
    import torch

    kind, index = parse_device_spec(spec)
    return torch.device("cpu") if index is None else torch.device(kind, index)


def host_devices() -> str:
    """What this host offers, in words: ``"cpu only (torch sees no CUDA)"`` or ``"cuda:0..cuda:1
    (2 GPUs)"``."""
    import torch

    if not torch.cuda.is_available():
        return "cpu only (torch sees no CUDA)"
    n = torch.cuda.device_count()
    if n == 0:
        return "cpu only (torch sees no CUDA device)"
    return f"cuda:0..cuda:{n - 1} ({n} GPU{'s' if n > 1 else ''})" if n > 1 else "cuda:0 (1 GPU)"


def resolve_device(spec: str, *, actor: str) -> torch.device:
    """The device actor ``actor`` computes on, checked against this host.

    Raises :class:`DeviceUnavailable` naming the actor, ``spec`` and :func:`host_devices` when
    ``spec`` is CUDA and ``torch.cuda.is_available()`` is false or the index is at least
    ``torch.cuda.device_count()``; :class:`ConfigError` for a malformed ``spec``."""
    import torch

    device = parse_device(spec)
    if device.type == "cuda":
        index = device.index or 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise DeviceUnavailable(
                f"actor {actor!r} is placed on device {spec!r}, but this host has {host_devices()}; "
                'run it on a host with that GPU or set device = "cpu" in its [[actors]] entry'
            )
    return device


def to_compute(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` (any shape) on ``device`` (and in ``dtype`` when given) for compute.

    CPU target: ``t.to(dtype)`` (no copy when it already is). CUDA target from a CPU tensor: the
    dtype cast happens on the host, then one ``.to(device, non_blocking=True)`` from a pinned
    buffer (a pinned copy of ``t`` unless it is pinned already)."""
    if dtype is not None and t.dtype != dtype and (device.type != "cuda" or t.device.type == "cpu"):
        t = t.to(dtype)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    out = t.to(device, non_blocking=device.type == "cuda")
    return out if dtype is None else out.to(dtype)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """``t`` in host memory for the wire: itself when on CPU; from a CUDA device, copied into a
    pinned host buffer and synchronised (the wire reads the bytes right after)."""
    if t.device.type == "cpu":
        return t
    import torch

    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t.detach(), non_blocking=True)
    torch.cuda.synchronize(t.device)
    return host
