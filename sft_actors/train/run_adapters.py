"""A finished (or interrupted) run's adapters, and the model one device ends with.

**The model device NAME ends with** (cut ``c``, model of ``L`` blocks):

- blocks ``[0, c)`` carry the devices' per-block average (``adapters_devices.safetensors``);
- blocks ``[c, L)`` carry the adapters of the server actor that holds each block
  (``adapters_<server>.safetensors``; with several server stages, stage ``[s, e)`` gives its
  blocks) — exactly the path the device's micro-batches take through the runtime;
- for a ViT, the head is the trained head of the stage that runs the head;
- under ``fedlora`` (every device trains the whole model, no server) every block carries the
  devices' average.

A block the chosen source has no adapter for (e.g. averaging never ran) keeps the base weights
and is listed in :attr:`DeviceModel.blocks_without_adapter`.

Sources: the final files a run writes at its end, or a checkpoint
(``checkpoints/round-N/``: the coordinator's ``avg.*`` tensors and each server's
``param.adapters.{i}.{proj}.lora_A|B`` / ``param.trainable_head.*``) for a run stopped before
its end. Pure: reads files, imports no actor, transport or runtime code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sft_actors.errors import CheckpointError, ConfigError
from sft_actors.train.aggregate import block_of
from sft_actors.train.checkpoint import CHECKPOINTS, MANIFEST, load_checkpoint, round_dir_name
from sft_actors.train.run_info import RunInfo, read_run_info, run_info_from_topology_file

DEVICES_FILE = "adapters_devices.safetensors"
#: The coordinator's entry in a checkpoint and the prefix of its averaged device adapters.
_COORDINATOR, _AVG = "coordinator", "avg."
_ROUND = re.compile(r"round-(\d+)")
_PARAM_ADAPTER = re.compile(r"param\.adapters\.(\d+)\.(\w+)\.(lora_A|lora_B)")
_PARAM_HEAD = "param.trainable_head."


class ExportError(ConfigError):
    """A run directory cannot give what was asked (unknown device, no adapters yet, …)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RunAdapters:
    """A run's adapters from one source: ``devices`` (per-block average, keys
    ``blocks.{i}.{proj}.lora_A|B``) and each server actor's LoRA (plus ``head.*`` for a ViT)."""

    info: RunInfo
    source: str  # "final" or the checkpoint directory
    round: int | None  # the checkpoint's round (None: the run's final files)
    devices: dict[str, torch.Tensor]
    servers: dict[str, dict[str, torch.Tensor]]


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceModel:
    """The adapters of the model one device ends with (see the module doc)."""

    device: str
    cut: int  # the device ran blocks [0, cut); the model's block count under fedlora
    lora: dict[str, torch.Tensor]  # blocks.{i}.{proj}.lora_A (r, in) | lora_B (out, r)
    head: dict[str, torch.Tensor] = field(default_factory=dict)  # ViT: weight (K, C), bias (K,)
    provenance: dict[int, str] = field(default_factory=dict)  # block -> "devices" | server name
    blocks_without_adapter: list[int] = field(default_factory=list)


def checkpoint_rounds(run_dir: Path) -> list[int]:
    """Rounds of the complete checkpoints under ``run_dir`` (oldest first)."""
    root = Path(run_dir) / CHECKPOINTS
    found = []
    for child in root.iterdir() if root.is_dir() else ():
        m = _ROUND.fullmatch(child.name)
        if m and (child / MANIFEST).is_file():
            found.append(int(m.group(1)))
    return sorted(found)


def resolve_info(run_dir: Path, topology: str | Path | None = None) -> RunInfo:
    """``run.json``, else the topology file given, else the one the newest checkpoint names.
    Raises :class:`ExportError` when none is available."""
    info = read_run_info(run_dir)
    if info is not None:
        return info
    if topology is not None:
        return run_info_from_topology_file(topology)
    rounds = checkpoint_rounds(run_dir)
    if rounds:
        meta = load_checkpoint(Path(run_dir) / CHECKPOINTS / round_dir_name(rounds[-1])).meta
        source = meta.get("topology")
        if isinstance(source, str) and Path(source).is_file():
            return run_info_from_topology_file(source)
    raise ExportError(
        f"{run_dir} has no run.json (written by runs of this build) and no topology file to read the "
        "model, LoRA and cuts from; pass --topology FILE (the file the run was started with)"
    )


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ExportError(f"{path} is not a readable safetensors file ({exc})") from exc


