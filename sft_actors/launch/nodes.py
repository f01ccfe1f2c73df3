"""Start the node processes, watch them, stop them: one per (host, role).

A local node runs in its own session and process group, with ``cwd`` = its workdir; a remote
one is an ``ssh -T`` session running :func:`~sft_actors.launch.remote.node_script`, a shell
that starts the node and turns what it reads from the session into signals for it. Each
node's output (stdout and stderr) is read here, line by line, into ``LOGS/<host>-<role>.log``;
the coordinator's events become progress lines.

Stopping: the polite stop is one signal per node — ``killpg(SIGINT)`` locally, a line written
into the ssh session remotely (the remote shell sends SIGTERM) — after which a node stops in
stages and prints its line. Forcing is the node's second signal (SIGTERM locally; remotely the
end of the session's input, which the shell turns into SIGHUP); what is still alive
:data:`KILL_WAIT_S` later is killed (the local process group, or the ssh client: the remote
shell then reads the end of its input too). A dropped connection stops a remote node.

When the coordinator's node exits, the others have ``grace_s`` to leave on its SHUTDOWN, then
get the polite stop, then ``grace_s`` more, then are forced. The launcher's first
SIGINT/SIGTERM/SIGHUP stops every node politely; a second forces them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from sft_actors.launch import remote
from sft_actors.launch.outcome import node_log_entry
from sft_actors.launch.placement import NodeSpec
from sft_actors.launch.procs import LaunchError, Signals
from sft_actors.launch.shipping import local_dir

#: After forcing, how long to wait for the processes to be gone (seconds).
KILL_WAIT_S = 10.0
#: The longest output line a node may print (its JSON line carries the run's result).
LINE_LIMIT = 16 * 2**20

Echo = Callable[[str], None]


def node_command(node: NodeSpec, ssh: remote.Ssh, cwd: Path) -> tuple[list[str], Path | None]:
    """The argv that starts ``node`` here, and the directory it runs in (None: any, ssh)."""
    if node.local:
        workdir = local_dir(node.host.workdir, cwd)
        program, *args = node.argv
        if "/" in program and not os.path.isabs(program):
            program = str(workdir / program)  # relative to the workdir, as on a remote host
        return [program, *args], workdir
    line = remote.node_line(node.host.workdir, node.argv)
    return ssh.argv(node.host.ssh, line), None


@dataclass(eq=False)
class Running:
    """A started node: its process, its log, and what it reported."""

    node: NodeSpec
    proc: asyncio.subprocess.Process
    log: Path
    #: The node's one JSON line (``ok``, ``status``, ``result``, …), once printed.
    line: dict[str, Any] | None = None
    #: The run directory (from the coordinator's ``run_started`` or its result).
    run_dir: str | None = None
    #: What the launcher did to stop it: "" nothing, "signalled", "forced".
    stopped: str = ""
    pump: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def signal_polite(self) -> None:
        """The node's first stop signal (its polite, staged stop); once."""
        if not self.alive or self.stopped:
            return
        self.stopped = "signalled"
        if self.node.local:
            self._killpg(signal.SIGINT)
        else:
            self._write(remote.STOP_LINE)  # the remote shell sends the node SIGTERM

    def force(self) -> None:
        """The node's second stop signal (a forced stop): two distinct signals when it has
        had none yet, so that they cannot merge into one."""
        if not self.alive or self.stopped == "forced":
            return
        first = not self.stopped
        self.stopped = "forced"
        if self.node.local:
            if first:
                self._killpg(signal.SIGINT)
            self._killpg(signal.SIGTERM)
            return
        if first:
            self._write(remote.STOP_LINE)
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # end of input: the remote shell sends the node SIGHUP

    def kill(self) -> None:
        """SIGKILL: the local node's process group, or the ssh client (the remote shell then
        reads the end of its input and sends the node SIGHUP)."""
        if not self.alive:
            return
        if self.node.local:
            self._killpg(signal.SIGKILL)
        else:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def _killpg(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def _write(self, data: bytes) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError, RuntimeError):
                self.proc.stdin.write(data)


