"""What a run directory must say for its adapters to be used after the run: ``run.json``.

The coordinator writes ``RUN_DIR/run.json`` (strict JSON, atomically) when it opens the run
directory, and the same facts go into the metadata of every ``adapters_*.safetensors`` it
writes (:func:`adapter_metadata`). ``sft export`` / ``sft generate`` read them back
(:func:`read_run_info`)::

    {"format": 1, "run": "tiny", "model": "llama-tiny", "model_path": null,
     "dtype": "float32", "mode": "sft", "seed": 0,
     "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["q", "k", "v", "o"], "mlp": false},
     "devices": {"dev0": {"cut": 1, "server": "server"}, "dev1": {"cut": 2, "server": "server"}},
     "servers": {"server": {"start_block": 1, "end_block": null, "head": true}},
     "whole_model_on_device": false, "topology": "topologies/tiny.toml"}

``model_path`` is the model spec made absolute when it names a file or directory (so a run
started elsewhere can still be exported); ``end_block`` null means "to the model's last block";
``head`` marks the stage that runs the final norm and head (for a ViT its trained head is in
that stage's adapters file). Under ``fedlora`` every device trains the whole model: ``cut`` is
null and ``servers`` is empty. Runs written before ``run.json`` existed are read from the
topology file (:func:`run_info_from_topology_file`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sft_actors.errors import ConfigError
from sft_actors.model.config import LoraConfig
from sft_actors.plan.assign import server_for, server_stages
from sft_actors.topology.schema import Topology
from sft_actors.train import modes
from sft_actors.train.files import atomic_write_bytes, strict_json_bytes

RUN_INFO = "run.json"
FORMAT = 1


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerRange:
    """A server actor's blocks ``[start_block, end_block)`` (None: to the end) and whether it
    runs the head."""

    start_block: int
    end_block: int | None
    head: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class RunInfo:
    """A run's model, LoRA, and who held which blocks (see the module doc)."""

    run: str
    model: str
    model_path: str | None
    dtype: str
    mode: str
    seed: int
    lora: LoraConfig
    cuts: dict[str, int | None]  # device -> cut (None: whole model on the device)
    entry_server: dict[str, str | None]  # device -> the server stage its activations enter
    servers: dict[str, ServerRange] = field(default_factory=dict)
    topology: str = ""
    data_kind: str = "text"  # [run.data] kind: "text" or "instruction" (older run.json: text)
    chat_template: str = "auto"  # [run.data] chat_template: "auto", "none" or an absolute path

    @property
    def whole_model_on_device(self) -> bool:
        return modes.whole_model_on_device(self.mode)

    @property
    def model_spec(self) -> str:
        """The spec to load the base from: the absolute path the run recorded while it exists
        (the run may be read from another directory), else the spec as the topology gave it."""
        if self.model_path and Path(self.model_path).exists():
            return self.model_path
        return self.model

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "run": self.run,
            "model": self.model,
            "model_path": self.model_path,
            "dtype": self.dtype,
            "mode": self.mode,
            "seed": self.seed,
            "lora": lora_to_json(self.lora),
            "devices": {d: {"cut": c, "server": self.entry_server.get(d)} for d, c in self.cuts.items()},
            "servers": {
                s: {"start_block": r.start_block, "end_block": r.end_block, "head": r.head}
                for s, r in self.servers.items()
            },
            "whole_model_on_device": self.whole_model_on_device,
            "topology": self.topology,
            "data": {"kind": self.data_kind, "chat_template": self.chat_template},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], *, source: str = RUN_INFO) -> RunInfo:
        """Inverse of :meth:`to_json`; raises :class:`ConfigError` naming ``source`` when a key
        is missing or has the wrong type, or the format is unknown."""
        try:
            if data.get("format") != FORMAT:
                raise ConfigError(f"{source}: format {data.get('format')!r}, this build reads {FORMAT}")
            devices = data["devices"]
            return cls(
                run=str(data["run"]),
                model=str(data["model"]),
                model_path=data.get("model_path"),
                dtype=str(data["dtype"]),
                mode=str(data["mode"]),
                seed=int(data["seed"]),
                lora=lora_from_json(data["lora"]),
                cuts={str(d): v["cut"] for d, v in devices.items()},
                entry_server={str(d): v.get("server") for d, v in devices.items()},
                servers={
                    str(s): ServerRange(
                        start_block=int(v["start_block"]), end_block=v["end_block"], head=bool(v["head"])
                    )
                    for s, v in data["servers"].items()
                },
                topology=str(data.get("topology", "")),
                data_kind=str(data.get("data", {}).get("kind", "text")),
                chat_template=str(data.get("data", {}).get("chat_template", "auto")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"{source} is not a run description this build reads: {exc!r}") from exc


def lora_to_json(lora: LoraConfig) -> dict[str, Any]:
    """The JSON form ``model.export.save_lora`` also writes (rank, alpha, dropout, targets, mlp)."""
    return {
        "rank": lora.rank,
        "alpha": lora.alpha,
        "dropout": lora.dropout,
        "targets": list(lora.targets),
        "mlp": lora.mlp,
    }


def lora_from_json(data: dict[str, Any]) -> LoraConfig:
    return LoraConfig(
        rank=int(data["rank"]),
        alpha=float(data["alpha"]),
        dropout=float(data["dropout"]),
        targets=tuple(data["targets"]),
        mlp=bool(data["mlp"]),
    )


def run_info(topology: Topology) -> RunInfo:
    """The run description of ``topology`` (cuts and server stages as the coordinator plans them)."""
    run = topology.run
    whole = modes.whole_model_on_device(run.train.mode)
    stages = [] if whole else server_stages(topology)
    servers = {
        spec.name: ServerRange(
            start_block=start,
            end_block=stages[k + 1][0] if k + 1 < len(stages) else None,
            head=k + 1 == len(stages),
        )
        for k, (start, spec) in enumerate(stages)
    }
    path = Path(run.model).expanduser()
    template = run.data.chat_template
    if template not in ("auto", "none") and Path(template).expanduser().exists():
        template = str(Path(template).expanduser().resolve())
    return RunInfo(
        run=run.name,
        model=run.model,
        model_path=str(path.resolve()) if path.exists() else None,
        dtype=run.dtype,
        mode=run.train.mode,
        seed=run.seed,
        lora=run.lora,
        cuts={d.name: None if whole else (d.cut or 0) for d in topology.devices},
        entry_server={d.name: None if whole else server_for(topology, d.cut or 0) for d in topology.devices},
        servers=servers,
        topology=topology.source,
        data_kind=run.data.kind,
        chat_template=template,
    )


def write_run_info(run_dir: Path, info: RunInfo) -> Path:
    """``run_dir/run.json``, atomically, as strict JSON. Returns its path."""
    return atomic_write_bytes(Path(run_dir) / RUN_INFO, strict_json_bytes(info.to_json()))


def adapter_metadata(info: RunInfo, holder: str) -> dict[str, str]:
    """safetensors metadata (str → str) for ``adapters_<holder>.safetensors``: ``model``,
    ``model_path``, ``mode``, ``run``, ``dtype``, ``lora_config`` (JSON, as ``save_lora``),
    and ``cuts`` (devices file: JSON device → cut) or ``block_range`` (a server's file: JSON
    ``[start, end]``, end null = to the last block) and ``head`` (``true``/``false``)."""
    meta = {
        "format": "pt",
        "model": info.model,
        "model_path": info.model_path or "",
        "mode": info.mode,
        "run": info.run,
        "dtype": info.dtype,
        "lora_config": json.dumps(lora_to_json(info.lora), sort_keys=True),
    }
    if holder == "devices":
        meta["cuts"] = json.dumps(info.cuts, sort_keys=True)
    elif holder in info.servers:
        r = info.servers[holder]
        meta["block_range"] = json.dumps([r.start_block, r.end_block])
        meta["head"] = json.dumps(r.head)
    return meta


def read_run_info(run_dir: Path) -> RunInfo | None:
    """``run_dir/run.json`` read back; None when the run has none (written by an older build).
    Raises :class:`ConfigError` when it is there but unreadable."""
    path = Path(run_dir) / RUN_INFO
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return RunInfo.from_json(data, source=str(path))


def run_info_from_topology_file(path: str | Path) -> RunInfo:
    """The run description of the topology file at ``path`` (for runs without ``run.json``).
    Raises :class:`TopologyError` as ``load_topology`` does."""
    from sft_actors.topology import load_topology

    return run_info(load_topology(path, roles=("coordinator",), log_warnings=False))
