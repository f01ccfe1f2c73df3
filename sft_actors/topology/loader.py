"""Read a topology TOML file into :class:`Topology` and validate it.

Every error is a :class:`TopologyError` naming the file, the table, the key and the fix.
Tables map onto the schema dataclasses field by field, so the schema *is* the list of
allowed keys; unknown keys come with a close-match suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sft_actors.codec.spec import ChainSpec, CodecPolicy
from sft_actors.errors import ConfigError, ModelSpecError, TopologyError
from sft_actors.model.config import ModelConfig
from sft_actors.topology.schema import (
    LOCALHOST,
    ROLES,
    ActorSpec,
    DeviceHardware,
    HostSpec,
    LinkProfile,
    RunConfig,
    Topology,
)

#: ``model_config(spec) -> config | None``: the architecture a ``[run] model`` names (None: unknown,
#: skip the checks that need it). The default reads the config only (no weights, ~0.1 s).
ModelConfigHint = Callable[[str], ModelConfig | None]


def load_topology(path: str | Path, *, model_config: ModelConfigHint | None = None) -> Topology:
    """Load and validate ``path``; every problem is one :class:`TopologyError` line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise TopologyError(f"{p}: cannot read the topology file ({exc.strerror}); check the path") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(f"{p}: not valid TOML: {exc}; fix the syntax at that line") from exc
    return parse_topology(data, source=str(p), model_config=model_config)


def parse_topology(
    data: Mapping[str, Any], *, source: str = "<topology>", model_config: ModelConfigHint | None = None
) -> Topology:
    """Validate an already-parsed TOML document (tests build them inline)."""
    b = _Builder(source)
    b.check_keys(data, {"run", "hosts", "actors"}, "top level")
    if "run" not in data:
        b.fail("top level", "run", "a [run] table is required; add [run] with name and model")
    run = _run_config(b, b.table(data["run"], "[run]"))
    hosts = tuple(
        b.build(HostSpec, b.table(h, f"[[hosts]] #{i + 1}"), f"[[hosts]] #{i + 1}")
        for i, h in enumerate(b.array(data.get("hosts", []), "[[hosts]]"))
    )
    raw_actors = b.array(data.get("actors", []), "[[actors]]")
    actors = tuple(_actor(b, b.table(a, f"[[actors]] #{i + 1}"), i, hosts) for i, a in enumerate(raw_actors))
    topo = Topology(source=source, run=run, hosts=hosts or (HostSpec(name=LOCALHOST),), actors=actors)
    _validate(b, topo, model_config or _model_config_of(b))
    return dataclasses.replace(topo, actors=_resolve_defaults(topo))


def _model_config_of(b: _Builder) -> ModelConfigHint:
    """The model layer's own reading of a spec, its errors as one topology line."""

    def resolve(spec: str) -> ModelConfig:
        from sft_actors.model.spec import load_config

        try:
            return load_config(spec)
        except (ModelSpecError, ConfigError, OSError) as exc:
            b.fail("[run]", "model", f"cannot use model {spec!r}: {exc}")

    return resolve


# --- building ----------------------------------------------------------------------------


