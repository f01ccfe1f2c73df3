"""Structured concurrency helpers for actors: every task owned, the real error surfaced."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first leaf exception of a (nested) exception group: what a caller should see."""
    exc = group.exceptions[0]
    return first_error(exc) if isinstance(exc, BaseExceptionGroup) else exc


@contextlib.asynccontextmanager
async def task_group() -> AsyncIterator[asyncio.TaskGroup]:
    """``asyncio.TaskGroup`` whose failure never reads as its caller's cancellation.

    A child's error makes the group cancel its parent task; Python 3.11 takes that request
    back only when the body was still running (``uncancel``). A child that fails after the
    body ended (the group waiting in ``__aexit__``) leaves ``current_task().cancelling()`` at 1,
    so an actor's handler that re-raises the group's error looked cancelled, sent no ERROR and
    its caller waited for ``round_timeout_s``. This takes back the group's own request."""
    task = asyncio.current_task()
    before = task.cancelling() if task is not None else 0
    try:
        async with asyncio.TaskGroup() as tg:
            yield tg
    except BaseExceptionGroup:
        if task is not None and task.cancelling() > before:
            task.uncancel()
        raise


async def gather_owned(*coros: Coroutine[Any, Any, T]) -> list[T]:
    """Await concurrently and return results in order, each task owned by a TaskGroup.

    When one fails the others are cancelled (``asyncio.gather`` would leave them running,
    unowned), and the first real error is raised rather than an ExceptionGroup, so the caller
    sees e.g. the device's RemoteError.
    """
    tasks: list[asyncio.Task[T]] = []
    try:
        async with task_group() as tg:
            tasks = [tg.create_task(c) for c in coros]
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    return [t.result() for t in tasks]


async def first_completed(*aws: Any) -> None:
    """Wait until the first of ``aws`` finishes and cancel the others; re-raise its error.

    E.g. ``first_completed(event.wait(), clock.sleep_until(deadline))``: an event or a deadline
    on the actor's clock (never wall time, so tests drive it with a ManualClock)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
    for t in done:
        if not t.cancelled() and t.exception() is not None:
            raise t.exception()
