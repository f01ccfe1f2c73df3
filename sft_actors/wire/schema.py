"""The schema hash a HELLO carries: two peers agree on it or refuse to talk.

It covers what must be identical on both sides of a cut for training to be meaningful: model
id, split plan, LoRA config, dtype and codec set. It is a sha256 over a canonical msgpack
encoding (maps sorted by key, tuples and sets as sorted/ordered lists, dataclasses and enums as
their values), so it is the same in every process, on every machine and every Python version.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
from typing import Any, Final

import msgpack

from sft_actors.errors import ConfigError, SchemaMismatch

# Bump when the canonical form changes, so old and new hashes can never collide by accident.
_DOMAIN: Final[str] = "sft_actors.schema/1"


def _canonical(value: Any, path: str) -> Any:
    if value is None or type(value) in (bool, int, float, str, bytes):
        return value
    if isinstance(value, enum.Enum):
        return _canonical(value.value, path)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _canonical(getattr(value, f.name), f"{path}.{f.name}") for f in dataclasses.fields(value)
        }
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"schema part {path}: map keys must be str, got {key!r}")
            out[key] = _canonical(item, f"{path}.{key}")
        return dict(sorted(out.items()))
    if isinstance(value, list | tuple):
        return [_canonical(item, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, set | frozenset):
        # A set has no order; sort by the canonical bytes of each element.
        items = [_canonical(item, f"{path}{{}}") for item in value]
        return sorted(items, key=lambda item: _pack(item))
    raise ConfigError(
        f"schema part {path} has type {type(value).__name__}; use str, numbers, bool, None, "
        "lists, dicts with str keys, sets, enums or dataclasses of those"
    )


def _pack(value: Any) -> bytes:
    try:
        packed: bytes = msgpack.packb(value, use_bin_type=True, use_single_float=False, strict_types=True)
    except (OverflowError, ValueError, TypeError) as exc:
        raise ConfigError(f"schema part cannot be hashed: {exc}") from exc
    return packed


def schema_hash(**parts: Any) -> str:
    """Hex sha256 of the named configuration parts, e.g.

    ``schema_hash(model="smollm2-135m", split=[4, 6], lora=lora_cfg, dtype="float32",
    codecs={"topk", "quant8", "zstd"})``. Key order does not matter; values do.
    """
    canonical = {"domain": _DOMAIN, "parts": _canonical(parts, "parts")}
    return hashlib.sha256(_pack(canonical)).hexdigest()


def check_schema(local: str, remote: str, *, peer: str) -> None:
    """Refuse a peer configured differently (call it when a HELLO/WELCOME arrives)."""
    if local != remote:
        raise SchemaMismatch(
            f"peer {peer!r} has schema {remote[:16]}…, this node has {local[:16]}…: model, split plan, "
            "LoRA config, dtype or codec set differ; start both from the same topology file"
        )
