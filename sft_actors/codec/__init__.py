"""Activation/gradient codec: a chain of stages described entirely by its metadata.

spec = ChainSpec.parse({"sparsify": {"keep": 0.1}, "quantize": {"bits": 8, "scale": "token"},
                        "lossless": {"positions": "bitmap", "zstd_level": 3}})
enc = Codec(spec).encode(x, seed=step)      # enc.meta (msgpack-able), enc.payload (bytes)
x_hat = Codec.decode(enc.meta, enc.payload)  # the receiver needs nothing else

The chain *specification* (``ChainSpec`` and its stage specs) imports without torch, so a
topology file parses into it on a machine that only checks configuration; the torch-backed
names (``Codec``, ``Basis``, …) load on first use (PEP 562 module ``__getattr__``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sft_actors.codec.refit import RefitSpec
from sft_actors.codec.spec import (
    CastSpec,
    ChainSpec,
    CodecPolicy,
    LosslessSpec,
    OutlierSpec,
    ProjectSpec,
    QuantizeSpec,
    SparsifySpec,
)

if TYPE_CHECKING:
    from sft_actors.codec.chain import Codec
    from sft_actors.codec.entropy import ans_available
    from sft_actors.codec.project import Basis, BasisRegistry, fit_basis
    from sft_actors.codec.report import CodecReport, EncodedTensor


def __getattr__(name: str) -> Any:
    """Load the torch-backed part of the codec on first use of one of its names."""
    if name == "Codec":
        from sft_actors.codec import chain

        return chain.Codec
    if name == "ans_available":
        from sft_actors.codec import entropy

        return entropy.ans_available
    if name in ("Basis", "BasisRegistry", "fit_basis"):
        from sft_actors.codec import project

        return getattr(project, name)
    if name in ("CodecReport", "EncodedTensor"):
        from sft_actors.codec import report

        return getattr(report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Basis",
    "BasisRegistry",
    "CastSpec",
    "ChainSpec",
    "Codec",
    "CodecPolicy",
    "CodecReport",
    "EncodedTensor",
    "LosslessSpec",
    "OutlierSpec",
    "ProjectSpec",
    "QuantizeSpec",
    "RefitSpec",
    "SparsifySpec",
    "ans_available",
    "fit_basis",
]
