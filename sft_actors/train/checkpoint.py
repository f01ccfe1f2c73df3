"""Durable checkpoints of a run directory: what ``--resume RUN_DIR`` continues from.

Layout::

    RUN_DIR/checkpoints/round-000003/checkpoint.json
    RUN_DIR/checkpoints/round-000003/<actor>.safetensors     (one per actor state)

``checkpoint.json`` holds ``{"format": 1, "round", "meta", "actors": {name: {"file",
"counters", "sha256"}}}`` (sorted keys). A checkpoint is written into
``checkpoints/.tmp-…``, every file and the directory are fsynced, and the directory is renamed
into place: a kill during the write leaves the previous checkpoints as they were, and the
half-written directory (its name starts with a dot) is ignored, then removed by the next write.
Rewriting an existing round (after a resume) renames the old directory away (``.old-…``)
first, then renames the new one in. Only the newest ``keep`` complete checkpoints are kept.
One process writes a run's checkpoints at a time (the coordinator).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from sft_actors.errors import CheckpointError, ConfigError
from sft_actors.train.files import fsync_dir, safetensors_bytes, strict_json_bytes, write_synced
from sft_actors.train.state import TrainerState

FORMAT = 1
CHECKPOINTS = "checkpoints"
MANIFEST = "checkpoint.json"
_ROUND_DIR = re.compile(r"round-(\d{6,})")
_NO_CHECKPOINT_HINT = "a run writes one after every [run.checkpoint] every rounds"


@dataclass(frozen=True, kw_only=True, slots=True)
class Checkpoint:
    """A complete checkpoint: the last finished ``round``, its directory, the coordinator's
    ``meta`` (JSON values) and each actor's state by actor name."""

    round: int
    path: Path
    meta: dict[str, Any]
    states: dict[str, TrainerState]


def _file_safe(name: str) -> bool:
    """An actor name (letters, digits, ``-_.`` as the topology allows) usable as a file name."""
    return bool(name) and not name.startswith(".") and all(c.isalnum() or c in "-_." for c in name)


def round_dir_name(round_: int) -> str:
    return f"round-{round_:06d}"


def _complete_rounds(checkpoints: Path) -> list[tuple[int, Path]]:
    """(round, dir) of every complete checkpoint (a ``round-N`` dir with a manifest), newest first."""
    found = []
    for child in checkpoints.iterdir() if checkpoints.is_dir() else ():
        m = _ROUND_DIR.fullmatch(child.name)
        if m and (child / MANIFEST).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found, reverse=True)


def _remove_leftovers(checkpoints: Path) -> None:
    """Remove directories a killed write left behind (``.tmp-…``, ``.old-…``)."""
    for child in checkpoints.iterdir():
        if child.name.startswith((".tmp-", ".old-")) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)


def _manifest(round_: int, meta: Mapping[str, Any], actors: dict[str, dict[str, Any]]) -> bytes:
    try:
        return strict_json_bytes({"format": FORMAT, "round": round_, "meta": dict(meta), "actors": actors})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint meta of round {round_} is not JSON: {e}") from e


def _write_into(tmp: Path, round_: int, meta: Mapping[str, Any], states: Mapping[str, TrainerState]) -> None:
    actors: dict[str, dict[str, Any]] = {}
    for name in sorted(states):
        if not _file_safe(name):
            raise CheckpointError(f"actor name {name!r} cannot name a checkpoint file")
        state = states[name]
        data = safetensors_bytes(state.tensors)
        file = f"{name}.safetensors"
        write_synced(tmp / file, data)
        counters = {k: int(state.counters[k]) for k in sorted(state.counters)}
        actors[name] = {"file": file, "counters": counters, "sha256": hashlib.sha256(data).hexdigest()}
    write_synced(tmp / MANIFEST, _manifest(round_, meta, actors))
    fsync_dir(tmp)


