"""One local OS process per actor: what ``sft run --processes`` does.

Every actor runs in its own ``python -m sft_actors.node_process`` (the entry point
``sft-node`` uses too). Each node writes its outcome (result, actor states, error) to a file
that this process reads once the node has exited, so :func:`run_processes` returns one
:class:`~sft_actors.runtime.RunResult`, like an in-process run. The nodes' stdout goes to
this process's stderr: stdout is left to the caller's one summary line.

The nodes run in their own session, so a terminal's Ctrl-C reaches only this process, which
forwards it: the first SIGINT/SIGTERM/SIGHUP sends SIGINT once to every live node (each stops
politely, in stages, and writes its outcome) and the run ends ``interrupted``; a second one
forwards SIGINT again (the nodes then force their stop). The run lasts as long as the
coordinator's process: a device or server process that dies (even ``kill -9``) is reported
as lost, and the coordinator decides whether the run goes on without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Final

from sft_actors import node_process
from sft_actors.actors import roles
from sft_actors.actors.base import ActorState
from sft_actors.actors.env import topology_schema_hash
from sft_actors.errors import ConfigError
from sft_actors.log import get_logger
from sft_actors.rendezvous import auto_hosts
from sft_actors.runtime import ActorOutcome, RunResult, check_resume_dir
from sft_actors.topology import ActorSpec, Topology
from sft_actors.transport.endpoints import Transport

_STDERR_FD: Final[int] = 2  # the real fd, not sys.stderr (a test runner may have replaced that)
log = get_logger(component="processes")


async def run_processes(
    topology_path: str | Path,
    topology: Topology,
    *,
    transport: Transport = "ipc",
    role_factories: Sequence[str] = (),
    threads_per_process: int = 1,
    log_format: str = "console",
    log_level: str = "info",
    timeout_s: float | None = None,
    resume_dir: str | Path | None = None,
    handle_signals: bool = True,
) -> RunResult:
    """Start one node process per actor of ``topology`` and wait for the coordinator's.

    When the coordinator's process exits, the others are stopped (SIGTERM: staged shutdown;
    SIGKILL when they are still alive ``drain_timeout_s + 5`` seconds later; after a
    coordinator that exited 0 they first get that long to leave on its SHUTDOWN), as they are
    at ``timeout_s`` (seconds) or that grace after a signal. A process that died without
    reporting counts as failed with its exit code; a non-coordinator one is also in
    :attr:`RunResult.lost`. ``resume_dir`` is passed to every node as ``--resume``.
    ``handle_signals``: forward SIGINT/SIGTERM/SIGHUP to the nodes (see the module doc).
    Raises :class:`ConfigError` for ``inproc`` (it only works inside one process), for a role
    factory that cannot be resolved (``role_factories``: ``ROLE=package.module:Class``) and
    for a ``resume_dir`` without ``checkpoints``.
    """
    if transport == "inproc":
        raise ConfigError("--processes needs ipc or tcp; inproc only works inside one process")
    # Resolve the factories here too, so a bad --role-factory is a ConfigError before any start.
    roles.role_factories({a.role for a in topology.actors}, roles.parse_role_overrides(role_factories))
    resume = None if resume_dir is None else check_resume_dir(resume_dir, topology_schema_hash(topology))
    grace = topology.run.runtime.drain_timeout_s + 5.0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sft-") as ipc_dir:
        out_dir = Path(ipc_dir) / "outcomes"
        out_dir.mkdir()
        files = {spec.name: out_dir / f"{i}.json" for i, spec in enumerate(topology.actors)}
        common = [
            "--topology", str(topology_path), "--transport", transport, "--ipc-dir", ipc_dir,
            "--threads", str(threads_per_process), "--log-format", log_format, "--log-level", log_level,
            *(a for ref in role_factories for a in ("--role-factory", ref)),
            *(("--resume", str(resume)) if resume is not None else ()),
            *(a for host in sorted(auto_hosts(topology)) for a in ("--address", f"{host}=127.0.0.1")),
        ]  # fmt: skip
        procs: dict[str, asyncio.subprocess.Process] = {}
        signals = _SignalForwarder(procs, install=handle_signals)
        error = None
        settled = False  # the coordinator's process exited 0: it has sent SHUTDOWN to the rest
        try:
            for spec in topology.actors:
                if signals.count:
                    break  # interrupted while starting: start no more
                procs[spec.name] = await _start_node(spec, [*common, "--outcome-file", str(files[spec.name])])
            coordinators = {a.name for a in topology.actors if a.role == "coordinator"}
            error = await _watch_processes(procs, coordinators, timeout_s, signals, grace)
            ran = [procs[c] for c in coordinators if c in procs]
            settled = error is None and not signals.count and all(p.returncode == 0 for p in ran)
        finally:
            signals.remove()
            await _stop_processes(
                procs, grace, spare=signals.signalled_names, exit_first_s=grace if settled else 0.0
            )
        result = _collect(topology.actors, procs, files, error, time.perf_counter() - started)
        if signals.count and not result.signalled:
            result = dataclasses.replace(result, signalled=True)
        return result


async def _start_node(spec: ActorSpec, args: Sequence[str]) -> asyncio.subprocess.Process:
    """One ``node_process`` for ``spec``, in its own session: a terminal's SIGINT reaches only
    this process, which forwards it."""
    argv = [sys.executable, "-m", node_process.__name__, "--role", spec.role, "--name", spec.name, *args]
    return await asyncio.create_subprocess_exec(*argv, stdout=_STDERR_FD, start_new_session=True)


class _SignalForwarder:
    """SIGINT/SIGTERM/SIGHUP here → SIGINT to every live node (again on each further signal)."""

    def __init__(self, procs: Mapping[str, asyncio.subprocess.Process], *, install: bool) -> None:
        self._procs = procs
        self.count = 0
        #: Nodes that got at least one forwarded SIGINT (they are stopping on their own).
        self.signalled_names: set[str] = set()
        self.event = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._installed: list[int] = []
        if not install or threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                self._loop.add_signal_handler(sig, self._on_signal, sig)
                self._installed.append(sig)

    def _on_signal(self, sig: int) -> None:
        self.count += 1
        live = [name for name, p in self._procs.items() if p.returncode is None]
        log.warning(
            "signal_forwarded",
            signal=signal.Signals(sig).name,
            count=self.count,
            nodes=len(live),
            hint="send again to force" if self.count == 1 else None,
        )
        for name in live:
            with contextlib.suppress(ProcessLookupError):
                self._procs[name].send_signal(signal.SIGINT)
            self.signalled_names.add(name)
        self.event.set()

    def remove(self) -> None:
        for sig in self._installed:
            self._loop.remove_signal_handler(sig)
        self._installed.clear()


def _collect(
    specs: Sequence[ActorSpec],
    procs: Mapping[str, asyncio.subprocess.Process],
    files: Mapping[str, Path],
    error: str | None,
    elapsed_s: float,
) -> RunResult:
    """Merge what each node reported with how its process ended."""
    result = None
    signalled = False
    outcomes: dict[str, ActorOutcome] = {}
    for spec in specs:
        proc = procs.get(spec.name)
        code = None if proc is None else proc.returncode
        reported = node_process.read_outcome(files[spec.name])
        outcome = None if reported is None else reported.outcomes.get(spec.name)
        if reported is not None and spec.role == "coordinator":
            result = reported.result
            signalled = signalled or reported.signalled  # someone signalled the coordinator's node
        # A node that stopped cleanly exits 0, or 130 when a signal stopped it.
        clean_exit = code == node_process.EXIT_OK or (
            code == node_process.EXIT_INTERRUPTED and reported is not None and reported.signalled
        )
        if outcome is None or (not clean_exit and outcome.state == ActorState.STOPPED.value):
            if proc is None:
                why = "process not started"
            elif reported is not None and reported.error:
                why = reported.error
            else:
                why = f"process exited with code {code}"
            outcome = ActorOutcome(name=spec.name, role=spec.role, state=ActorState.FAILED.value, error=why)
        outcomes[spec.name] = outcome
    return RunResult(result=result, outcomes=outcomes, elapsed_s=elapsed_s, error=error, signalled=signalled)


async def _watch_processes(
    procs: Mapping[str, asyncio.subprocess.Process],
    coordinators: set[str],
    timeout_s: float | None,
    signals: _SignalForwarder,
    grace_s: float,
) -> str | None:
    """Wait until the coordinator's process has exited (every process, when none runs one);
    the timeout's message, if it passed. Other processes that exit are logged, not acted on."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    watched = (set(procs) & coordinators) or set(procs)
    async with asyncio.TaskGroup() as tg:
        waits = {tg.create_task(p.wait()): name for name, p in procs.items()}
        signalled = tg.create_task(signals.event.wait())
        pending = set(waits)
        error = None
        signal_deadline = None
        while watched and pending:
            if signals.count and signal_deadline is None:
                signal_deadline = time.monotonic() + grace_s
            ends = [d for d in (deadline, signal_deadline) if d is not None]
            wait_s = None if not ends else max(0.0, min(ends) - time.monotonic())
            done, _ = await asyncio.wait(
                pending | {signalled}, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED
            )
            pending -= done
            if signalled in done:  # wait for the next one
                signals.event.clear()
                signalled = tg.create_task(signals.event.wait())
            if not done:
                if signal_deadline is not None and time.monotonic() >= signal_deadline:
                    log.error("processes_stop_timeout", grace_s=grace_s)
                    break
                log.error("processes_timeout", timeout_s=timeout_s)
                error = f"run did not finish within {timeout_s}s"
                break
            for task in done & set(waits):
                name, code = waits[task], task.result()
                watched.discard(name)
                if name in coordinators:
                    log.info("coordinator_exited", actor=name, returncode=code)
                elif code != 0 and name not in signals.signalled_names:
                    log.warning("process_lost", actor=name, returncode=code)
        for task in [*pending, signalled]:
            task.cancel()  # the processes themselves are stopped by the caller
        return error


async def _stop_processes(
    procs: Mapping[str, asyncio.subprocess.Process],
    grace_s: float,
    *,
    spare: Collection[str] = (),
    exit_first_s: float = 0.0,
) -> None:
    """Give the live processes ``exit_first_s`` to exit by themselves, then SIGTERM those still
    alive (but those in ``spare``, already stopping after a forwarded signal: another would
    force them); SIGKILL what is still alive ``grace_s`` later."""
    alive = [p for p in procs.values() if p.returncode is None]
    if alive and exit_first_s > 0:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(exit_first_s):
                await asyncio.gather(*(p.wait() for p in alive))
    for name, p in procs.items():
        if p.returncode is None and name not in spare:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
    if alive:
        try:
            async with asyncio.timeout(grace_s):
                await asyncio.gather(*(p.wait() for p in alive))
        except TimeoutError:
            for p in alive:
                if p.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
            await asyncio.gather(*(p.wait() for p in alive))


__all__ = ["run_processes"]
