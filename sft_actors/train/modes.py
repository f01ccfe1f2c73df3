"""What each training mode means, in one place (the baselines run in the same runtime).

======== ======================= ============ ==========================================
mode     devices                 codec        server
======== ======================= ============ ==========================================
sl       one at a time (relay)   off          shared; device adapters relayed device→device
sfl      in parallel             off          shared; device adapters averaged per block
sft      in parallel             on           shared; device adapters averaged per block
fedlora  in parallel, whole      n/a          unused: each device trains every block itself
======== ======================= ============ ==========================================

Whether a mode codes is decided once, when the coordinator builds the plans
(``sft_actors.plan.assign``): a plan's codec policy is the identity in every mode but ``sft``.
"""

from __future__ import annotations

from sft_actors.codec import BasisRegistry, Codec
from sft_actors.codec.spec import ChainSpec


def sequential(mode: str) -> bool:
    """Devices train one after the other, each starting from the previous one's adapters."""
    return mode == "sl"


def whole_model_on_device(mode: str) -> bool:
    """Each device holds every block (federated LoRA); no server takes part in training."""
    return mode == "fedlora"


def codec_for(chain: ChainSpec, *, bases: BasisRegistry | None = None) -> Codec | None:
    """The codec of one chain; None for the identity (raw tensors, bit-exact).

    A ``project`` stage needs ``bases`` (the device fits its basis, the server receives it).
    """
    return None if chain.is_identity else Codec(chain, bases=bases)
