"""Rate control's misses in the log: once per round, direction and device, greppable.

A chain's ``quantize.ratio`` is a target; a frame whose dense parts alone exceed it, or whose
values all quantized to zero, still travels (training goes on), but the user should hear of it.
"""

from __future__ import annotations

from typing import Any

from sft_actors.codec import CodecReport


class RateWarnings:
    """Remembers which (round, direction, device) already logged ``rate_target_missed``."""

    def __init__(self) -> None:
        self._seen: set[tuple[int, str, str]] = set()

    def check(
        self, log: Any, report: CodecReport | None, round_: int, *, direction: str, device: str = ""
    ) -> None:
        """Log ``report``'s :meth:`~CodecReport.rate_warning`, the first time in this round."""
        why = report.rate_warning() if report is not None else None
        if why is None or report is None or (round_, direction, device) in self._seen:
            return
        self._seen.add((round_, direction, device))
        target = report.raw_bytes / report.target_bytes if report.target_bytes else None
        log.warning(
            "rate_target_missed",
            round=round_,
            direction=direction,
            device=device or None,
            target_ratio=round(target, 2) if target else None,
            ratio=round(report.ratio, 2),
            why=why,
        )
