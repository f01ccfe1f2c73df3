"""Results of an encode, telemetry, and the per-role policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(kw_only=True, frozen=True, slots=True)
class CodecReport:
    """What one encode cost and achieved (for telemetry and benchmarks).

    ``stage_bytes`` maps each chain stage to the bytes its output would take on the wire at that
    point (``input`` first, raw in the input dtype); ``kept_fraction`` counts every element whose
    value is transmitted (sparse kept values plus those sent densely in 16 bit).
    ``rel_error`` is ‖x̂ - x‖ / ‖x‖, only with ``encode(..., measure_error=True)``.
    """

    raw_bytes: int
    encoded_bytes: int
    stage_bytes: dict[str, int]
    encode_ms: float
    kept_fraction: float
    rel_error: float | None = None
    #: Rate control's byte target of this frame (None: no rate control), and whether every
    #: code came out zero (the target left nothing but the dense parts and side information).
    target_bytes: int | None = None
    all_zero: bool = False

    def rate_warning(self) -> str | None:
        """Why this frame is not what rate control was asked for (None when it is): off its
        byte target by more than 3 %, or every code zero."""
        if self.target_bytes is None:
            return None
        if self.all_zero:
            return "every code is zero: the ratio leaves no bytes for the values; lower quantize.ratio"
        if abs(self.encoded_bytes - self.target_bytes) > 0.03 * self.target_bytes:
            return (
                f"{self.encoded_bytes} bytes for a target of {self.target_bytes}: the dense parts and "
                "side information alone exceed it, or the finest step spends less; change quantize.ratio"
            )
        return None

    @property
    def ratio(self) -> float:
        """Raw bytes of the input ÷ payload bytes (∞ for an empty payload of a non-empty tensor)."""
        if self.encoded_bytes == 0:
            return 1.0 if self.raw_bytes == 0 else float("inf")
        return self.raw_bytes / self.encoded_bytes

    def as_fields(self) -> dict[str, Any]:
        """Flat fields for a structlog event."""
        out: dict[str, Any] = {
            "raw_bytes": self.raw_bytes,
            "encoded_bytes": self.encoded_bytes,
            "ratio": round(self.ratio, 3),
            "encode_ms": round(self.encode_ms, 3),
            "kept_fraction": round(self.kept_fraction, 5),
        }
        if self.rel_error is not None:
            out["rel_error"] = self.rel_error
        return out


@dataclass(kw_only=True, frozen=True, slots=True)
class EncodedTensor:
    """``meta`` (msgpack-able, everything decode needs) and one ``payload`` buffer."""

    meta: dict[str, Any]
    payload: bytes
    report: CodecReport = field(compare=False)
