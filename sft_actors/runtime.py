"""Run actors in this process: a whole topology, or one node's actors.

``run_topology`` and ``run_node`` share :func:`run_actors`: one zmq Context (required for
``inproc://``), one bounded offload thread pool and one TaskGroup per process. The run ends
when the coordinator finishes (its SHUTDOWN stops everyone), when every local actor has
stopped, on a signal, at the timeout, or when a local actor fails at start. A device or
server that fails once it served does not stop the others: the coordinator decides (by its
quorum) whether the run goes on without it.
SIGINT/SIGTERM/SIGHUP begin the staged shutdown (the run is then ``interrupted``); a second
signal cancels at once. One OS process per actor is :mod:`sft_actors.processes`; the process
entry point is :mod:`sft_actors.node_process`.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from sft_actors.actors.base import Actor, ActorState
from sft_actors.actors.budget import run_model_config, socket_options
from sft_actors.actors.env import ActorEnv, topology_schema_hash, wire_limits
from sft_actors.actors.roles import RoleFactories, role_factories
from sft_actors.errors import ActorFailed, ConfigError
from sft_actors.log import get_logger
from sft_actors.outcome import (
    RUN_STATUSES,
    ActorOutcome,
    RunResult,
    RunStatus,
    check_resume_dir,
    failure_line,
)
from sft_actors.rendezvous import on_this_machine
from sft_actors.topology import ActorSpec, Topology
from sft_actors.transport.auth import start_curve
from sft_actors.transport.endpoints import Endpoints, Transport

_TERM_TIMEOUT_S = 5.0
log = get_logger(component="runtime")


async def run_topology(
    topology: Topology,
    *,
    transport: Transport = "inproc",
    roles: RoleFactories | None = None,
    ipc_dir: str | Path | None = None,
    ctx: zmq.asyncio.Context | None = None,
    timeout_s: float | None = None,
    offload_workers: int = 2,
    handle_signals: bool = False,
    resume_dir: str | Path | None = None,
) -> RunResult:
    """Run every actor of ``topology`` in this process (what ``sft run F`` does).

    ``resume_dir``: continue the run in that directory from its last checkpoint
    (:class:`ConfigError` before anything starts when it has no ``checkpoints``). Hosts with
    ``address = "auto"`` are this machine (loopback).
    """
    topology = on_this_machine(topology)
    with contextlib.ExitStack() as stack:
        if transport == "ipc" and ipc_dir is None:
            ipc_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="sft-"))
        return await run_actors(
            topology,
            topology.actors,
            transport=transport,
            roles=roles,
            ipc_dir=ipc_dir,
            ctx=ctx,
            timeout_s=timeout_s,
            offload_workers=offload_workers,
            handle_signals=handle_signals,
            resume_dir=resume_dir,
        )


def select_actors(
    topology: Topology, role: str, name: str | None = None, host: str | None = None
) -> list[ActorSpec]:
    """The actors one node runs: by name, else every actor of ``role`` on ``host``.

    Without ``host`` the host is found from this machine's hostname and addresses when the
    topology has several hosts.
    """
    if name is not None:
        spec = topology.actor(name)
        if spec.role != role:
            raise ConfigError(f"{name!r} is a {spec.role} in {topology.source}, not a {role}; fix --role")
        return [spec]
    if host is None:
        host = _this_host(topology)
    picked = [a for a in topology.by_role(role) if a.host == host]
    if not picked:
        raise ConfigError(f"no {role} actor on host {host!r} in {topology.source}; check --host/--name")
    return picked


def _this_host(topology: Topology) -> str:
    if len(topology.hosts) == 1:
        return topology.hosts[0].name
    me = {socket.gethostname(), socket.getfqdn()}
    with contextlib.suppress(OSError):
        me.update(socket.gethostbyname_ex(socket.gethostname())[2])
    for h in topology.hosts:
        if h.name in me or h.address in me:
            return h.name
    names = ", ".join(h.name for h in topology.hosts)
    raise ConfigError(f"cannot tell which host of {topology.source} this is; pass --host (one of {names})")


async def run_node(
    topology: Topology,
    role: str,
    name: str | None = None,
    *,
    host: str | None = None,
    transport: Transport = "tcp",
    roles: RoleFactories | None = None,
    ipc_dir: str | Path | None = None,
    timeout_s: float | None = None,
    handle_signals: bool = True,
    resume_dir: str | Path | None = None,
) -> RunResult:
    """Run the actors of one role (or one named actor) on this machine (what ``sft-node`` does)."""
    specs = select_actors(topology, role, name, host)
    return await run_actors(
        topology,
        specs,
        transport=transport,
        roles=roles,
        ipc_dir=ipc_dir,
        timeout_s=timeout_s,
        handle_signals=handle_signals,
        resume_dir=resume_dir,
    )


async def run_actors(
    topology: Topology,
    specs: Sequence[ActorSpec],
    *,
    transport: Transport,
    roles: RoleFactories | None = None,
    ipc_dir: str | Path | None = None,
    ctx: zmq.asyncio.Context | None = None,
    timeout_s: float | None = None,
    offload_workers: int = 2,
    handle_signals: bool = False,
    resume_dir: str | Path | None = None,
) -> RunResult:
    """Start ``specs`` in one process, supervise them and shut them down in stages."""
    resume = _resume_dir(topology, specs, resume_dir)
    factories = role_factories({s.role for s in specs}, roles)
    _raise_open_files_limit()
    own_ctx = ctx is None
    zctx = zmq.asyncio.Context() if ctx is None else ctx
    if own_ctx:
        # Every actor has a ROUTER and/or one DEALER per peer; libzmq's default cap is 1023.
        zctx.set(zmq.MAX_SOCKETS, max(1024, 4 * len(specs) + 16))
    try:
        auth = start_curve(topology, [s.name for s in specs], transport, zctx)
    except BaseException:
        if own_ctx:
            zctx.destroy(linger=0)
        raise
    executor = ThreadPoolExecutor(max_workers=offload_workers, thread_name_prefix="sft-offload")
    limits = wire_limits(topology)
    env = ActorEnv(
        topology=topology,
        ctx=zctx,
        endpoints=Endpoints(topology, transport, ipc_dir=ipc_dir),
        executor=executor,
        limits=limits,
        schema_hash=topology_schema_hash(topology),
        resume_dir=resume,
        sockets=socket_options(topology, run_model_config(topology), limits),
        auth=auth,
    )
    t0 = time.perf_counter()
    error: str | None = None
    actors: list[Actor] = []
    # Installed until the teardown is over: a signal then (say, the SIGTERM ``run_processes``
    # sends once the coordinator has exited) must not kill the process before it reports.
    signals = _SignalHandler(actors, asyncio.current_task()) if handle_signals else None
    try:
        actors.extend(factories[s.role](s, env) for s in specs)
        error = await _supervise(actors, timeout_s=timeout_s)
        if signals is not None:
            signals.settle()
    finally:
        try:
            executor.shutdown(wait=False, cancel_futures=True)
            if auth is not None:
                auth.stop()
            if own_ctx:
                await asyncio.to_thread(_terminate, zctx)
        finally:
            if signals is not None:
                signals.remove()
    return RunResult(
        result=_run_result(actors),
        outcomes={a.name: _outcome(a) for a in actors},
        elapsed_s=time.perf_counter() - t0,
        error=error,
        signalled=signals is not None and signals.signalled,
    )


def _resume_dir(topology: Topology, specs: Sequence[ActorSpec], resume_dir: str | Path | None) -> Path | None:
    """The run directory to resume, checked, when this node runs the coordinator: only it reads
    the directory; a restarted server or device gets its state from the coordinator (RESTORE),
    and its host need not hold the directory."""
    if resume_dir is None:
        return None
    if not any(s.role == "coordinator" for s in specs):
        log.info("resume_from_coordinator", hint="this node's state comes from the coordinator's checkpoint")
        return None
    return check_resume_dir(resume_dir, topology_schema_hash(topology))


def _run_result(actors: Sequence[Actor]) -> Any:
    """The coordinator's result where it runs; elsewhere how its SHUTDOWN said the run ended
    (so a device's node exits 1 when the run failed, 130 when it was interrupted)."""
    coordinators = [a for a in actors if a.spec.role == "coordinator"]
    if coordinators:
        return coordinators[0].result
    return next((a.run_verdict for a in actors if a.run_verdict is not None), None)


def _outcome(actor: Actor) -> ActorOutcome:
    error = None if actor.error is None else f"{type(actor.error).__name__}: {actor.error}"
    return ActorOutcome(name=actor.name, role=actor.spec.role, state=actor.state.value, error=error)


async def _supervise(actors: list[Actor], *, timeout_s: float | None) -> str | None:
    """Serve all actors; stop the rest when the coordinator ends (or at the timeout; a signal
    stops them through :class:`_SignalHandler`).

    A device or server that fails once it served is left to the coordinator (its quorum
    decides); one that fails at start ends the run now. Returns the timeout's or that message.
    """
    error: str | None = None
    async with asyncio.TaskGroup() as tg:
        tasks = {tg.create_task(_serve(a)): a for a in actors}
        pending = set(tasks)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            wait_s = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = await asyncio.wait(pending, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
            if not done and error is None:
                error = f"run did not finish within {timeout_s}s"
                log.error("run_timeout", timeout_s=timeout_s)
                _stop_all(actors, "run timed out")
                # A stop is staged and bounded; past its budget what is left is cancelled.
                deadline = time.monotonic() + _stop_budget_s(actors)
            elif not done:
                for task in pending:
                    task.cancel()
                deadline = None
            for task in done:
                actor = tasks[task]
                if actor.spec.role == "coordinator":
                    _stop_all(actors, f"{actor.name} {actor.state.value}")
                elif actor.state is ActorState.FAILED and not actor.ready_reached and error is None:
                    error = f"{actor.name} failed at start: {type(actor.error).__name__}: {actor.error}"
                    _stop_all(actors, error)  # it never served: end the run now, for that reason
                    deadline = time.monotonic() + _stop_budget_s(actors)
                elif actor.state is ActorState.FAILED:
                    log.warning("actor_lost", actor=actor.name, role=actor.spec.role)
    return error


def _raise_open_files_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: every connection to a ROUTER holds a descriptor
    while it handshakes, and running out would fail a checkpoint write, not just a connection."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(
                resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 65536), hard)
            )