def write_checkpoint(
    run_dir: Path,
    round_: int,
    *,
    meta: Mapping[str, Any],
    states: Mapping[str, TrainerState],
    keep: int = 2,
) -> Path:
    """Write the checkpoint of finished round ``round_`` atomically; returns its directory.

    ``meta``: JSON values (non-finite floats are stored as null); ``states``: actor name
    (letters, digits, ``-_.``; not starting with a dot) → state; ``keep`` >= 1: complete
    checkpoints kept (the oldest are deleted). Raises :class:`CheckpointError` for a bad actor name or meta,
    :class:`ConfigError` for ``keep`` < 1, ``OSError`` when the disk refuses (nothing of this
    checkpoint is then visible)."""
    if keep < 1:
        raise ConfigError(f"[run.checkpoint] keep must be at least 1, got {keep}")
    if round_ < 0:
        raise CheckpointError(f"cannot checkpoint round {round_}")
    checkpoints = Path(run_dir) / CHECKPOINTS
    checkpoints.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(checkpoints)
    final = checkpoints / round_dir_name(round_)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=checkpoints))
    old: Path | None = None
    try:
        _write_into(tmp, round_, meta, states)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=checkpoints))
            os.rename(final, old / final.name)
        os.rename(tmp, final)
    except BaseException:
        if old is not None and not final.exists():  # put the previous one back
            os.rename(old / final.name, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(checkpoints)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for _, stale in _complete_rounds(checkpoints)[keep:]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Checkpoint:
    """The newest complete checkpoint of ``run_dir`` (see :func:`load_checkpoint`).

    Raises :class:`CheckpointError` when ``run_dir`` does not exist, holds no complete
    checkpoint, or the newest one is corrupt."""
    return load_checkpoint(_latest_dir(run_dir))


def latest_manifest(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The newest complete checkpoint's directory and ``checkpoint.json`` (round, meta, actors),
    without reading its tensors: a quick check before a resume starts anything. Raises
    :class:`CheckpointError` as :func:`latest_checkpoint` does (hashes are not checked here)."""
    path = _latest_dir(run_dir)
    return path, _read_manifest(path)


def _latest_dir(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(
            f"run directory {run_dir} does not exist; --resume takes the run_dir a run printed"
        )
    checkpoints = run_dir / CHECKPOINTS
    complete = _complete_rounds(checkpoints)
    if not complete:
        raise CheckpointError(f"cannot resume: {checkpoints} has none; {_NO_CHECKPOINT_HINT}")
    return complete[0][1]


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest = path / MANIFEST
    older = f"delete {path} to resume from an older one"
    try:
        doc = json.loads(manifest.read_bytes())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path} is not a complete checkpoint: {MANIFEST} is missing") from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{manifest} is unreadable ({e}); {older}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise CheckpointError(
            f"{manifest} has checkpoint format {found!r}; this build reads format {FORMAT} "
            "(resume it with the version that wrote it)"
        )
    if not isinstance(doc.get("round"), int) or not isinstance(doc.get("actors"), dict):
        raise CheckpointError(f"{manifest} lacks 'round' or 'actors'; {older}")
    return doc


def _load_state(path: Path, name: str, entry: Any) -> TrainerState:
    from safetensors.torch import load

    corrupt = f"delete {path} to resume from an older checkpoint"
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        raise CheckpointError(f"{path / MANIFEST}: actor {name!r} has no file; {corrupt}")
    file = path / entry["file"]
    if file.parent != path:
        raise CheckpointError(f"{path / MANIFEST}: actor {name!r} names a file outside the checkpoint")
    try:
        data = file.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{file} is missing or unreadable ({e}); {corrupt}") from e
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise CheckpointError(f"{file} is corrupted (its sha256 does not match {MANIFEST}); {corrupt}")
    counters = entry.get("counters", {})
    if not isinstance(counters, dict) or not all(isinstance(v, int) for v in counters.values()):
        raise CheckpointError(f"{path / MANIFEST}: actor {name!r} has non-integer counters; {corrupt}")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, OSError) as e:  # the hash matched: a file this build cannot read
        raise CheckpointError(f"{file} is not a safetensors file this build reads ({e})") from e
    return TrainerState(tensors=dict(tensors), counters=dict(counters))


def load_checkpoint(path: Path) -> Checkpoint:
    """Load the checkpoint in directory ``path`` (a ``round-N`` directory), checking every
    file's sha256. Tensors are on the CPU.

    Raises :class:`CheckpointError` for a missing or unreadable manifest or file, an unknown
    format, or a file whose hash does not match (corrupted)."""
    path = Path(path)
    doc = _read_manifest(path)
    states = {str(name): _load_state(path, str(name), entry) for name, entry in doc["actors"].items()}
    meta = doc.get("meta")
    meta = meta if isinstance(meta, dict) else {}
    return Checkpoint(round=doc["round"], path=path, meta=meta, states=states)


def checkpoint_bytes(path: Path) -> int:
    """Total size in bytes of the files under ``path`` (a checkpoint or a run's ``checkpoints``)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
