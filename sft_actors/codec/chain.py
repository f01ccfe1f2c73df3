"""The codec: runs a :class:`ChainSpec` over a tensor and back.

Encode view of a tensor ``x`` of shape (..., T, C): rows are tokens (N = numel / C), columns are
channels. Stages, each optional:

1. ``outliers`` — first tokens of each sequence, massive tokens and outlier channels go densely
   as float16 (scaled by a power of two, so any finite range fits exactly);
2. ``project`` — the rest becomes PCA coefficients (N, K) in a registered basis;
3. ``sparsify`` — Top-K elements (``tensor``/``token`` scope) or whole rows/columns;
4. ``quantize`` (unbiased, seeded) or ``cast`` (16-bit float);
5. ``lossless`` — positions as bitmap/channel-major bitmap/delta-varint, codes bit-packed, zstd
   and optionally ANS.

The payload is a list of named sections (see ``container``); the metadata holds the spec, the
tensor's dtype/shape, the seed, the section table and a few per-stage numbers.

:class:`Codec` is the entry point; the stages live in ``encode`` and ``decode``, which share
only ``format`` (neither imports the other or this module).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from sft_actors.codec.container import SectionWriter
from sft_actors.codec.decode import decode
from sft_actors.codec.encode import LossyEncoder
from sft_actors.codec.entropy import require_ans
from sft_actors.codec.format import DEFAULT_MAX_ELEMENTS, DTYPE_NAMES, FORMAT_VERSION, RAW_VIEW
from sft_actors.codec.project import BasisRegistry
from sft_actors.codec.report import CodecReport, EncodedTensor
from sft_actors.codec.spec import ChainSpec
from sft_actors.errors import CodecError, ConfigError


class Codec:
    """Encodes tensors with one chain. Thread-safe: it holds only immutable configuration."""

    def __init__(self, spec: ChainSpec, *, bases: BasisRegistry | None = None) -> None:
        if spec.project is not None and bases is None:
            raise ConfigError("codec.project needs a BasisRegistry: Codec(spec, bases=registry)")
        if spec.lossless is not None and spec.lossless.entropy == "ans":
            require_ans()
        self.spec = spec
        self.bases = bases

    def encode(self, x: torch.Tensor, seed: int, *, measure_error: bool = False) -> EncodedTensor:
        """Encode a CPU float tensor; ``seed`` makes the result exactly reproducible."""
        started = time.perf_counter()
        if not isinstance(x, torch.Tensor):
            raise CodecError(f"encode expects a torch.Tensor, got {type(x).__name__}")
        if x.device.type != "cpu":
            raise CodecError(f"encode expects a CPU tensor, got device {x.device}: call .cpu() first")
        dtype = DTYPE_NAMES.get(x.dtype)
        if dtype is None:
            raise CodecError(f"cannot encode dtype {x.dtype}: use float32, bfloat16, float16 or float64")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 63:
            raise CodecError(f"seed must be an int in [0, 2^63), got {seed!r}")
        x = x.detach()
        level = self.spec.lossless.zstd_level if self.spec.lossless is not None else 0
        writer = SectionWriter(level)
        raw_bytes = x.numel() * x.element_size()
        stage_bytes: dict[str, int] = {"input": raw_bytes}
        meta: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "dtype": dtype,
            "shape": list(x.shape),
            "seed": seed,
            "chain": self.spec.to_dict(),
        }
        kept = 1.0
        if x.numel() == 0:
            pass
        elif self.spec.is_identity:
            _encode_identity(x, dtype, writer)
        else:
            kept = LossyEncoder(self.spec, self.bases, x, seed, writer, meta, stage_bytes).run()
        meta["sections"] = writer.sections
        payload = writer.payload()
        stage_bytes["lossless" if self.spec.lossless is not None else "payload"] = len(payload)
        rel_error = None
        if measure_error:
            rel_error = relative_error(x, decode_tensor(meta, payload, bases=self.bases))
        report = CodecReport(
            raw_bytes=raw_bytes,
            encoded_bytes=len(payload),
            stage_bytes=stage_bytes,
            encode_ms=(time.perf_counter() - started) * 1e3,
            kept_fraction=kept,
            rel_error=rel_error,
            target_bytes=meta["rate"]["target"] if "rate" in meta else None,
            all_zero=bool(meta["rate"]["zero"]) if "rate" in meta else False,
        )
        return EncodedTensor(meta=meta, payload=payload, report=report)

    @staticmethod
    def decode(
        meta: dict[str, Any],
        payload: bytes | memoryview,
        *,
        bases: BasisRegistry | None = None,
        max_elements: int | None = None,
    ) -> torch.Tensor:
        """Rebuild the tensor from ``meta`` and ``payload`` alone (plus the run's bases, if any).

        Raises :class:`CodecError` on any malformed or inconsistent input; never allocates
        more than ``max_elements`` (default 2^28) output elements' worth of memory.
        """
        return decode_tensor(
            meta,
            payload,
            bases=bases,
            max_elements=DEFAULT_MAX_ELEMENTS if max_elements is None else max_elements,
        )


def decode_tensor(
    meta: dict[str, Any],
    payload: bytes | memoryview,
    *,
    bases: BasisRegistry | None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Decode ``payload`` described by ``meta``; :class:`CodecError` on malformed input."""
    return decode(meta, payload, bases=bases, max_elements=max_elements)


def relative_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """||x_hat - x|| / ||x|| (L2, in float64); the absolute error when ``x`` is all zeros."""
    ref = x.double()
    norm = float(torch.linalg.vector_norm(ref))
    err = float(torch.linalg.vector_norm(x_hat.double() - ref))
    return err / norm if norm > 0 else err


def _encode_identity(x: torch.Tensor, dtype: str, writer: SectionWriter) -> None:
    if not bool(torch.isfinite(x).all()):
        raise CodecError("tensor contains NaN or inf: fix the producer (e.g. lower the learning rate)")
    view_dtype, _ = RAW_VIEW[dtype]
    writer.add("raw", x.contiguous().reshape(-1).view(view_dtype).numpy().view(np.uint8))