def _stop_budget_s(actors: list[Actor]) -> float:
    """How long a staged stop may take: drain, then close (seconds)."""
    return max((a.settings.drain_timeout_s for a in actors), default=0.0) + _TERM_TIMEOUT_S + 10.0


async def _serve(actor: Actor) -> None:
    with contextlib.suppress(ActorFailed):  # recorded on the actor (state, error) and logged there
        await actor.serve()


def _stop_all(actors: list[Actor], reason: str) -> None:
    for a in actors:
        a.stop(reason)


class _SignalHandler:
    """First SIGINT/SIGTERM/SIGHUP: staged shutdown. Second: cancel everything now.

    After :meth:`settle` (every actor has stopped; the process is tearing down) a first signal
    changes nothing: the run has already ended the way it did.
    """

    def __init__(self, actors: list[Actor], main: asyncio.Task[Any] | None) -> None:
        self._actors = actors
        self._main = main
        self._count = 0
        #: Set by the first signal: the run ends ``interrupted``.
        self.signalled = False
        self._settled = False
        self._loop = asyncio.get_running_loop()
        self._installed: list[int] = []
        if threading.current_thread() is not threading.main_thread():
            return
        # SIGHUP too: deploy/launch.sh's `ssh -tt` hangs up the remote node when it stops.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                self._loop.add_signal_handler(sig, self._on_signal, sig)
                self._installed.append(sig)
        with contextlib.suppress(NotImplementedError, RuntimeError):  # a node that seems stuck
            self._loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)
            self._installed.append(signal.SIGUSR1)

    def _on_signal(self, sig: int) -> None:
        self._count += 1
        if self._count == 1 and self._settled:
            log.info("signal_after_run", signal=signal.Signals(sig).name)
            return
        self.signalled = True
        if self._count == 1:
            log.warning("signal_stop", signal=signal.Signals(sig).name, hint="send again to force")
            _stop_all(self._actors, f"signal {signal.Signals(sig).name}")
        elif self._main is not None:
            log.warning("signal_force", signal=signal.Signals(sig).name)
            self._main.cancel()

    def settle(self) -> None:
        """Every actor has stopped: a first signal from now on is only logged."""
        self._settled = True

    def remove(self) -> None:
        for sig in self._installed:
            self._loop.remove_signal_handler(sig)
        self._installed.clear()


def _dump_tasks() -> None:
    """SIGUSR1: every asyncio task's stack to stderr (``kill -USR1 PID`` on a node that hangs)."""
    tasks = asyncio.all_tasks()
    print(f"--- {len(tasks)} asyncio tasks (SIGUSR1) ---", file=sys.stderr)
    for task in tasks:
        task.print_stack(limit=12, file=sys.stderr)
    sys.stderr.flush()


def _terminate(ctx: zmq.asyncio.Context) -> None:
    """Terminate ``ctx``; sockets still open after the timeout are destroyed (linger 0)."""
    done = threading.Event()

    def term() -> None:
        ctx.term()
        done.set()

    t = threading.Thread(target=term, daemon=True)
    t.start()
    t.join(_TERM_TIMEOUT_S)
    if not done.is_set():
        log.warning("context_term_timeout", timeout_s=_TERM_TIMEOUT_S)
        ctx.destroy(linger=0)


__all__ = [
    "RUN_STATUSES",
    "ActorOutcome",
    "RunResult",
    "RunStatus",
    "check_resume_dir",
    "failure_line",
    "run_actors",
    "run_node",
    "run_topology",
    "select_actors",
]
