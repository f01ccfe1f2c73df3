"""A small TOML writer for topology files (tomllib reads TOML but does not write it).

Covers what topology files hold: tables, arrays of tables, inline tables inside arrays of
tables, strings, booleans, integers, floats and lists of those. Comments of the source file are
not kept. The output parses back (``tomllib.loads``) to the same dict.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from sft_actors.errors import ConfigError

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }" if v else "{}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise ConfigError(f"cannot write {type(v).__name__} value {v!r} as TOML")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list | tuple) and bool(v) and all(isinstance(x, Mapping) for x in v)


def _emit(table: Mapping[str, Any], path: list[str], out: list[str]) -> None:
    scalars = [(k, v) for k, v in table.items() if not isinstance(v, Mapping) and not _is_table_array(v)]
    tables = [(k, v) for k, v in table.items() if isinstance(v, Mapping)]
    arrays = [(k, v) for k, v in table.items() if _is_table_array(v)]
    for k, v in scalars:
        out.append(f"{_key(k)} = {_value(v)}")
    for k, v in tables:
        out.append("")
        out.append("[" + ".".join(_key(p) for p in [*path, k]) + "]")
        _emit(v, [*path, k], out)
    for k, items in arrays:
        for item in items:
            out.append("")
            out.append("[[" + ".".join(_key(p) for p in [*path, k]) + "]]")
            # Sub-tables of an array element are written inline (as topology files do).
            for ik, iv in item.items():
                out.append(f"{_key(ik)} = {_value(iv)}")


def dumps(data: Mapping[str, Any], header: str = "") -> str:
    """TOML text for ``data``; ``header`` lines are written as comments at the top."""
    out = [f"# {line}" if line else "#" for line in header.splitlines()]
    _emit(data, [], out)
    return "\n".join(out).lstrip("\n") + "\n"
