"""The time source of heartbeats, watchdogs and link pacing, injectable so tests drive time.

Everything in the runtime that waits for, or measures, a span of time asks a :class:`Clock`
instead of ``time.monotonic``/``asyncio.sleep``. Production uses :data:`SYSTEM_CLOCK`; a test
hands an actor (``ActorEnv.clock``) or a pacer a :class:`ManualClock` and moves time itself
with :meth:`ManualClock.advance`, in the spirit of trio's ``MockClock``: nothing sleeps for
real, and no assert depends on how fast the machine is.

All times are seconds on a monotonic scale with an arbitrary origin (not wall-clock time).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """A monotonic time source that can also wait."""

    def now(self) -> float:
        """The current time, in seconds (monotonic, arbitrary origin)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (≤ 0: just yield to the event loop once)."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Wait until :meth:`now` reaches ``deadline`` (seconds); returns at once if it has."""
        ...


class SystemClock:
    """The real clock: ``time.monotonic`` and ``asyncio.sleep``."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def sleep_until(self, deadline: float) -> None:
        delay = deadline - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


#: The default clock of every actor and pacer.
SYSTEM_CLOCK: Clock = SystemClock()


class ManualClock:
    """A clock that moves only when told to (tests): :meth:`advance` wakes due sleepers.

    Sleepers wake in deadline order (ties: in the order they went to sleep) when the clock
    reaches their deadline; a sleeper never wakes early, and one wakes only as far as the
    clock was moved (advancing by three heartbeat intervals at once wakes a heartbeat loop
    once, at the new time). Waking only schedules the sleeping task; to know that woken
    tasks have run and gone back to sleep, await :meth:`wait_for_sleepers` (a count, for tasks
    the test cannot name, like an actor's heartbeat loop) or :meth:`wait_parked` (named tasks).
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        # (deadline, sequence number, future): the sequence number breaks ties in sleep order.
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._sleeping: dict[asyncio.Task[Any], asyncio.Future[None]] = {}
        self._changed = asyncio.Event()  # set whenever a task starts sleeping (or a parked one ends)

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)  # like asyncio.sleep(0): a cooperative yield, no time passes
            return
        await self.sleep_until(self._now + seconds)

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._now:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (deadline, next(self._seq), fut))
        task = asyncio.current_task()
        if task is not None:
            self._sleeping[task] = fut
        self._changed.set()
        try:
            await fut
        finally:
            fut.cancel()  # a cancelled sleeper no longer counts (no-op once woken)
            if task is not None and self._sleeping.get(task) is fut:
                del self._sleeping[task]

    def advance(self, seconds: float) -> int:
        """Move time forward by ``seconds`` (≥ 0); returns how many sleepers were woken."""
        if seconds < 0:
            raise ValueError(f"a monotonic clock cannot go back ({seconds} s)")
        return self.advance_to(self._now + seconds)

    def advance_to(self, when: float) -> int:
        """Move time to ``when`` (seconds, not before :meth:`now`); wake sleepers due by then."""
        if when < self._now:
            raise ValueError(f"a monotonic clock cannot go back from {self._now} to {when}")
        self._now = when
        woken = 0
        while self._heap and self._heap[0][0] <= when:
            _, _, fut = heapq.heappop(self._heap)
            if not fut.done():
                fut.set_result(None)
                woken += 1
        return woken

    @property
    def deadlines(self) -> list[float]:
        """Deadlines (seconds) of the tasks asleep on this clock, earliest first."""
        return sorted(d for d, _, fut in self._heap if not fut.done())

    @property
    def next_deadline(self) -> float | None:
        """The earliest deadline of a sleeping task, or None when none sleeps."""
        pending = self.deadlines
        return pending[0] if pending else None

    @property
    def sleepers(self) -> int:
        """How many tasks are asleep on this clock right now."""
        return sum(not fut.done() for _, _, fut in self._heap)

    async def wait_for_sleepers(self, n: int) -> None:
        """Wait until at least ``n`` tasks are asleep on this clock.

        After :meth:`advance`, woken tasks are runnable, not asleep: waiting for as many
        sleepers as the test drives (say an actor's heartbeat and watchdog loops) orders the
        test after every woken task has finished its step and gone back to sleep.
        """
        while self.sleepers < n:
            self._changed.clear()
            await self._changed.wait()

    def is_asleep(self, task: asyncio.Task[Any]) -> bool:
        """Whether ``task`` is waiting on this clock (a woken task that has not run yet is not)."""
        fut = self._sleeping.get(task)
        return fut is not None and not fut.done()

    async def wait_parked(self, *tasks: asyncio.Task[Any]) -> None:
        """Wait until each of ``tasks`` is asleep on this clock or finished.

        Then none of them can read the clock before the next :meth:`advance`: the moment to
        move time without letting a task see a clock that ran ahead of its schedule.
        """

        def changed(_: asyncio.Task[Any]) -> None:
            self._changed.set()

        for task in tasks:
            task.add_done_callback(changed)
        try:
            while not all(t.done() or self.is_asleep(t) for t in tasks):
                self._changed.clear()
                await self._changed.wait()
        finally:
            for task in tasks:
                task.remove_done_callback(changed)


__all__ = ["SYSTEM_CLOCK", "Clock", "ManualClock", "SystemClock"]