def load_run(
    run_dir: Path, *, round_: int | str | None = None, topology: str | Path | None = None
) -> RunAdapters:
    """The run's final adapters, or (``round_`` = N or ``"latest"``) those of a checkpoint.

    Raises :class:`ExportError` when ``run_dir`` is not a directory, the final adapters are
    missing (naming the checkpoints there and ``--round``), or the round asked for has no
    complete checkpoint; :class:`CheckpointError` for a corrupted checkpoint."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a directory; pass the run_dir a run printed")
    info = resolve_info(run_dir, topology)
    rounds = checkpoint_rounds(run_dir)
    if round_ is None:
        files = {"devices": run_dir / DEVICES_FILE} | {
            s: run_dir / f"adapters_{s}.safetensors" for s in info.servers
        }
        missing = [p.name for p in files.values() if not p.is_file()]
        if not missing:
            servers = {s: _read(p) for s, p in files.items() if s != "devices"}
            return RunAdapters(
                info=info, source="final", round=None, devices=_read(files["devices"]), servers=servers
            )
        hint = (
            f"checkpoints after rounds {rounds}: pass --round {rounds[-1]} (or --round latest) to export one"
            if rounds
            else "and no complete checkpoint either (the run has not finished a round)"
        )
        raise ExportError(
            f"{run_dir} has no final adapters ({', '.join(missing)} missing: {_ending(run_dir)}); {hint}"
        )
    if not rounds:
        raise ExportError(f"{run_dir} has no complete checkpoint to export")
    r = rounds[-1] if round_ == "latest" else int(round_)
    if r not in rounds:
        raise ExportError(f"{run_dir} has no complete checkpoint after round {r}; it has rounds {rounds}")
    return from_checkpoint(info, run_dir / CHECKPOINTS / round_dir_name(r))


def _ending(run_dir: Path) -> str:
    """How the run ended, from its summary.json, for an error message."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        status, reason = summary["status"], summary.get("reason") or ""
    except (OSError, ValueError, KeyError, TypeError):
        return "the run is still going or was killed (no summary.json)"
    return f"the run ended {status}" + (f" ({reason})" if reason else "")


def from_checkpoint(info: RunInfo, path: Path) -> RunAdapters:
    """The adapters held by checkpoint directory ``path``. Raises :class:`CheckpointError`."""
    ckpt = load_checkpoint(path)
    own = ckpt.states.get(_COORDINATOR)
    devices = {k[len(_AVG) :]: v for k, v in own.tensors.items() if k.startswith(_AVG)} if own else {}
    servers: dict[str, dict[str, torch.Tensor]] = {}
    for name in info.servers:
        state = ckpt.states.get(name)
        if state is None:
            raise CheckpointError(f"{path} holds no state of server {name!r}")
        tensors: dict[str, torch.Tensor] = {}
        for key, value in state.tensors.items():
            m = _PARAM_ADAPTER.fullmatch(key)
            if m:
                tensors[f"blocks.{m.group(1)}.{m.group(2)}.{m.group(3)}"] = value
            elif key.startswith(_PARAM_HEAD):
                tensors["head." + key[len(_PARAM_HEAD) :]] = value
        servers[name] = tensors
    return RunAdapters(info=info, source=str(path), round=ckpt.round, devices=devices, servers=servers)


def _holder(info: RunInfo, block: int, num_blocks: int) -> str | None:
    for name, r in info.servers.items():
        if r.start_block <= block < (num_blocks if r.end_block is None else r.end_block):
            return name
    return None


def device_model(run: RunAdapters, device: str, num_blocks: int) -> DeviceModel:
    """The adapters of the model ``device`` ends with (module doc); ``num_blocks``: the model's L.

    Raises :class:`ExportError` for a device the run does not have (naming those it has)."""
    info = run.info
    if device not in info.cuts:
        raise ExportError(f"run {info.run!r} has no device {device!r}; its devices: {sorted(info.cuts)}")
    cut = info.cuts[device]
    cut = num_blocks if cut is None or info.whole_model_on_device else cut
    lora: dict[str, torch.Tensor] = {}
    provenance: dict[int, str] = {}
    for block in range(num_blocks):
        source = "devices" if block < cut else _holder(info, block, num_blocks)
        tensors = run.devices if source == "devices" else run.servers.get(source or "", {})
        mine = {k: v for k, v in tensors.items() if block_of(k) == block}
        if mine and source is not None:
            lora.update(mine)
            provenance[block] = source
    head: dict[str, torch.Tensor] = {}
    for name, r in info.servers.items():
        if r.head:
            head = {
                k[len("head.") :]: v for k, v in run.servers.get(name, {}).items() if k.startswith("head.")
            }
    missing = [b for b in range(num_blocks) if b not in provenance]
    return DeviceModel(
        device=device, cut=cut, lora=lora, head=head, provenance=provenance, blocks_without_adapter=missing
    )
