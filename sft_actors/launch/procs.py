"""Signals to the launcher and the short commands it runs (git, tar over ssh), bounded.

Every child runs in its own session, so a terminal's Ctrl-C reaches only the launcher, which
decides what each child gets (see :mod:`sft_actors.launch.nodes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sft_actors.errors import SftError


class LaunchError(SftError):
    """The launch could not go on: a copy failed, a command is missing, a host refused."""


class LaunchConfigError(LaunchError):
    """What the launch was asked is wrong (backend, a key file the topology needs is missing)."""


class Interrupted(Exception):  # a control flow signal, not an SftError
    """A signal arrived while a launch step (shipping, collecting) was running."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Signals:
    """SIGINT/SIGTERM/SIGHUP to the launcher, counted: the first asks for a polite stop, the
    second forces it. :meth:`changed` wakes whoever waits for the next one."""

    def __init__(self) -> None:
        self.count = 0
        self.changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._installed: list[int] = []
        #: Called with the new count on every signal, from the event loop.
        self.listeners: list[Callable[[int], None]] = []

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                self._loop.add_signal_handler(sig, self.deliver)
                self._installed.append(sig)

    def deliver(self) -> None:
        self.count += 1
        self.changed.set()
        for listener in list(self.listeners):
            listener(self.count)

    def remove(self) -> None:
        for sig in self._installed:
            self._loop.remove_signal_handler(sig)
        self._installed.clear()

    async def wait_beyond(self, count: int) -> None:
        """Return once more than ``count`` signals have arrived."""
        while self.count <= count:
            self.changed.clear()
            await self.changed.wait()


@dataclass(frozen=True, slots=True)
class Completed:
    returncode: int
    stdout: bytes
    stderr: bytes

    def why(self) -> str:
        """The last line of stderr, or the exit code."""
        lines = self.stderr.decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else f"exit code {self.returncode}"


async def run_command(
    argv: Sequence[str],
    *,
    signals: Signals,
    stdin: bytes | None = None,
    cwd: Path | None = None,
    timeout_s: float,
) -> Completed:
    """Run ``argv`` to its end, feeding ``stdin``; :class:`Interrupted` when a signal comes
    first, :class:`LaunchError` when it takes longer than ``timeout_s`` or cannot start
    (the child is killed either way)."""
    seen = signals.count  # a signal from now on interrupts, even one that comes during the start
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
            start_new_session=True,
        )
    except OSError as exc:
        raise LaunchError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    talk = asyncio.ensure_future(proc.communicate(stdin))
    stop = asyncio.ensure_future(signals.wait_beyond(seen))
    try:
        done, _ = await asyncio.wait({talk, stop}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not talk.done():
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await talk
    if talk in done:
        out, err = talk.result()
        assert proc.returncode is not None
        return Completed(proc.returncode, out, err)
    if stop in done:
        raise Interrupted
    raise LaunchError(f"{argv[0]} did not finish within {timeout_s:g}s")


__all__ = [
    "STOP_SIGNALS",
    "Completed",
    "Interrupted",
    "LaunchConfigError",
    "LaunchError",
    "Signals",
    "run_command",
]
