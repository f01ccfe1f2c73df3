"""What makes a run durable: its directory, checkpoints, resume, and honest result files.

The coordinator owns the run directory. A checkpoint (``train.checkpoint``: safetensors + JSON,
written atomically) holds every server's and every in-step device's state (LoRA, optimizer
moments, step and sample counters — asked for with STATE_REQUEST), the averaged device
adapters, and the run's history (the summary so far). It is also kept in memory: a server lost
mid-run is restored from it, and so is every device (a rollback), and a device that rejoins gets
its own last state from it. ``--resume RUN_DIR`` loads the last complete one.
``run.json`` (``train.run_info``: model, dtype, LoRA, each device's cut, each server's block
range) is written when the run directory is made, and the same facts go into the metadata of
the adapters files, so ``sft export`` can rebuild any device's model from the directory alone.
"""

from __future__ import annotations

import copy
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sft_actors.actors.env import ActorEnv
from sft_actors.errors import ConfigError
from sft_actors.log import get_logger
from sft_actors.topology import Topology
from sft_actors.train import modes
from sft_actors.train.checkpoint import checkpoint_bytes, latest_checkpoint, write_checkpoint
from sft_actors.train.run_info import RUN_INFO, adapter_metadata, run_info, write_run_info
from sft_actors.train.state import TrainerState
from sft_actors.train.summary import RunSummary, new_run_dir, write_adapters, write_summary
from sft_actors.wire import StateReport, WireTensor
from sft_actors.wire.coded import unpack_tensor

if TYPE_CHECKING:
    from sft_actors.actors.base import Actor

#: The coordinator's own entry in a checkpoint: the averaged device adapters under ``avg.``.
COORDINATOR_STATE = "coordinator"
_AVG = "avg."
log = get_logger(component="durability")


def deterministic(topology: Topology) -> tuple[bool, list[str]]:
    """Whether a rerun with the same seed gives the same bytes, and the reasons it would not.

    Compression seeds, data order and averaging are all derived from the seed; what depends on
    timing is the order in which updates are applied when several micro-batches race."""
    t = topology.run.train
    parallel = not modes.sequential(t.mode) and not modes.whole_model_on_device(t.mode)
    why = []
    if parallel and len(topology.devices) > 1 and t.server_update == "per_batch":
        why.append(
            "server_update = per_batch applies the server's updates in the order devices' "
            "micro-batches arrive; per_round sums them in a fixed order"
        )
    if t.max_inflight > 1 and not modes.whole_model_on_device(t.mode):
        why.append(f"max_inflight = {t.max_inflight}: a device applies gradients in the order they come back")
    return not why, why


