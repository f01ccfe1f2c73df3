"""Link emulation: pace one direction of a link to a rate and add one-way latency.

A laptop run behaves like the wireless network being studied when every message a device
sends (or receives) waits for its serialisation time at the configured rate and then for
half the round-trip time. Pacing uses a virtual clock (the time the link becomes free), not
the wake-up time of sleeps, so timer jitter does not accumulate into a rate error. Latency
is pipelined: a message in flight does not delay the next message's transmission, and the
wait is an ``asyncio`` sleep, so other links and the event loop keep running. Both the booking
and the waits use one :class:`~sft_actors.clock.Clock` (the system clock unless a test passes a
``ManualClock``), so a test can check the schedule exactly instead of timing it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sft_actors.clock import SYSTEM_CLOCK, Clock

Frames = Sequence[Any]
Deliver = Callable[[Frames], Awaitable[None]]


@dataclass(kw_only=True, slots=True, frozen=True)
class LinkRate:
    """One direction of an emulated link; ``rate_mbps=None`` means no rate limit."""

    rate_mbps: float | None = None
    latency_s: float = 0.0

    @property
    def is_paced(self) -> bool:
        return self.rate_mbps is not None or self.latency_s > 0

    def serialisation_s(self, nbytes: int) -> float:
        return 0.0 if self.rate_mbps is None else nbytes * 8 / (self.rate_mbps * 1e6)


class Pacer:
    """The virtual clock of one link direction: when each message finishes and arrives.

    A token bucket ``burst_s`` deep: a link idle for a while may start the next message up to
    ``burst_s`` in the past. That absorbs the sender's wake-up latency (a loaded event loop
    that books its next message a few ms late does not lose rate) while keeping long-run
    throughput at the configured rate. Times are seconds on ``clock``.
    """

    def __init__(self, rate: LinkRate, clock: Clock = SYSTEM_CLOCK, *, burst_s: float = 0.02) -> None:
        self.rate = rate
        self.burst_s = burst_s
        #: Books and waits on this clock (PacedSender sleeps on it too).
        self.clock = clock
        self._free_at = 0.0

    def reserve(self, nbytes: int) -> tuple[float, float, float]:
        """Book ``nbytes`` on the link: (transmission start, transmission end, delivery time), in
        seconds on the pacer's clock."""
        now = self.clock.now()
        start = max(now - self.burst_s, self._free_at)
        self._free_at = start + self.rate.serialisation_s(nbytes)
        done = max(now, self._free_at)  # bucket credit speeds up sending, never the latency
        return start, done, done + self.rate.latency_s


def frames_nbytes(frames: Frames) -> int:
    return sum(memoryview(f).nbytes for f in frames)


class PacedSender:
    """Sends frames through ``deliver`` at the link's pace, in order.

    ``send`` returns once the message's transmission has *begun*: a fast producer is slowed
    to the link rate, yet books its next message while this one is on the wire (waiting for
    the end would let sleep overshoot idle the link and lose rate). ``run`` delivers each
    message after its latency; run it as a task owned by the caller's TaskGroup. Cancelling
    it drops what is still on the wire, like a link going down. Waits use the pacer's clock
    (``clock`` when no pacer is given).
    """

    def __init__(
        self,
        rate: LinkRate,
        deliver: Deliver,
        *,
        pacer: Pacer | None = None,
        clock: Clock = SYSTEM_CLOCK,
        max_queue: int = 1024,
    ) -> None:
        # A shared pacer models one radio used by several links (a device's uplink to the
        # coordinator and to the server); each link still keeps its own delivery order.
        self.pacer = pacer if pacer is not None else Pacer(rate, clock)
        # Sleep on the clock the bookings were made on, or start/delivery times mean nothing.
        self._clock = self.pacer.clock
        self._deliver = deliver
        self._queue: asyncio.Queue[tuple[float, Frames]] = asyncio.Queue(maxsize=max_queue)
        # Booking and enqueueing must happen in one step so delivery times stay ordered.
        self._lock = asyncio.Lock()
        self.bytes_sent = 0
        self.messages_sent = 0

    async def send(self, frames: Frames) -> None:
        nbytes = frames_nbytes(frames)
        async with self._lock:
            start_at, _, deliver_at = self.pacer.reserve(nbytes)
            # A full queue (far more in flight than the latency window) just waits; the
            # lock keeps bookings and queue order the same.
            await self._queue.put((deliver_at, frames))
        self.bytes_sent += nbytes
        self.messages_sent += 1
        await self._clock.sleep_until(start_at)

    async def run(self) -> None:
        while True:
            deliver_at, frames = await self._queue.get()
            await self._clock.sleep_until(deliver_at)
            await self._deliver(frames)
            self._queue.task_done()

    async def drain(self) -> None:
        """Wait until everything sent so far has been delivered."""
        await self._queue.join()

    @property
    def pending(self) -> int:
        return self._queue.qsize()


def fitted_mbps(arrivals: Sequence[tuple[float, int]]) -> float:
    """Receive rate from (arrival time, bytes) pairs: the least-squares slope of cumulative
    bytes over time, so one late wake-up at either end does not skew it like first-to-last."""
    if len(arrivals) < 2:
        raise ValueError("need at least two arrivals to measure a rate")
    times = [t for t, _ in arrivals]
    total, cumulative = 0, []
    for _, n in arrivals:
        total += n
        cumulative.append(total)
    mean_t = sum(times) / len(times)
    mean_b = sum(cumulative) / len(cumulative)
    cov = sum((t - mean_t) * (b - mean_b) for t, b in zip(times, cumulative, strict=True))
    var = sum((t - mean_t) ** 2 for t in times)
    return cov / var * 8 / 1e6
