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

from sft_actors.codec import BasisRegistry, Codec, CodecPolicy
from sft_actors.errors import ConfigError


def uses_codec(mode: str) -> bool:
    return mode == "sft"


def sequential(mode: str) -> bool:
    return mode == "sl"


def whole_model_on_device(mode: str) -> bool:
    return mode == "fedlora"


def policy_table(mode: str, codec_table: dict[str, Any]) -> dict[str, Any]:
    """The codec policy (as a plain table) a mode actually uses: identity unless ``sft``."""
    return dict(codec_table) if uses_codec(mode) else {}


def codecs(table: dict[str, Any], *, bases: BasisRegistry | None = None) -> tuple[Codec | None, Codec | None]:
    """(up, down) codecs from a policy table; None where the chain is the identity (raw bytes).

    A ``project`` stage needs ``bases`` (the device fits its basis, the server receives it);
    it applies to activations only: gradients have no calibration data to fit a basis on.
    """
    policy = CodecPolicy.parse(table)
    up = None if policy.up.is_identity else Codec(policy.up, bases=bases)
    return up, down_codec(table)


def down_codec(table: dict[str, Any]) -> Codec | None:
    """The gradient codec alone (what a server needs; it never encodes activations)."""
    policy = CodecPolicy.parse(table)
    if policy.down.project is not None:
        raise ConfigError(
            "codec.down has a project stage; transform coding is for activations (codec.up) only: "
            "remove 'project' from the gradient chain"
        )
    return None if policy.down.is_identity else Codec(policy.down)


def up_spec(table: dict[str, Any]) -> Any:
    """The activation chain (a ``ChainSpec``) of a policy table."""
    return CodecPolicy.parse(table).up
