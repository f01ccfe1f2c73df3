"""One local OS process per actor: what ``sft run --processes`` does.

Every actor runs in its own ``python -m sft_actors.node_process`` (the entry point
``sft-node`` uses too). Each node writes its outcome (result, actor states, error) to a file
that this process reads once the node has exited, so :func:`run_processes` returns one
:class:`~sft_actors.runtime.RunResult`, like an in-process run. The nodes' stdout goes to
this process's stderr: stdout is left to the caller's one summary line.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from sft_actors import node_process
from sft_actors.actors import roles
from sft_actors.actors.base import ActorState
from sft_actors.errors import ConfigError
from sft_actors.log import get_logger
from sft_actors.runtime import ActorOutcome, RunResult
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
) -> RunResult:
    """Start one node process per actor of ``topology`` and wait for them all.

    The first process to fail stops the others (SIGTERM: staged shutdown; SIGKILL when they
    are still alive ``drain_timeout_s + 5`` seconds later), as does ``timeout_s`` (seconds).
    An actor whose process died without reporting counts as failed with its exit code.
    Raises :class:`ConfigError` for ``inproc`` (it only works inside one process) and for a
    role factory that cannot be resolved (``role_factories``: ``ROLE=package.module:Class``).
    """
    if transport == "inproc":
        raise ConfigError("--processes needs ipc or tcp; inproc only works inside one process")
    # Resolve the factories here too, so a bad --role-factory is a ConfigError before any start.
    roles.role_factories({a.role for a in topology.actors}, roles.parse_role_overrides(role_factories))
    grace = topology.run.runtime.drain_timeout_s + 5.0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sft-") as ipc_dir:
        out_dir = Path(ipc_dir) / "outcomes"
        out_dir.mkdir()
        files = {spec.name: out_dir / f"{i}.json" for i, spec in enumerate(topology.actors)}
        procs: dict[str, asyncio.subprocess.Process] = {}
        try:
            for spec in topology.actors:
                args = [
                    sys.executable, "-m", node_process.__name__, "--role", spec.role,
                    "--topology", str(topology_path), "--name", spec.name, "--transport", transport,
                    "--ipc-dir", ipc_dir, "--threads", str(threads_per_process),
                    "--log-format", log_format, "--log-level", log_level,
                    "--outcome-file", str(files[spec.name]),
                ]  # fmt: skip
                for ref in role_factories:
                    args += ["--role-factory", ref]
                procs[spec.name] = await asyncio.create_subprocess_exec(*args, stdout=_STDERR_FD)
            error = await _watch_processes(procs, timeout_s)
        finally:
            await _stop_processes(procs, grace)
        return _collect(topology.actors, procs, files, error, time.perf_counter() - started)


def _collect(
    specs: Sequence[ActorSpec],
    procs: Mapping[str, asyncio.subprocess.Process],
    files: Mapping[str, Path],
    error: str | None,
    elapsed_s: float,
) -> RunResult:
    """Merge what each node reported with how its process ended."""
    result = None
    outcomes: dict[str, ActorOutcome] = {}
    for spec in specs:
        proc = procs.get(spec.name)
        code = None if proc is None else proc.returncode
        reported = node_process.read_outcome(files[spec.name])
        outcome = None if reported is None else reported.outcomes.get(spec.name)
        if reported is not None and spec.role == "coordinator":
            result = reported.result
        if outcome is None or (code != 0 and outcome.state == ActorState.STOPPED.value):
            if proc is None:
                why = "process not started"
            elif reported is not None and reported.error:
                why = reported.error
            else:
                why = f"process exited with code {code}"
            outcome = ActorOutcome(name=spec.name, role=spec.role, state=ActorState.FAILED.value, error=why)
        outcomes[spec.name] = outcome
    return RunResult(result=result, outcomes=outcomes, elapsed_s=elapsed_s, error=error)


async def _watch_processes(
    procs: Mapping[str, asyncio.subprocess.Process], timeout_s: float | None
) -> str | None:
    """Wait until every process has exited or one has failed; the timeout's message, if it passed."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    async with asyncio.TaskGroup() as tg:
        waits = {tg.create_task(p.wait()): name for name, p in procs.items()}
        pending = set(waits)
        error = None
        while pending:
            wait_s = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = await asyncio.wait(pending, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                log.error("processes_timeout", timeout_s=timeout_s)
                error = f"run did not finish within {timeout_s}s"
                break
            bad = {waits[t]: t.result() for t in done if t.result() != 0}
            if bad:
                log.error("process_failed", returncodes=bad)
                break
        for task in pending:
            task.cancel()  # the processes themselves are stopped by the caller
        return error


async def _stop_processes(procs: Mapping[str, asyncio.subprocess.Process], grace_s: float) -> None:
    alive = [p for p in procs.values() if p.returncode is None]
    for p in alive:
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
