"""The planner's view of a topology file, and the topology with a plan filled in.

This is the one module that knows topology field names (``sft_actors.topology``): fix it here
if they change. What it reads:

- ``[run]``: ``model`` (cost figures from the model layer's preset config when it has one,
  else :meth:`ModelCosts.known`), ``dtype``, ``train`` (``batch_size``, ``seq_len``,
  ``steps_per_round``, ``aggregate_every``, ``rounds``, ``max_inflight``), ``lora`` (``rank``,
  ``mlp``);
- device actors' ``profile = {memory_mb, flops, distance_m, tx_power_dbm}``;
- the server actor's ``profile.flops`` and ``profile.tx_power_dbm`` when the schema has them.

The topology does not (yet) carry a bandwidth budget or server FLOP/s: those come from the
caller (``sft plan --bandwidth-hz/--server-flops``) or from :data:`DEFAULTS`, and every value
taken from a default is listed in the returned assumptions so the CLI can print it.

Writing: :func:`topology_with_plan` sets every device's ``cut``, the first server stage's
``start_block`` (when the file sets one; later stages keep theirs) and the codec chain: in
``[run.codec.up]``/``[run.codec.down]`` when every device uses the same one, and additionally
as each device's own ``codec = {up, down}`` table when the plan gives devices different chains.
"""

from __future__ import annotations

import copy
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sft_actors.codec.spec import ChainSpec
from sft_actors.errors import ConfigError, ModelSpecError, TopologyError
from sft_actors.plan.channel import ChannelConfig, DeviceProfile, ServerProfile, draw_channel
from sft_actors.plan.compression import build_menu
from sft_actors.plan.costs import ModelCosts, TrainingShape
from sft_actors.plan.model import PlanProblem, build_terms, fixed_link_delays
from sft_actors.plan.planner import PlanSolution


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanDefaults:
    """Values used where the topology says nothing (each use is reported as an assumption)."""

    device_memory_mb: float = 4096.0
    device_flops: float = 2e10  # a phone-class SoC, sustained
    distance_m: float = 50.0
    device_tx_power_dbm: float = 20.0
    server_flops: float = 1e12  # one mid-range GPU, sustained
    server_tx_power_dbm: float = 30.0
    bandwidth_hz: float = 20e6


DEFAULTS = PlanDefaults()
DEFAULT_MAX_LOSS = TrainingShape().max_accuracy_loss
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def model_costs(
    model: str, *, dtype: str = "float32", lora_rank: int = 8, lora_mlp: bool = False
) -> ModelCosts:
    """Cost figures for a topology's ``run.model``: the model layer's preset, else a known spec."""
    overrides = {"weight_bytes": _DTYPE_BYTES.get(dtype, 4), "lora_rank": lora_rank, "lora_mlp": lora_mlp}
    try:  # imported here: the planner stays free of torch until a topology asks for a model
        from sft_actors.model.config import PRESETS
    except ImportError:
        PRESETS = {}
    if model in PRESETS:
        return ModelCosts.from_config(model, PRESETS[model], **overrides)
    return ModelCosts.known(model, **overrides)


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)


def problem_from_topology(
    topo: Any,
    *,
    bandwidth_hz: float | None = None,
    server_flops: float | None = None,
    max_accuracy_loss: float | None = None,
    codecs: list[str] | None = None,
    defaults: PlanDefaults = DEFAULTS,
) -> tuple[PlanProblem, list[str]]:
    """A PlanProblem from a loaded ``sft_actors.topology.Topology``; also the assumptions made."""
    run = topo.run
    assumed: list[str] = []
    try:
        costs = model_costs(run.model, dtype=run.dtype, lora_rank=run.lora.rank, lora_mlp=run.lora.mlp)
    except ModelSpecError as e:
        raise TopologyError(f"{topo.source}: [run] model = {run.model!r}: {e}") from e
    shape = _training_shape(topo, costs, max_accuracy_loss, assumed)
    devices = _device_profiles(topo, defaults, assumed)
    servers = topo.servers
    if server_flops is None:
        server_flops = _get(_get(servers[0], "profile"), "flops") if servers else None
        if server_flops is None:
            server_flops = defaults.server_flops
            assumed.append(f"server flops = {server_flops:g} (pass --server-flops)")
    srv_power = _get(_get(servers[0], "profile"), "tx_power_dbm") if servers else None
    if srv_power is None:
        srv_power = defaults.server_tx_power_dbm
        assumed.append(f"server tx_power_dbm = {srv_power:g}")
    if bandwidth_hz is None:
        bandwidth_hz = _get(run, "bandwidth_hz")
        if bandwidth_hz is None:
            bandwidth_hz = defaults.bandwidth_hz
            assumed.append(f"bandwidth_hz = {bandwidth_hz:g} (pass --bandwidth-hz)")
    try:
        problem = PlanProblem(
            model=costs,
            training=shape,
            devices=devices,
            server=ServerProfile(flops=float(server_flops), tx_power_dbm=float(srv_power)),
            channel=ChannelConfig(bandwidth_hz=float(bandwidth_hz)),
            menu=build_menu(names=codecs, basis=shape.accuracy_basis),
        )
    except ConfigError as e:
        if isinstance(e, TopologyError):
            raise
        raise TopologyError(f"{topo.source}: {e}") from e
    return problem, assumed


