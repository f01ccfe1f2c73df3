"""structlog set-up: JSON lines for machines, key=value console output for people.

Event names are snake_case facts (``activations_sent``) with numbers as fields; context
such as actor, role, node, round and step is bound once with :func:`bind` and carried.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal, TextIO

import structlog

LogFormat = Literal["console", "json"]


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is *now*.

    Binding the stream object at configure time breaks when the stream is later replaced and
    closed (test runners' capture, a CLI runner): every later log line would raise
    "I/O operation on closed file" inside the actor that logs it.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(fmt: LogFormat = "console", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog process-wide. Safe to call more than once (last call wins)."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; use debug, info, warning or error")
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    elif fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        raise ValueError(f"unknown log format {fmt!r}; use console or json")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream if stream is not None else _CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


def get_logger(**context: Any) -> Any:
    """A logger carrying ``context`` (e.g. ``actor="dev0", role="device"``).

    It is a lazy proxy: safe to create at import time, it follows a later :func:`configure`.
    """
    return structlog.get_logger(**context)


def bind(**context: Any) -> None:
    """Bind context for the current task (contextvars), e.g. ``round=3``."""
    structlog.contextvars.bind_contextvars(**context)


class Throttle:
    """Bounded-rate logging of repeated events (a flood of refused strangers must not flood logs).

    :meth:`due` answers, per key, whether to log now: the first event of a key is logged, then
    at most one per ``interval_s`` (seconds on ``clock``, a ``time.monotonic``-like callable),
    and the logged line carries how many events of that key were ``suppressed`` since the last
    line. At most ``max_keys`` keys are remembered (the oldest is forgotten), so a stranger
    varying its key cannot grow memory either.
    """

    def __init__(self, now: Any, *, interval_s: float = 10.0, max_keys: int = 256) -> None:
        self._now = now
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._last: dict[str, tuple[float, int]] = {}
        #: Events seen, logged or not, over the life of the throttle.
        self.total = 0

    def due(self, key: str) -> int | None:
        """None: stay quiet. An int: log now, with that many events suppressed since."""
        self.total += 1
        now = self._now()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval_s:
            self._last[key] = (last[0], last[1] + 1)
            return None
        self._last.pop(key, None)
        if len(self._last) >= self.max_keys:
            self._last.pop(next(iter(self._last)))
        self._last[key] = (now, 0)
        return 0 if last is None else last[1]