class Supervisor:
    """Runs the nodes of one launch to their end (see the module doc)."""

    def __init__(
        self, *, ssh: remote.Ssh, logs: Path, cwd: Path, signals: Signals, echo: Echo, grace_s: float
    ) -> None:
        self.ssh, self.logs, self.cwd, self.signals = ssh, logs, cwd, signals
        self.echo, self.grace_s = echo, grace_s
        self.running: list[Running] = []
        #: Nodes stopped by force because they outlived the grace (not by a second signal).
        self.overdue: list[str] = []

    async def run(self, nodes: Sequence[NodeSpec]) -> list[Running]:
        """Start ``nodes`` in order, wait for the run to end, stop what is left."""
        self.signals.listeners.append(self._on_signal)
        try:
            try:
                for node in nodes:
                    if self.signals.count:
                        break  # interrupted while starting: start no more
                    self.running.append(await self._start(node))
            except LaunchError:
                self._stop_all()  # the started ones stop politely; the error is the caller's
                await self._until(lambda: not self._alive(), self.grace_s)
                raise
            await self._watch()
        finally:
            self.signals.listeners.remove(self._on_signal)
            for r in self.running:
                r.force()
            await self._until(lambda: not self._alive(), timeout_s=KILL_WAIT_S)
            for r in self.running:
                r.kill()
            await asyncio.gather(*(r.proc.wait() for r in self.running))
            await asyncio.gather(*(r.pump for r in self.running if r.pump is not None))
            for r in self.running:
                if r.proc.stdin is not None:
                    r.proc.stdin.close()
        return self.running

    async def _start(self, node: NodeSpec) -> Running:
        argv, cwd = node_command(node, self.ssh, self.cwd)
        log = self.logs / f"{node.label}.log"
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=cwd,
                stdin=asyncio.subprocess.DEVNULL if node.local else asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                limit=LINE_LIMIT,
            )
        except OSError as exc:
            raise LaunchError(f"cannot start the {node.role} node on {node.where}: {exc}") from None
        running = Running(node=node, proc=proc, log=log)
        running.pump = asyncio.create_task(self._pump(running))
        self.echo(
            f"[launch] {node.role} on {node.where}: cd {node.host.workdir}; {shlex.join(node.argv)}  > {log}"
        )
        return running

    async def _pump(self, r: Running) -> None:
        """Copy the node's output into its log; note its JSON line and the coordinator's events."""
        assert r.proc.stdout is not None
        with _open_log(r.log) as log:
            async for raw in r.proc.stdout:
                log.write(raw)
                log.flush()
                if raw.startswith(b"{"):
                    self._note(r, raw)
        code = await r.proc.wait()
        self.echo(f"[launch] {r.node.role} on {r.node.host.name} exited {code}{_status(r)}")

    def _note(self, r: Running, raw: bytes) -> None:
        obj, run_dir, outcome = node_log_entry(raw)
        if obj is None:
            return
        if outcome:
            r.line = obj
            r.run_dir = run_dir or r.run_dir
        elif r.node.role == "coordinator":
            self._progress(r, obj)

    def _progress(self, r: Running, event: dict[str, Any]) -> None:
        name = event.get("event")
        if name == "run_started":
            r.run_dir = str(event.get("run_dir"))
            self.echo(f"[launch] run started: {event.get('devices')} devices, run_dir {r.run_dir}")
        elif name == "round_done":
            self.echo(f"[launch] round {event.get('round')} done: loss {event.get('loss')}")
        elif name == "run_ended":
            self.echo(f"[launch] run ended: {event.get('status')} ({event.get('reason')})")

    async def _watch(self) -> None:
        coordinator = next((r for r in self.running if r.node.role == "coordinator"), None)
        if coordinator is not None:
            await self._until(lambda: not coordinator.alive or self.signals.count > 0)
            if not self.signals.count and coordinator.proc.returncode == 0:
                await self._until(lambda: not self._alive() or self.signals.count > 0, self.grace_s)
        if self._alive() and not self.signals.count:
            self._stop_all()
        await self._until(lambda: not self._alive() or self.signals.count > 1, self.grace_s)
        if self._alive() and self.signals.count < 2:
            self.overdue = self._alive()
            self.echo(f"[launch] {', '.join(self.overdue)} did not stop within {self.grace_s:g}s: forcing")
            for r in self.running:
                r.force()

    def _stop_all(self) -> None:
        left = self._alive()
        if left:
            self.echo(f"[launch] stopping {len(left)} node(s) still running: {', '.join(left)}")
        for r in self.running:
            r.signal_polite()

    def _on_signal(self, count: int) -> None:
        left = self._alive()
        if count == 1:
            self.echo(f"[launch] stopping {len(left)} node(s) politely (Ctrl-C again to force them)")
            for r in self.running:
                r.signal_polite()
        else:
            self.echo(f"[launch] forcing {len(left)} node(s) to stop")
            for r in self.running:
                r.force()

    def _alive(self) -> list[str]:
        return [r.node.label for r in self.running if r.alive]

    async def _until(self, done: Callable[[], bool], timeout_s: float | None = None) -> None:
        """Return when ``done()`` holds (checked on every exit and signal), or after ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not done():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            self.signals.changed.clear()
            waits = [asyncio.ensure_future(r.proc.wait()) for r in self.running if r.alive]
            waits.append(asyncio.ensure_future(self.signals.changed.wait()))
            try:
                await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()


def _open_log(path: Path) -> BinaryIO:
    return open(path, "wb")  # the caller closes it (a sync open: ruff's ASYNC230)


def _status(r: Running) -> str:
    if r.line is None:
        return ""
    return f" ({r.line.get('status')})"


__all__ = ["KILL_WAIT_S", "Running", "Supervisor", "node_command"]