def _training_shape(
    topo: Any, costs: ModelCosts, max_accuracy_loss: float | None, assumed: list[str]
) -> TrainingShape:
    run, train = topo.run, topo.run.train
    # The planner models one server. With later server stages (start_block S), every cut stays
    # below the second stage's S so that the first stage keeps at least one block: a plan that
    # cut every device at S would leave it empty and the written file would not load.
    later = sorted(s.start_block for s in topo.servers if s.start_block is not None)[1:]
    min_server_blocks = TrainingShape().min_server_blocks
    if later:
        min_server_blocks = max(min_server_blocks, costs.num_blocks - later[0] + 1)
        assumed.append(f"cuts below {later[0]}, where the second server stage starts")
    return TrainingShape(
        batch=train.batch_size,
        seq=costs.default_seq if costs.sequence_fixed else train.seq_len,
        steps_per_round=train.steps_per_round,
        aggregate_every=train.aggregate_every,
        rounds_base=float(train.rounds),
        max_inflight=train.max_inflight,
        activation_bytes=_DTYPE_BYTES.get(run.dtype, 4),
        max_accuracy_loss=DEFAULT_MAX_LOSS if max_accuracy_loss is None else max_accuracy_loss,
        min_server_blocks=min_server_blocks,
    )


def _device_profiles(topo: Any, defaults: PlanDefaults, assumed: list[str]) -> tuple[DeviceProfile, ...]:
    def pick(actor: Any, key: str, fallback: float) -> float:
        value = _get(_get(actor, "profile"), key)
        if value is None:
            assumed.append(f"{actor.name}.profile.{key} = {fallback:g}")
            return fallback
        return float(value)

    devices = tuple(
        DeviceProfile(
            name=a.name,
            memory_mb=pick(a, "memory_mb", defaults.device_memory_mb),
            flops=pick(a, "flops", defaults.device_flops),
            distance_m=pick(a, "distance_m", defaults.distance_m),
            tx_power_dbm=pick(a, "tx_power_dbm", defaults.device_tx_power_dbm),
        )
        for a in topo.devices
    )
    if not devices:
        raise TopologyError(
            f'{topo.source}: no device actors to plan for; add [[actors]] with role = "device"'
        )
    return devices


def topology_with_plan(source: Path | str, planned: PlanSolution) -> dict[str, Any]:
    """The topology file's data with the plan's cuts and codec filled in (a new dict)."""
    codecs = {d.codec.name for d in planned.devices}
    with open(source, "rb") as f:
        data = tomllib.load(f)
    out = copy.deepcopy(data)
    cuts = {d.name: d.cut for d in planned.devices}
    for actor in out.get("actors", []):
        if actor.get("role") == "device" and actor.get("name") in cuts:
            actor["cut"] = cuts[actor["name"]]
    servers = [a for a in out.get("actors", []) if a.get("role") == "server"]
    if servers:
        # Only the first stage follows the cuts (a stage without start_block starts at the
        # smallest cut anyway); later stages keep their blocks, and the plan cut below them.
        first = min(servers, key=lambda a: a.get("start_block", -1))
        if "start_block" in first:
            first["start_block"] = min(cuts.values())
    out.setdefault("run", {})["codec"] = planned.devices[0].codec.tables()
    if len(codecs) > 1:  # heterogeneous plan: each device carries its own chain
        tables = {d.name: d.codec.tables() for d in planned.devices}
        for actor in out.get("actors", []):
            if actor.get("role") == "device" and actor.get("name") in tables:
                actor["codec"] = tables[actor["name"]]
    return out


@dataclass(frozen=True, kw_only=True, slots=True)
class LinkPrediction:
    """Predicted delays (s per round) of a topology as written, over its emulated links."""

    device_round_s: dict[str, float]
    round_delay_s: float
    codec: str


def predict_topology(topo: Any, problem: PlanProblem) -> LinkPrediction:
    """The planner's per-round delay for ``topo``'s own cuts and codec over its link profiles.

    This is the prediction to set beside a run's measured round time: it uses the topology's
    ``link = {uplink_mbps, downlink_mbps, rtt_ms}`` (an unpaced direction costs nothing) instead
    of the wireless channel model.
    """
    problem = problem.with_menu(build_menu(basis=problem.training.accuracy_basis, pareto_only=False))
    names = [o.name for o in problem.menu.options]
    chosen: list[int] = []
    for d in topo.devices:
        up_chain = topo.codec_policy(d.name).up
        matches = [i for i, o in enumerate(problem.menu.options) if ChainSpec.parse(o.chain) == up_chain]
        if not matches:
            raise ConfigError(
                f"{topo.source}: the up codec of {d.name} {up_chain.to_dict()} is not a codec in the "
                "planner's table "
                f"({', '.join(names)}); add it to sft_actors/plan/data/codec_ratios.json to predict its delay"
            )
        chosen.append(matches[0])
    terms = build_terms(problem, draw_channel(problem.devices, problem.server, problem.channel, mean=True))
    devices = topo.devices
    cuts = np.array([d.cut if d.cut is not None else problem.cut_range[0] for d in devices], dtype=np.int64)
    opts = np.asarray(chosen, dtype=np.int64)

    def rate(mbps: float | None) -> float:
        return math.inf if mbps is None else float(mbps) * 1e6

    up = np.array([rate(d.link.uplink_mbps) for d in devices])
    down = np.array([rate(d.link.downlink_mbps) for d in devices])
    rtt = np.array([d.link.rtt_ms / 1e3 for d in devices])
    delays, round_s = fixed_link_delays(terms, problem.training, cuts, opts, up, down, rtt)
    return LinkPrediction(
        device_round_s={d.name: float(x) for d, x in zip(devices, delays, strict=True)},
        round_delay_s=round_s,
        codec=", ".join(sorted({names[i] for i in chosen})),
    )