class _Builder:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, key: str | None, fix: str) -> typing.NoReturn:
        at = f"{where}, key {key!r}" if key else where
        raise TopologyError(f"{self.source}: {at}: {fix}")

    def table(self, value: Any, where: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            self.fail(where, None, f"expected a table, got {type(value).__name__}")
        return value

    def array(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            self.fail(where, None, f"expected an array of tables ({where}), got {type(value).__name__}")
        return value

    def check_keys(self, table: Mapping[str, Any], allowed: set[str], where: str) -> None:
        for key in table:
            if key not in allowed:
                close = difflib.get_close_matches(key, sorted(allowed), n=1)
                allowed_list = ", ".join(sorted(allowed))
                hint = f"did you mean {close[0]!r}?" if close else f"allowed keys: {allowed_list}"
                self.fail(where, key, f"unknown key; {hint} Rename or remove it")

    def build(self, cls: Any, table: Mapping[str, Any], where: str, **given: Any) -> Any:
        """Build dataclass ``cls`` from ``table``: keys are its fields, values type-checked."""
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        self.check_keys(table, names - set(given), where)
        kwargs: dict[str, Any] = dict(given)
        for key, value in table.items():
            kwargs[key] = self.coerce(value, hints[key], where, key)
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            self.fail(where, missing[0], "required key is missing; add it")
        try:
            return cls(**kwargs)
        except ConfigError as exc:  # the component's own validation (e.g. LoraConfig)
            self.fail(where, None, f"{exc}; fix the value")

    def codec_policy(self, value: Any, where: str, key: str) -> CodecPolicy:
        """``{up = {...}, down = {...}}``: each chain judged by the codec's own parser."""
        table = self.table(value, f"{where}, key {key!r}")
        self.check_keys(table, {"up", "down"}, f"{where}, table {key!r}")
        chains: dict[str, ChainSpec] = {}
        for role in ("up", "down"):
            try:
                chains[role] = ChainSpec.parse(table.get(role, {}))
            except ConfigError as exc:
                self.fail(where, f"{key}.{role}", f"invalid codec chain: {exc}")
        try:
            return CodecPolicy(**chains)
        except ConfigError as exc:  # checks across the two roles
            self.fail(where, f"{key}.down", str(exc))

    def coerce(self, value: Any, tp: Any, where: str, key: str) -> Any:
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin in (types.UnionType, typing.Union):
            inner = [a for a in args if a is not type(None)]
            return self.coerce(value, inner[0], where, key)
        if origin is typing.Literal:
            if value not in args:
                close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.fail(where, key, f"{value!r} is not one of {', '.join(map(repr, args))}{hint}")
            return value
        if origin is tuple:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                self.fail(where, key, f"expected a list of strings, got {value!r}")
            return tuple(value)
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                self.fail(where, key, f"expected a finite number, got {value!r}")
            return float(value)
        if tp is CodecPolicy:
            return self.codec_policy(value, where, key)
        if origin is dict or tp is dict:
            return dict(self.table(value, f"{where}.{key}"))
        if dataclasses.is_dataclass(tp):
            return self.build(tp, self.table(value, f"{where}.{key}"), f"{where}.{key}")
        if tp is bool:
            if not isinstance(value, bool):
                self.fail(where, key, f"expected true or false, got {value!r}")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                self.fail(where, key, f"expected an integer, got {value!r}")
            return value
        if tp is str:
            if not isinstance(value, str):
                self.fail(where, key, f"expected a string, got {value!r}")
            return value
        raise AssertionError(f"schema type {tp!r} not handled")  # pragma: no cover - schema bug


def _run_config(b: _Builder, table: Mapping[str, Any]) -> RunConfig:
    run: RunConfig = b.build(RunConfig, table, "[run]")
    return run


def _actor(b: _Builder, table: Mapping[str, Any], index: int, hosts: tuple[HostSpec, ...]) -> ActorSpec:
    name = table.get("name", f"#{index + 1}")
    where = f"[[actors]] #{index + 1} ({name!r})" if "name" in table else f"[[actors]] #{index + 1}"
    extra: dict[str, Any] = {}
    if "host" not in table:
        if len(hosts) > 1:
            b.fail(where, "host", f"several hosts are defined; set host to one of {[h.name for h in hosts]}")
        extra["host"] = hosts[0].name if hosts else LOCALHOST
    actor: ActorSpec = b.build(ActorSpec, table, where, **extra)
    if actor.role != "device":
        device_only = {
            "cut": None,
            "shard": None,
            "link": LinkProfile(),
            "profile": DeviceHardware(),
            "codec": None,
        }
        for key, default in device_only.items():
            if getattr(actor, key) != default:
                b.fail(where, key, f"only devices take {key!r}; remove it from this {actor.role}")
    if actor.role != "server" and actor.start_block is not None:
        b.fail(where, "start_block", "only servers take start_block; remove it")
    return actor


# --- cross-table validation -------------------------------------------------------------


def _validate(b: _Builder, topo: Topology, model_config: ModelConfigHint) -> None:
    run = topo.run
    _validate_run(b, topo)
    host_names = [h.name for h in topo.hosts]
    _unique(b, host_names, "[[hosts]]", "name")
    _unique(b, [a.name for a in topo.actors], "[[actors]]", "name")
    for a in topo.actors:
        where = f"[[actors]] {a.name!r}"
        if a.host not in host_names:
            close = difflib.get_close_matches(a.host, host_names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"define it in [[hosts]] ({host_names})"
            b.fail(where, "host", f"host {a.host!r} is not defined; {hint}")
        if not a.name or not all(c.isalnum() or c in "-_." for c in a.name):
            b.fail(where, "name", "use letters, digits, '-', '_' or '.' (names become socket identities)")
        if a.addressed and a.port is None:
            b.fail(where, "port", f"a {a.role} listens; give it a port (0 = ephemeral, one process only)")
        if a.port is not None and not 0 <= a.port <= 65535:
            b.fail(where, "port", f"{a.port} is not a TCP port; use 1..65535 (or 0)")
    seen: dict[tuple[str, int], str] = {}
    for a in topo.actors:
        if a.port:
            address = topo.host(a.host).address
            if (address, a.port) in seen:
                b.fail(
                    f"[[actors]] {a.name!r}",
                    "port",
                    f"port {a.port} on {address} is also used by "
                    f"{seen[(address, a.port)]!r}; pick another port",
                )
            seen[(address, a.port)] = a.name
    coordinators = topo.by_role("coordinator")
    if len(coordinators) != 1:
        b.fail(
            "[[actors]]",
            "role",
            f"exactly one coordinator is required, found {len(coordinators)}; "
            'add (or remove) an actor with role = "coordinator"',
        )
    if not topo.devices:
        b.fail("[[actors]]", "role", 'no device actors; add at least one [[actors]] with role = "device"')
    if not topo.servers and run.train.mode != "fedlora":
        b.fail(
            "[[actors]]",
            "role",
            f"mode {run.train.mode!r} needs a server; add an [[actors]] table with "
            'role = "server" (only fedlora runs without one)',
        )
    config = model_config(run.model)
    _validate_split(b, topo, None if config is None else config.num_blocks)


def _validate_run(b: _Builder, topo: Topology) -> None:
    run = topo.run
    if not run.name or not all(c.isalnum() or c in "-_." for c in run.name):
        b.fail("[run]", "name", f"{run.name!r} must be non-empty letters, digits, '-', '_' or '.'")
    t = run.train
    for key in (
        "rounds",
        "steps_per_round",
        "batch_size",
        "seq_len",
        "aggregate_every",
        "max_inflight",
        "calibration_batches",
    ):
        if getattr(t, key) < 1:
            b.fail("[run.train]", key, f"must be at least 1, got {getattr(t, key)}")
    if t.eval_batches < 0:
        b.fail("[run.train]", "eval_batches", "must be 0 or more")
    if t.round_timeout_s <= 0:
        b.fail("[run.train]", "round_timeout_s", f"must be positive, got {t.round_timeout_s}")
    if t.lr <= 0:
        b.fail("[run.train]", "lr", f"must be positive, got {t.lr}")
    d = run.data
    if d.alpha <= 0:
        b.fail("[run.data]", "alpha", "the Dirichlet concentration must be positive")
    if not 0 < d.heldout_fraction < 1:
        b.fail("[run.data]", "heldout_fraction", f"must be in (0, 1), got {d.heldout_fraction}")
    rt = run.runtime
    for key in (
        "heartbeat_interval_s",
        "heartbeat_timeout_s",
        "connect_timeout_s",
        "request_timeout_s",
        "drain_timeout_s",
        "max_message_mb",
    ):
        if getattr(rt, key) <= 0:
            b.fail("[run.runtime]", key, "must be positive")
    if rt.heartbeat_timeout_s < 2 * rt.heartbeat_interval_s:
        b.fail(
            "[run.runtime]",
            "heartbeat_timeout_s",
            f"{rt.heartbeat_timeout_s}s would flag healthy peers; "
            f"make it at least 2 × heartbeat_interval_s ({2 * rt.heartbeat_interval_s}s)",
        )
    for key in ("link_window", "mailbox_size", "hwm"):
        if getattr(rt, key) < 1:
            b.fail("[run.runtime]", key, "must be at least 1")
    if rt.linger_ms < 0:
        b.fail("[run.runtime]", "linger_ms", "must be 0 or more")


def _validate_split(b: _Builder, topo: Topology, blocks: int | None) -> None:
    devices = topo.devices
    shards: dict[int, str] = {}
    for i, d in enumerate(devices):
        where = f"[[actors]] {d.name!r}"
        if d.cut is None:
            if topo.run.train.mode == "fedlora":
                continue
            b.fail(where, "cut", "a device needs cut = <number of blocks it runs>")
        if d.cut < 1 or (blocks is not None and d.cut > blocks):
            bound = f"1..{blocks}" if blocks is not None else "at least 1"
            b.fail(where, "cut", f"cut {d.cut} is outside model {topo.run.model!r}; use {bound}")
        shard = d.shard if d.shard is not None else i
        if shard < 0:
            b.fail(where, "shard", "must be 0 or more")
        if shard in shards:
            b.fail(where, "shard", f"shard {shard} is also used by {shards[shard]!r}; give each its own")
        shards[shard] = d.name
        link = d.link
        for key in ("uplink_mbps", "downlink_mbps"):
            rate = getattr(link, key)
            if rate is not None and rate <= 0:
                b.fail(f"{where}.link", key, "must be positive (leave it out for an unpaced link)")
        if link.rtt_ms < 0:
            b.fail(f"{where}.link", "rtt_ms", "must be 0 or more")
    cuts = [d.cut for d in devices if d.cut is not None]
    # Several servers are stages of one server: [start_k, start_{k+1}). The first stage must
    # start at or below every device cut; later stages split the remaining blocks.
    default_start = min(cuts, default=0)
    starts = {s.name: (s.start_block if s.start_block is not None else default_start) for s in topo.servers}
    first = min(starts.values(), default=0)
    seen: dict[int, str] = {}
    for s in topo.servers:
        where = f"[[actors]] {s.name!r}"
        if s.start_block is not None and s.start_block < 0:
            b.fail(where, "start_block", "must be 0 or more")
        if starts[s.name] in seen:
            b.fail(
                where,
                "start_block",
                f"stage {seen[starts[s.name]]!r} also starts at block {starts[s.name]}; "
                "give each server stage its own start_block",
            )
        seen[starts[s.name]] = s.name
        if blocks is not None and starts[s.name] >= blocks and len(topo.servers) > 1:
            b.fail(where, "start_block", f"a stage must start below the model's {blocks} blocks")
    if cuts and first > min(cuts):
        low = min(devices, key=lambda d: d.cut or 0)
        name = min(starts, key=lambda n: starts[n])
        b.fail(
            f"[[actors]] {name!r}",
            "start_block",
            f"the server starts at block {first} but "
            f"device {low.name!r} cuts at {low.cut}; set start_block <= {min(cuts)} (or leave it out)",
        )


def _resolve_defaults(topo: Topology) -> tuple[ActorSpec, ...]:
    """Defaults that depend on other tables: shard = device index, server start = min cut."""
    cuts = [d.cut for d in topo.devices if d.cut is not None]
    resolved = []
    device_index = 0
    for a in topo.actors:
        if a.role == "device":
            if a.shard is None:
                a = dataclasses.replace(a, shard=device_index)
            device_index += 1
        elif a.role == "server" and a.start_block is None and cuts:
            a = dataclasses.replace(a, start_block=min(cuts))
        resolved.append(a)
    return tuple(resolved)


def _unique(b: _Builder, names: list[str], where: str, key: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            b.fail(where, key, f"{n!r} appears twice; names must be unique")
        seen.add(n)


__all__ = ["ROLES", "ModelConfigHint", "load_topology", "parse_topology"]
