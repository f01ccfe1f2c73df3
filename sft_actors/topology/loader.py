"""Read a topology TOML file into :class:`Topology` and validate it.

Every error is a :class:`TopologyError` naming the file, the table, the key and the fix.
Tables map onto the schema dataclasses field by field, so the schema *is* the list of
allowed keys; unknown keys come with a close-match suggestion. Checks across tables live in
``validate``, checks that need more than the file (model config, dataset files, dtype) in
``checks``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
import types
import typing
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from sft_actors.codec.refit import RefitSpec
from sft_actors.codec.spec import ChainSpec, CodecPolicy
from sft_actors.errors import ConfigError, TopologyError
from sft_actors.log import get_logger
from sft_actors.topology.checks import (
    ModelConfigHint,
    check_environment,
    default_model_config,
    topology_warnings,
)
from sft_actors.topology.report import Reporter, read_error
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
from sft_actors.topology.validate import resolve_defaults, validate_split, validate_tables


def load_topology(
    path: str | Path,
    *,
    model_config: ModelConfigHint | None = None,
    roles: Collection[str] = ROLES,
    log_warnings: bool = True,
) -> Topology:
    """Load and validate ``path``; every problem is one :class:`TopologyError` line.

    ``roles`` are the roles whose actors run in this process (default: all, as ``sft run``
    does): the dataset's files must be here only when devices are. What the file sets but the
    run ignores (:func:`~sft_actors.topology.checks.topology_warnings`) is logged as a
    ``topology_warning`` unless ``log_warnings`` is false (a caller that prints them itself).
    """
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise read_error(p, exc) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(f"{p}: not valid TOML: {exc}; fix the syntax at that line") from exc
    topo = parse_topology(data, source=str(p), model_config=model_config, roles=roles)
    for warning in topology_warnings(topo) if log_warnings else ():
        get_logger(component="topology").warning("topology_warning", warning=warning)
    return topo


def parse_topology(
    data: Mapping[str, Any],
    *,
    source: str = "<topology>",
    model_config: ModelConfigHint | None = None,
    roles: Collection[str] = ROLES,
) -> Topology:
    """Validate an already-parsed TOML document (tests build them inline); see :func:`load_topology`."""
    b = _Builder(source)
    _check_finite(b, data, "top level")
    for key, value in data.items():  # e.g. [runtime] for [run.runtime], a key above [run]
        if key in RunConfig.__dataclass_fields__:
            fix = f"rename the table [run.{key}]" if isinstance(value, Mapping) else "move it under [run]"
            b.fail("top level", key, f"{key!r} belongs inside [run]; {fix}")
    b.check_keys(data, {"run", "hosts", "actors"}, "top level")
    if "run" not in data:
        b.fail("top level", "run", "a [run] table is required; add [run] with name and model")
    run = _run_config(b, b.table(data["run"], "[run]"))
    hosts = tuple(
        b.build(HostSpec, b.table(h, f"[[hosts]] #{i + 1}"), f"[[hosts]] #{i + 1}")
        for i, h in enumerate(b.array(data.get("hosts", []), "hosts"))
    )
    raw_actors = b.array(data.get("actors", []), "actors")
    actors = tuple(_actor(b, b.table(a, f"[[actors]] #{i + 1}"), i, hosts) for i, a in enumerate(raw_actors))
    topo = Topology(source=source, run=run, hosts=hosts or (HostSpec(name=LOCALHOST),), actors=actors)
    validate_tables(b, topo)
    config = (model_config or default_model_config(b))(run.model)
    validate_split(b, topo, None if config is None else config.num_blocks)
    data_warnings = check_environment(b, topo, config, roles)
    return dataclasses.replace(topo, actors=resolve_defaults(topo), data_warnings=tuple(data_warnings))


def _check_finite(b: Reporter, value: Any, where: str, key: str | None = None) -> None:
    """Refuse NaN and infinity anywhere (TOML has ``nan`` and ``inf``), typed field or not: a
    NaN learning rate or codec factor would otherwise pass every comparison and train garbage."""
    if isinstance(value, float) and not math.isfinite(value):
        b.fail(where, key, f"expected a finite number, got {value!r}; write a number")
    if isinstance(value, Mapping):
        for k, v in value.items():
            if isinstance(v, Mapping):
                _check_finite(b, v, _subtable(where, str(k)))
            elif isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v):
                for i, x in enumerate(v):
                    inner = f"[[{k}]]" if where == "top level" else _subtable(where, str(k))
                    _check_finite(b, x, f"{inner} #{i + 1}")
            else:
                _check_finite(b, v, where, str(k))
    elif isinstance(value, list):
        for x in value:
            _check_finite(b, x, where, key)


def _subtable(where: str, key: str) -> str:
    """``[run]`` + ``train`` → ``[run.train]``; ``[[actors]] #3`` + ``link`` → ``[[actors]] #3.link``."""
    if where == "top level":
        return f"[{key}]"
    if where.startswith("[["):
        return f"{where}.{key}"
    return f"[{where[1:-1]}.{key}]"