class Durability:
    """Run directory, checkpoints (on disk and the last one in memory), result files."""

    def __init__(self, topology: Topology, env: ActorEnv, summary: RunSummary) -> None:
        self.topology = topology
        self.env = env
        self.summary = summary
        #: What ``sft export`` needs (model, LoRA, cuts, server block ranges): ``run.json``.
        self.info = run_info(topology)
        self.run_dir: Path | None = None
        #: Names the run in every plan (random for a fresh run; kept by ``--resume``).
        self.run_id = secrets.token_hex(8)
        #: The round the last checkpoint finished (0: set-up).
        self.round = 0
        #: The run's current per-block average of the devices' LoRA tensors.
        self.device_adapters: dict[str, torch.Tensor] = {}
        self._states: dict[str, TrainerState] = {}
        self._history: dict[str, Any] = {}
        self._adapters_at_checkpoint: dict[str, torch.Tensor] = {}
        #: ``sl``: the device whose adapters the next one starts from (checkpointed with it).
        self.relay_from: str | None = None
        self._relay_at_checkpoint: str | None = None

    # --- opening ------------------------------------------------------------------------------
    def open_run_dir(self) -> int | None:
        """A fresh run directory, or (``--resume``) RUN_DIR's last checkpoint loaded: returns
        the round it continues after (None for a fresh run). Raises :class:`CheckpointError`
        (none, corrupted) or :class:`ConfigError` (written by another topology)."""
        if self.env.resume_dir is None:
            self._ensure_dir()
            return None
        ckpt = latest_checkpoint(self.env.resume_dir)
        written_by = ckpt.meta.get("schema_hash")
        if written_by != self.env.schema_hash:
            raise ConfigError(
                f"{ckpt.path} was written by a different topology (schema {written_by}, this one "
                f"{self.env.schema_hash}): model, cuts, LoRA and codec must match to resume"
            )
        self.run_dir = self.env.resume_dir
        if not (self.run_dir / RUN_INFO).is_file():  # a run written before run.json existed
            write_run_info(self.run_dir, self.info)
        self._states = {k: v for k, v in ckpt.states.items() if k != COORDINATOR_STATE}
        own = ckpt.states.get(COORDINATOR_STATE)
        self._adapters_at_checkpoint = (
            {k[len(_AVG) :]: v for k, v in own.tensors.items() if k.startswith(_AVG)} if own else {}
        )
        self._history = dict(ckpt.meta.get("summary", {}))
        self.run_id = str(ckpt.meta.get("run_id") or self.run_id)
        relay = ckpt.meta.get("relay_from")
        self._relay_at_checkpoint = relay if isinstance(relay, str) else None
        self.round = ckpt.round
        old = self.roll_back()
        if old is not None:  # what happened before: aborted rounds, earlier resumes
            self.summary.rounds_aborted = old.rounds_aborted
            self.summary.resumes = old.resumes
        self.summary.resumes.append(ckpt.round)
        self.summary.run_dir = str(self.run_dir)
        self.summary.checkpoint = {"round": ckpt.round, "path": str(ckpt.path)}
        log.info("run_resumed", run_dir=str(self.run_dir), round=ckpt.round, actors=sorted(self._states))
        return ckpt.round

    def _ensure_dir(self) -> Path:
        if self.run_dir is None:
            run = self.topology.run
            self.run_dir = new_run_dir(run.output.dir, run.name)
            write_run_info(self.run_dir, self.info)
            self.summary.run_dir = str(self.run_dir)
        return self.run_dir

    # --- checkpoints ----------------------------------------------------------------------------
    def state_of(self, actor: str) -> dict[str, Any] | None:
        """``actor``'s last checkpointed state as RESTORE fields, or None if it has none."""
        state = self._states.get(actor)
        if state is None:
            return None
        tensors = {k: WireTensor.from_torch(v) for k, v in state.tensors.items()}
        return {"tensors": tensors, "counters": dict(state.counters)}

    async def checkpoint(self, r: int, actor: Actor, reports: Sequence[StateReport]) -> Path:
        """Write checkpoint ``r`` from the actors' STATE_REPORTs (an actor without a report
        this time keeps its previous state) with the averaged adapters and the history."""
        for rep in reports:
            tensors = {k: unpack_tensor(v) for k, v in rep.tensors.items()}
            self._states[rep.actor] = TrainerState(tensors=tensors, counters=dict(rep.counters))
        self.round = r
        self._adapters_at_checkpoint = dict(self.device_adapters)
        self._relay_at_checkpoint = self.relay_from
        self._history = copy.deepcopy(self.summary.to_json())
        own = TrainerState(
            tensors={_AVG + k: v for k, v in self.device_adapters.items()}, counters={"round": r}
        )
        meta = {
            "schema_hash": self.env.schema_hash,
            "run": self.topology.run.name,
            "summary": self._history,
            "relay_from": self.relay_from,
            "run_id": self.run_id,
            "topology": self.topology.source,
        }
        keep = self.topology.run.checkpoint.keep
        states = {**self._states, COORDINATOR_STATE: own}
        path = await actor.offload(
            write_checkpoint, self._ensure_dir(), r, meta=meta, states=states, keep=keep
        )
        self.summary.checkpoint = {"round": r, "path": str(path)}
        actor.log.info("checkpoint_written", round=r, path=str(path), bytes=checkpoint_bytes(path))
        return path

    def roll_back(self) -> RunSummary | None:
        """Back to the last checkpoint: the averaged adapters and the history it holds (also
        returned whole, None before any checkpoint)."""
        self.device_adapters = dict(self._adapters_at_checkpoint)
        self.relay_from = self._relay_at_checkpoint
        old = RunSummary.from_json(self._history) if self._history else None
        if old is not None:
            self.summary.rounds, self.summary.evals, self.summary.evals_raw = (
                old.rounds,
                old.evals,
                old.evals_raw,
            )
            self.summary.setup_s = old.setup_s
        return old

    # --- results -----------------------------------------------------------------------------
    def write_summary(self) -> Path | None:
        """``summary.json`` in the run directory. Not when a ``--resume`` could not open its
        directory: that run stays as it was, and no stray directory is made for the refusal."""
        if self.run_dir is None and self.env.resume_dir is not None:
            log.warning("summary_not_written", why="the run to resume could not be opened")
            return None
        return write_summary(self.summary, self._ensure_dir())

    def write_adapters(self, servers: dict[str, dict[str, torch.Tensor]]) -> None:
        """``adapters_devices.safetensors`` (the devices' average) and one file per server, each
        with the run's model, dtype, LoRA config and cuts or block range in its metadata
        (``train.run_info.adapter_metadata``)."""
        run_dir = self._ensure_dir()
        if self.device_adapters:
            meta = adapter_metadata(self.info, "devices")
            path = write_adapters(self.device_adapters, run_dir / "adapters_devices.safetensors", meta)
            self.summary.adapters["devices"] = str(path)
        for name, tensors in servers.items():
            if tensors:
                meta = adapter_metadata(self.info, name)
                path = write_adapters(tensors, run_dir / f"adapters_{name}.safetensors", meta)
                self.summary.adapters[name] = str(path)
        log.info("run_written", run_dir=str(run_dir))
