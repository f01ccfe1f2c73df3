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