# --- building ----------------------------------------------------------------------------


class _Builder(Reporter):
    """Builds schema dataclasses from TOML tables, failing on the first wrong key or value."""

    def table(self, value: Any, where: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            self.fail(where, None, f"expected a table, got {type(value).__name__}; write it as a table")
        return value

    def array(self, value: Any, key: str) -> list[Any]:
        """Top-level ``key`` as an array of tables (``[[key]]``)."""
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            got = repr(value) if len(repr(value)) < 40 else type(value).__name__
            self.fail("top level", key, f"expected an array of tables, got {got}; write each as [[{key}]]")
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
            # Its message names the field it refused ("LoRA alpha must be ..."): point at it.
            named = [n for n in sorted(names) if re.search(rf"\b{re.escape(n)}\b", str(exc))]
            self.fail(where, named[0] if named else None, f"{exc}; fix the value")

    def codec_policy(self, value: Any, where: str, key: str) -> CodecPolicy:
        """``{up = {...}, down = {...}, refit = {...}}``: each chain (and the refit policy)
        judged by the codec's own parser."""
        table = self.table(value, f"{where}, key {key!r}")
        self.check_keys(table, {"up", "down", "refit"}, f"{where}, table {key!r}")
        chains: dict[str, ChainSpec] = {}
        for role in ("up", "down"):
            try:
                chains[role] = ChainSpec.parse(table.get(role, {}))
            except ConfigError as exc:
                self.fail(where, f"{key}.{role}", f"invalid codec chain: {exc}")
        try:
            refit = RefitSpec.parse(table.get("refit", {}))
        except ConfigError as exc:
            self.fail(where, f"{key}.refit", f"invalid refit policy: {exc}")
        try:
            return CodecPolicy(**chains, refit=refit)
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
                self.fail(where, key, _not_one_of(value, args, key))
            return value
        if origin is tuple:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                self.fail(where, key, f'expected a list of strings, got {value!r}; write ["a", "b"]')
            return tuple(value)
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                self.fail(where, key, f"expected a finite number, got {value!r}; write a number")
            return float(value)
        if tp is CodecPolicy:
            return self.codec_policy(value, where, key)
        if origin is dict or tp is dict:
            return dict(self.table(value, _subtable(where, key)))
        if dataclasses.is_dataclass(tp):
            return self.build(tp, self.table(value, _subtable(where, key)), _subtable(where, key))
        if tp is bool:
            if not isinstance(value, bool):
                self.fail(where, key, f"expected true or false, got {value!r}; write true or false")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                self.fail(where, key, f"expected an integer, got {value!r}; write a whole number")
            return value
        if tp is str:
            if not isinstance(value, str):
                self.fail(where, key, f"expected a string, got {value!r}; write it in quotes")
            return value
        raise AssertionError(f"schema type {tp!r} not handled")  # pragma: no cover - schema bug


#: Literal values a key accepts but a run refuses (a later check says why): not offered as choices.
_NOT_FOR_TRAINING: dict[str, tuple[str, str]] = {"dtype": ("float16", "float16 loads for inference only")}


def _not_one_of(value: Any, args: tuple[Any, ...], key: str) -> str:
    """Why ``value`` is not one of the Literal ``args``, with a case-insensitive close match."""
    hidden, note = _NOT_FOR_TRAINING.get(key, (None, ""))
    offered = [str(a) for a in args if a != hidden]
    lower = {o.lower(): o for o in offered}
    close = difflib.get_close_matches(str(value).lower(), list(lower), n=1)
    hint = f" (did you mean {lower[close[0]]!r}?)" if close else ""
    choices = ", ".join(map(repr, offered))
    return f"{value!r} is not one of {choices}{hint}; use one of them" + (f" ({note})" if note else "")


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


__all__ = ["ROLES", "ModelConfigHint", "load_topology", "parse_topology"]
