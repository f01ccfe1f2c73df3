"""Activation/gradient codec: a chain of stages described entirely by its metadata.

spec = ChainSpec.parse({"sparsify": {"keep": 0.1}, "quantize": {"bits": 8, "scale": "token"},
                        "lossless": {"positions": "bitmap", "zstd_level": 3}})
enc = Codec(spec).encode(x, seed=step)      # enc.meta (msgpack-able), enc.payload (bytes)
x_hat = Codec.decode(enc.meta, enc.payload)  # the receiver needs nothing else
"""

from sft_actors.codec.chain import Codec
from sft_actors.codec.entropy import ans_available
from sft_actors.codec.project import Basis, BasisRegistry
from sft_actors.codec.report import CodecPolicy, CodecReport, EncodedTensor
from sft_actors.codec.spec import (
    CastSpec,
    ChainSpec,
    LosslessSpec,
    OutlierSpec,
    ProjectSpec,
    QuantizeSpec,
    SparsifySpec,
)

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
    "SparsifySpec",
    "ans_available",
]
