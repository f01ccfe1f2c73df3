"""Shared fixtures. The zmq context fixture fails any test that leaks a socket."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import zmq
import zmq.asyncio

from sft_actors import log

TERM_TIMEOUT_S = 5.0


def pytest_configure(config: pytest.Config) -> None:
    log.configure("console", level="warning")


def _term_or_fail(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    """Terminate ``ctx``; if sockets are still open, term() blocks, so it runs in a thread."""
    done = threading.Event()

    def term() -> None:
        ctx.term()
        done.set()

    t = threading.Thread(target=term, daemon=True)
    t.start()
    t.join(TERM_TIMEOUT_S)
    if not done.is_set():
        ctx.destroy(linger=0)
        pytest.fail(f"zmq context did not terminate within {TERM_TIMEOUT_S}s: a socket leaked")


@pytest.fixture
def zmq_ctx() -> Iterator[zmq.asyncio.Context]:
    """A fresh asyncio zmq Context; the test fails if any socket is left open."""
    ctx = zmq.asyncio.Context()
    yield ctx
    _term_or_fail(ctx)
