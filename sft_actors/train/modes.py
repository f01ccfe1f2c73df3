"""What each training mode means, in one place (the baselines run in the same runtime).

======== ======================= ============ ==========================================
mode     devices                 codec        server
======== ======================= ============ ==========================================
sl       one at a time (relay)   off          shared; device adapters relayed device→device
sfl      in parallel             off          shared; device adapters averaged per block
sft      in parallel             on           shared; device adapters averaged per block
fedlora  in parallel, whole      n/a          unused: each device trains every block itself
======== ======================= ============ ==========================================
"""

from __future__ import annotations

from typing import Any

from sft_actors.codec import Codec, CodecPolicy


def uses_codec(mode: str) -> bool:
    return mode == "sft"


def sequential(mode: str) -> bool:
    return mode == "sl"


def whole_model_on_device(mode: str) -> bool:
    return mode == "fedlora"


def policy_table(mode: str, codec_table: dict[str, Any]) -> dict[str, Any]:
    """The codec policy (as a plain table) a mode actually uses: identity unless ``sft``."""
    return dict(codec_table) if uses_codec(mode) else {}


def codecs(table: dict[str, Any]) -> tuple[Codec | None, Codec | None]:
    """(up, down) codecs from a policy table; None where the chain is the identity (raw bytes)."""
    policy = CodecPolicy.parse(table)
    up = None if policy.up.is_identity else Codec(policy.up)
    down = None if policy.down.is_identity else Codec(policy.down)
    return up, down
