"""The clock seam: ManualClock wakes sleepers exactly when told, in deadline order, never early."""

from __future__ import annotations

import asyncio

import pytest

from sft_actors.clock import SYSTEM_CLOCK, Clock, ManualClock, SystemClock

pytestmark = pytest.mark.timeout(30)


def test_both_clocks_implement_the_protocol() -> None:
    assert isinstance(SYSTEM_CLOCK, SystemClock) and isinstance(SYSTEM_CLOCK, Clock)
    assert isinstance(ManualClock(), Clock)


@pytest.mark.asyncio
async def test_sleepers_wake_in_deadline_order_and_never_early() -> None:
    clock = ManualClock(start=5.0)
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((name, clock.now()))

    tasks = [
        asyncio.ensure_future(sleeper(n, s)) for n, s in [("c", 3.0), ("a", 1.0), ("b", 2.0), ("a2", 1.0)]
    ]
    await clock.wait_for_sleepers(4)
    assert clock.deadlines == [6.0, 6.0, 7.0, 8.0] and clock.next_deadline == 6.0
    assert clock.advance(0.5) == 0  # nobody is due at 5.5
    await clock.wait_parked(*tasks)
    assert woke == [] and clock.sleepers == 4
    assert clock.advance(2.0) == 3  # 7.5: a, a2 (same deadline: in sleep order) and b
    await asyncio.gather(*tasks[1:])
    assert woke == [("a", 7.5), ("a2", 7.5), ("b", 7.5)]  # deadline order, ties in sleep order
    assert clock.deadlines == [8.0] and clock.is_asleep(tasks[0])
    clock.advance_to(8.0)
    await tasks[0]
    assert woke[-1] == ("c", 8.0) and clock.sleepers == 0 and clock.next_deadline is None


@pytest.mark.asyncio
async def test_sleep_until_the_past_returns_without_waiting_and_time_never_goes_back() -> None:
    clock = ManualClock(start=1.0)
    await clock.sleep_until(1.0)  # due now: returns without an advance (else this test hangs)
    await clock.sleep(0)
    assert clock.sleepers == 0
    with pytest.raises(ValueError, match="cannot go back"):
        clock.advance(-0.1)
    with pytest.raises(ValueError, match="cannot go back"):
        clock.advance_to(0.5)
    assert clock.now() == 1.0


@pytest.mark.asyncio
async def test_a_cancelled_sleeper_no_longer_counts() -> None:
    clock = ManualClock()
    task = asyncio.ensure_future(clock.sleep(10.0))
    await clock.wait_parked(task)
    assert clock.sleepers == 1 and clock.is_asleep(task)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert clock.sleepers == 0 and not clock.is_asleep(task) and clock.deadlines == []
    assert clock.advance(20.0) == 0
