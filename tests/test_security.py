"""Who may reach an actor and what it costs them: CURVE runs, strangers, impostors, junk floods,
oversized frames, hostile codec metadata, and the throttle that keeps refusals from flooding logs.

Whole runs are ``topologies/tiny.toml`` through ``run_topology`` in this process (ports 0,
``server_update = "per_round"`` so two runs with the same seed give the same losses bit for bit).
Attacks run from a coordinator hook between rounds (the run has made progress and waits for
them) or from the test itself; their own sockets live in the ``zmq_ctx`` fixture's context, so a
leaked one fails the test. Every wait is bounded; the only fixed waits are the flood's length and
the polls that show nothing arrived (a reply would arrive within milliseconds). No wall-clock
duration is asserted; memory is measured as the peak resident size of this process.

At 8036bce (before the coded-tensor bounds of 203250f and the no-handover CURVE ROUTERs of
299ba83) the coded cases ``no_token_kept_bfloat16`` and ``no_token_kept_model_shape`` failed
(the server allocated 540 and 470 MB to refuse payloads of 82 and 22 bytes) and an impostor holding
dev0's key took over dev1's route; until CURVE peers were named by their keys (the ROUTER
assigning routing ids), an impostor that stayed connected under routing id dev1 kept dev1 out.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import json
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
import zmq
import zmq.asyncio
import zstandard
from zmq.utils.monitor import recv_monitor_message

from sft_actors.actors.base import Actor
from sft_actors.actors.budget import run_model_config, socket_options
from sft_actors.actors.coordinator import CoordinatorActor
from sft_actors.actors.device import DeviceActor
from sft_actors.actors.env import ActorEnv, wire_limits
from sft_actors.actors.server import HeadServerActor
from sft_actors.actors.testing import Idle, actor_env, serving, small_topology
from sft_actors.codec import ChainSpec, Codec
from sft_actors.log import Throttle
from sft_actors.plan.assign import server_plans
from sft_actors.runtime import RunResult, run_topology
from sft_actors.security.keys import generate_keys, load_keyring
from sft_actors.topology import ActorSpec, Topology, load_topology
from sft_actors.transport.auth import CurveAuth, user_id
from sft_actors.wire import Activations, Gradients, WireTensor
from sft_actors.wire.envelope import Envelope, WireLimits, decode, encode
from sft_actors.wire.messages import Error, Heartbeat, Hello, Welcome

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "topologies" / "tiny.toml"
RUN_TIMEOUT_S = 60.0
#: How long "nothing arrived" is watched for; a reply comes within milliseconds.
SILENCE_S = 1.0
MB = 10**6
torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(120)


# --- topologies and runs ----------------------------------------------------------------------


def tiny(
    tmp_path: Path, *, mode: str = "none", rounds: int = 2, heartbeat_timeout_s: float = 20.0
) -> Topology:
    """tiny.toml, deterministic (per-round server updates), ephemeral ports, output and keys
    under ``tmp_path``; ``mode = "curve"`` generates the key pairs too."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    text = TINY.read_text()
    text = text.replace('server_update = "per_batch"', 'server_update = "per_round"')
    text = text.replace("rounds = 2\n", f"rounds = {rounds}\n", 1)
    text = text.replace("heartbeat_timeout_s = 20.0", f"heartbeat_timeout_s = {heartbeat_timeout_s}")
    text = text.replace('dir = "runs/tiny"', f'dir = "{tmp_path / f"runs-{mode}"}"')
    text = text.replace("port = 47310", "port = 0").replace("port = 47311", "port = 0")
    text += f'\n[run.security]\nmode = "{mode}"\nkeys = "{tmp_path / "keys"}"\n'
    path = tmp_path / f"tiny-{mode}.toml"
    path.write_text(text)
    topo = load_topology(path)
    if mode == "curve" and not (tmp_path / "keys").exists():
        generate_keys(topo, tmp_path / "keys")
    return topo


def summary(result: RunResult) -> dict[str, Any]:
    assert result.ok and result.status == "completed", (result.status, result.error, result.failures)
    data: dict[str, Any] = json.loads((Path(result.result["run_dir"]) / "summary.json").read_text())
    return data


def losses(s: dict[str, Any]) -> list[tuple[int, float, dict[str, float]]]:
    """What two runs with the same seed must agree on exactly: every round's losses."""
    return [(r["round"], r["loss"], r["per_device_loss"]) for r in s["rounds"]]


async def clean_losses(tmp_path: Path, rounds: int = 2) -> list[tuple[int, float, dict[str, float]]]:
    """The losses of an undisturbed mode = "none" tcp run of the same topology."""
    s = summary(await run_topology(tiny(tmp_path / "clean", rounds=rounds), transport="tcp",
                                   timeout_s=RUN_TIMEOUT_S))  # fmt: skip
    assert s["devices_lost"] == 0
    return losses(s)


Hook = Callable[[CoordinatorActor], Awaitable[None]]


def coordinator_with(*, before: dict[int, Hook] | None = None, after: dict[int, Hook] | None = None) -> Any:
    """A coordinator that awaits ``before[r]`` before round r and ``after[r]`` once it closed."""

    class Hooked(CoordinatorActor):
        async def _round(self, r: int) -> None:
            if before and r in before:
                await before[r](self)
            await super()._round(r)
            if after and r in after:
                await after[r](self)

    return Hooked


class Cast(dict[str, Actor]):
    """The actors a run built, by name: ``role(factory)`` records what ``factory`` builds."""

    def role(self, factory: Callable[[ActorSpec, ActorEnv], Actor]) -> Callable[[ActorSpec, ActorEnv], Actor]:
        def build(spec: ActorSpec, env: ActorEnv) -> Actor:
            actor = factory(spec, env)
            self[spec.name] = actor
            return actor

        return build


# --- raw peers -----------------------------------------------------------------------------

HANDSHAKE_FAILED = (
    zmq.Event.HANDSHAKE_FAILED_NO_DETAIL,
    zmq.Event.HANDSHAKE_FAILED_PROTOCOL,
    zmq.Event.HANDSHAKE_FAILED_AUTH,
)


@contextlib.contextmanager
def dealer(
    ctx: zmq.asyncio.Context,
    endpoint: str,
    routing_id: str,
    *,
    curve: tuple[bytes, bytes, bytes] | None = None,
) -> Iterator[tuple[zmq.asyncio.Socket, zmq.asyncio.Socket]]:
    """A raw DEALER (routing id ``routing_id``; CURVE client with (server key, public, secret)
    when ``curve`` is given) and its handshake monitor, attached before it connects."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, routing_id.encode())
    if curve is not None:
        server_key, public, secret = curve
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | sum(HANDSHAKE_FAILED))
    try:
        sock.connect(endpoint)
        yield sock, monitor
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)


async def handshake_outcome(monitor: zmq.asyncio.Socket, timeout_s: float = 10.0) -> zmq.Event:
    """The first handshake event of a raw DEALER's connection (bounded)."""
    async with asyncio.timeout(timeout_s):
        return zmq.Event((await recv_monitor_message(monitor))["event"])


async def arrives_within(sock: zmq.asyncio.Socket, seconds: float) -> bool:
    """Whether a message is ready on ``sock`` within ``seconds`` (returns as soon as one is)."""
    return bool(await sock.poll(int(seconds * 1000)))


async def next_reply(sock: zmq.asyncio.Socket, limits: WireLimits, timeout_s: float = 10.0) -> Envelope:
    """The next message on ``sock`` that is not a heartbeat (bounded)."""
    async with asyncio.timeout(timeout_s):
        while True:
            env = decode(await sock.recv_multipart(), limits)
            if not isinstance(env.msg, Heartbeat):
                return env


def hello(node: str, role: str, schema_hash: str) -> list[bytes | memoryview]:
    return encode(Hello(node=node, role=role, schema_hash=schema_hash), sender=node, msg_id=1)


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Until ``condition()`` holds (checked on every loop turn; bounded)."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 (what is polled has no event to wait on)
            await asyncio.sleep(0.005)


# --- 1. a CURVE run trains exactly like an insecure one ----------------------------------------


class KeyedServer(HeadServerActor):
    """Records the ZAP User-Id of every frame its ROUTER receives (None without CURVE)."""

    def __init__(self, spec: ActorSpec, env: ActorEnv) -> None:
        super().__init__(spec, env)
        self.user_ids: set[str | None] = set()

    async def _on_router_frames(self, identity: bytes, frames: list[zmq.Frame]) -> None:
        self.user_ids.add(user_id(frames[0]) if frames else None)
        await super()._on_router_frames(identity, frames)


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["tcp", "ipc"])
async def test_a_curve_run_has_the_losses_of_an_insecure_run(tmp_path: Path, transport: str) -> None:
    runs: dict[str, dict[str, Any]] = {}
    servers: dict[str, KeyedServer] = {}
    for mode, trans in (("none", "tcp"), ("curve", transport)):
        cast = Cast()
        topo = tiny(tmp_path, mode=mode)
        roles = {"server": cast.role(KeyedServer)}
        result = await run_topology(topo, transport=trans, roles=roles, timeout_s=RUN_TIMEOUT_S)  # type: ignore[arg-type]
        runs[mode] = summary(result)
        servers[mode] = cast["server"]  # type: ignore[assignment]
    assert runs["curve"]["devices_lost"] == runs["none"]["devices_lost"] == 0
    assert losses(runs["curve"]) == losses(runs["none"]) and len(runs["curve"]["rounds"]) == 2
    assert runs["curve"]["after"]["loss"] == runs["none"]["after"]["loss"]
    # CURVE really was on: every frame on the server's ROUTER (the devices dial it; the server
    # dials the coordinator) came over a connection authenticated as the actor named by its key.
    assert servers["curve"].user_ids == {"dev0", "dev1"}
    assert servers["none"].user_ids == {None}


# --- 2. strangers without a key get nothing ----------------------------------------------------


@pytest.mark.asyncio
async def test_strangers_without_a_key_get_no_reply_and_change_nothing(
    tmp_path: Path, zmq_ctx: zmq.asyncio.Context
) -> None:
    """A plain DEALER and a CURVE client with a fresh key pair (and the right server key), each
    claiming to be dev0 — which is connected — dial the server and the coordinator mid-run."""
    cast = Cast()
    seen: dict[tuple[str, str], tuple[zmq.Event, bool]] = {}
    counts: dict[str, Any] = {}

    def tally(coord: CoordinatorActor) -> tuple[int, ...]:
        assert coord.env.auth is not None
        server = cast["server"]
        return (
            coord.env.auth.refused,
            server._guard.rejected,
            coord._guard.rejected,
            len(server.refused),
            len(coord.refused),
        )

    async def strangers(coord: CoordinatorActor) -> None:
        assert coord.env.auth is not None
        counts["before"] = tally(coord)
        for target in ("server", "coordinator"):
            endpoint = await coord.env.endpoints.resolve(target)
            fresh = zmq.curve_keypair()
            for kind, curve in (
                ("plain", None),
                ("fresh_key", (coord.env.auth.keyring.public(target), *fresh)),
            ):
                with dealer(zmq_ctx, endpoint, "dev0", curve=curve) as (sock, monitor):
                    await sock.send_multipart(hello("dev0", "device", coord.env.schema_hash))
                    outcome = await handshake_outcome(monitor)
                    seen[(target, kind)] = (outcome, await arrives_within(sock, SILENCE_S))
        counts["after"] = tally(coord)
        counts["peers"] = (sorted(cast["server"].peers), sorted(coord.peers))

    result = await run_topology(
        tiny(tmp_path, mode="curve"),
        transport="tcp",
        roles={
            "coordinator": cast.role(coordinator_with(after={1: strangers})),
            "server": cast.role(HeadServerActor),
        },
        timeout_s=RUN_TIMEOUT_S,
    )
    s = summary(result)
    for (target, kind), (outcome, answered) in seen.items():
        assert outcome in HANDSHAKE_FAILED, (target, kind, outcome)
        assert not answered, f"{target} answered a {kind} stranger"
    assert (
        seen[("server", "fresh_key")][0]
        == seen[("coordinator", "fresh_key")][0]
        == zmq.Event.HANDSHAKE_FAILED_AUTH
    )
    refused, *actor_counts = counts["before"]
    refused_after, *actor_counts_after = counts["after"]
    assert refused_after >= refused + 2  # ZAP refused both fresh keys (server and coordinator)
    assert actor_counts_after == actor_counts  # no actor saw a frame of theirs
    assert counts["peers"] == (["coordinator", "dev0", "dev1"], ["dev0", "dev1", "server"])
    assert s["devices_lost"] == 0
    assert losses(s) == await clean_losses(tmp_path)


# --- 3. impostors: another actor's key, the receiver's own name, the wrong role --------------


async def dropped(actor: Actor, routing_id: bytes, timeout_s: float = 10.0) -> None:
    """Until ``actor``'s ROUTER has no connection under ``routing_id`` (bounded): ROUTER_MANDATORY
    refuses to send to none; otherwise one empty frame goes out, which no peer would accept."""
    assert actor._router is not None
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                await actor._router.send_multipart([routing_id, b""], flags=zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EHOSTUNREACH:
                    return
                raise
            await asyncio.sleep(0.005)


@pytest.mark.asyncio
@pytest.mark.parametrize("impostor", ["leaves", "stays"])
async def test_an_impostor_with_another_devices_key_is_refused_and_the_real_device_joins(
    impostor: str, tmp_path: Path, zmq_ctx: zmq.asyncio.Context
) -> None:
    """dev0's key pair under routing id dev1, HELLO as dev1, before the real dev1 starts: the
    connection is authenticated (as dev0), so it hears IdentityRefused; then it disconnects
    ("leaves") or stays connected ("stays"), and the real dev1 joins and trains every round."""
    topo = tiny(tmp_path, mode="curve", heartbeat_timeout_s=4.0)
    stolen = load_keyring(topo, ["dev0"])
    got: dict[str, Any] = {}
    held = contextlib.ExitStack()

    class Dev(DeviceActor):
        async def serve(self) -> None:
            if self.name == "dev1":  # the impostor goes first
                endpoint = await self.env.endpoints.resolve("server")
                curve = (stolen.public("server"), stolen.public("dev0"), stolen.secret("dev0"))
                with contextlib.ExitStack() as stack:
                    sock, _ = stack.enter_context(dealer(zmq_ctx, endpoint, "dev1", curve=curve))
                    await sock.send_multipart(hello("dev1", "device", self.env.schema_hash))
                    got["reply"] = await next_reply(sock, self.env.limits)
                    if impostor == "stays":
                        held.enter_context(stack.pop_all())
                if impostor == "leaves":  # once the server has dropped its connection
                    await dropped(cast["server"], b"dev1")
            await super().serve()

    cast = Cast()
    with held:
        roles = {"device": Dev, "server": cast.role(HeadServerActor)}
        result = await run_topology(topo, transport="tcp", roles=roles, timeout_s=RUN_TIMEOUT_S)
    assert "reply" in got, "the impostor was not answered"
    reply = got["reply"].msg
    assert isinstance(reply, Error) and reply.code == "IdentityRefused", reply
    assert "the key of 'dev0' may not speak as 'dev1'" in reply.message
    s = summary(result)
    assert [sorted(r["per_device_loss"]) for r in s["rounds"]] == [["dev0", "dev1"]] * 2
    assert s["devices_lost"] == 0
    assert losses(s) == await clean_losses(tmp_path)


# (case, target, routing id = HELLO node's key owner, HELLO node, HELLO role, what the refusal says)
HELLO_CASES = [
    ("own_name", "server", "server", "server", "server", "HELLO under server's own name"),
    ("own_name", "coordinator", "coordinator", "coordinator", "coordinator", "own name"),
    ("wrong_role", "server", "dev0", "dev0", "server", "dev0 is a device, its HELLO claims 'server'"),
    ("other_name", "server", "dev0", "dev1", "device", "'dev0' .* 'dev1'"),
    ("not_a_caller", "server", "coordinator", "coordinator", "coordinator", "does not connect to server"),
]


@contextlib.contextmanager
def secured_env(
    topo: Topology, ctx: zmq.asyncio.Context, keys: Path, mode: str
) -> Iterator[tuple[ActorEnv, CurveAuth | None]]:
    """A tcp :class:`ActorEnv` for ``topo``; with ``mode = "curve"`` its actors' sockets run
    CURVE with fresh keys in ``keys`` and a ZAP handler on ``ctx`` (the runtime's set-up)."""
    with actor_env(topo, ctx, "tcp") as env:
        if mode != "curve":
            yield env, None
            return
        generate_keys(topo, keys)
        auth = CurveAuth(ctx, load_keyring(topo, [a.name for a in topo.actors], keys), now=time.monotonic)
        auth.start()
        try:
            yield dataclasses.replace(env, auth=auth), auth
        finally:
            auth.stop()


def key_of(auth: CurveAuth | None, server: str, actor: str) -> tuple[bytes, bytes, bytes] | None:
    """CURVE options of a client holding ``actor``'s key pair, dialling ``server``."""
    if auth is None:
        return None
    return auth.keyring.public(server), auth.keyring.public(actor), auth.keyring.secret(actor)


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["none", "curve"])
async def test_hellos_under_a_false_name_or_role_are_refused(
    mode: str, tmp_path: Path, zmq_ctx: zmq.asyncio.Context
) -> None:
    """Under CURVE every refused HELLO is answered (the connection is an actor's); in mode none
    only actors that dial the receiver hear why, anyone else gets silence. Either way the
    refusal is recorded and no link is made."""
    topo = small_topology(devices=2)
    with secured_env(topo, zmq_ctx, tmp_path / "keys", mode) as (env, auth):
        actors = {n: Idle(topo.actor(n), env) for n in ("coordinator", "server")}
        async with serving(*actors.values()):
            await actors["server"].ready()
            for case, target, rid, node, role, why in HELLO_CASES:
                actor = actors[target]
                refused = len(actor.refused)
                endpoint = await env.endpoints.resolve(target)
                with dealer(zmq_ctx, endpoint, rid, curve=key_of(auth, target, rid)) as (sock, _):
                    await sock.send_multipart(hello(node, role, env.schema_hash))
                    await until(lambda a=actor, n=refused: len(a.refused) > n)  # type: ignore[misc]
                    if mode == "curve" or rid in actor._guard.callers:
                        reply = (await next_reply(sock, env.limits)).msg
                        assert isinstance(reply, Error) and reply.code == "IdentityRefused", (case, reply)
                        assert re.search(why, reply.message), (case, reply.message)
                    else:
                        assert not await arrives_within(sock, SILENCE_S), f"{case}: a stranger was answered"
                peer, exc = actor.refused[-1]
                assert peer == rid and type(exc).__name__ == "IdentityRefused", case
                assert re.search(why, str(exc)), case
                # no link came of it (the server's own link to the coordinator is the one it dialled)
                assert rid not in actor.peers or actor.link(rid).dialled, case


@pytest.mark.asyncio
async def test_an_actor_cannot_take_over_another_actors_connection(
    tmp_path: Path, zmq_ctx: zmq.asyncio.Context
) -> None:
    """Once dev1 has joined, a holder of dev0's key dials the server under routing id dev1 and
    listens for five heartbeat intervals: it must hear nothing meant for dev1, and dev1 must
    train every round. (With ROUTER_HANDOVER, as at 8036bce, the impostor took dev1's route:
    it received dev1's heartbeats, and dev1, orphaned, was lost and never rejoined.)"""
    heard: list[str] = []
    outcome: list[zmq.Event] = []

    async def take_over(coord: CoordinatorActor) -> None:
        stolen = load_keyring(coord.topology, ["dev0"])
        curve = (stolen.public("server"), stolen.public("dev0"), stolen.secret("dev0"))
        endpoint = await coord.env.endpoints.resolve("server")
        with dealer(zmq_ctx, endpoint, "dev1", curve=curve) as (sock, monitor):
            outcome.append(await handshake_outcome(monitor))
            if await arrives_within(sock, 5 * coord.settings.heartbeat_interval_s):
                heard.append(decode(await sock.recv_multipart(), coord.env.limits).kind.name)
        if heard:  # the hijack worked: end the run now rather than at its timeout
            coord.stop(f"the impostor received {heard}")

    topo = tiny(tmp_path, mode="curve", rounds=3, heartbeat_timeout_s=4.0)
    roles = {"coordinator": coordinator_with(after={1: take_over})}
    result = await run_topology(topo, transport="tcp", roles=roles, timeout_s=RUN_TIMEOUT_S)
    assert outcome == [zmq.Event.HANDSHAKE_SUCCEEDED]  # dev0's key is an actor's: CURVE lets it in
    assert heard == [], f"a connection authenticated as dev0 received dev1's {heard}"
    s = summary(result)
    assert [sorted(r["per_device_loss"]) for r in s["rounds"]] == [["dev0", "dev1"]] * 3
    assert s["devices_lost"] == 0
    assert losses(s) == await clean_losses(tmp_path, rounds=3)


# --- 4. a junk flood while a run trains -------------------------------------------------------

FLOOD_S = 10.0
FLOOD_MAX_MESSAGES = 2_000_000
#: A stranger's process: sends the templates round-robin, as fast as the sockets take them,
#: until ``seconds`` passed or ``max_messages`` were sent; prints "flooding" once the first is
#: queued, then one JSON line (sent, bytes, seconds).
FLOOD_CHILD = r"""
import json, sys, time, zmq
cfg = json.loads(sys.argv[1])
with open(cfg["templates"]) as f:
    msgs = [[bytes.fromhex(x) for x in m] for m in json.load(f)]
ctx = zmq.Context()
s = ctx.socket(zmq.DEALER)
s.setsockopt(zmq.LINGER, 0)
s.setsockopt(zmq.ROUTING_ID, cfg["identity"].encode())
s.setsockopt(zmq.SNDTIMEO, 1000)  # a vanished server (say, its process died) ends the flood
s.connect(cfg["endpoint"])


def send(m):
    try:
        s.send_multipart(m)
    except zmq.Again:
        return False
    return True


start = time.monotonic()
while not send(msgs[0]):
    if time.monotonic() - start > 30:
        sys.exit("nobody took the first message in 30 s")
t0 = time.monotonic()
print("flooding", flush=True)
sent, nbytes = 1, sum(map(len, msgs[0]))
while sent < cfg["max_messages"] and (sent % 64 or time.monotonic() - t0 < cfg["seconds"]):
    m = msgs[sent % len(msgs)]
    if not send(m):
        if time.monotonic() - t0 >= cfg["seconds"]:
            break
        continue
    sent += 1
    nbytes += sum(map(len, m))
print(json.dumps({"sent": sent, "bytes": nbytes, "seconds": time.monotonic() - t0}), flush=True)
s.close(0)
ctx.term()
"""


def junk(schema_hash: str, seed: int = 0) -> list[list[bytes]]:
    """Random multipart garbage, malformed headers, and well-formed messages a stranger may not
    send (HELLO as a device, ACTIVATIONS and a heartbeat without a handshake)."""
    rnd = random.Random(seed)
    out = [[rnd.randbytes(rnd.randrange(0, 400)) for _ in range(rnd.randrange(1, 5))] for _ in range(64)]
    header = {"v": [3, 0], "k": 1, "s": "stranger", "i": 1, "r": 0, "b": {}, "t": []}
    tensor = {"d": "float32", "s": [2**40], "n": 8, "c": None}
    out += [
        [msgpack.packb({**header, "k": 999})],
        [msgpack.packb({**header, "t": [tensor]}), bytes(8)],
        [msgpack.packb({**header, "v": [9, 9]})],
        [b"\xdf\xff\xff\xff\xff"],  # a map header that claims 4 G entries
        [msgpack.packb({**header, "s": "x" * 100_000})],
    ]
    act = Activations(
        device="dev0", round=1, step=0, cut=1, activations=WireTensor.from_torch(torch.zeros(2, 16, 64)),
        labels=WireTensor.from_torch(torch.zeros(2, 16, dtype=torch.int64)), n_samples=2, sent_at_ns=0,
    )  # fmt: skip
    for msg, sender in (
        (Hello(node="dev0", role="device", schema_hash=schema_hash), "dev0"),
        (Hello(node="stranger", role="device", schema_hash=schema_hash), "stranger"),
        (act, "dev0"),
        (Heartbeat(node="stranger", seq=1, sent_at_ns=0), "stranger"),
    ):
        out.append([bytes(f) for f in encode(msg, sender=sender, msg_id=7)])
    return out


@pytest.mark.asyncio
@pytest.mark.timeout(150)
async def test_a_junk_flood_does_not_change_training_or_cost_a_heartbeat(
    tmp_path: Path,
) -> None:
    """A stranger's process floods the server's ROUTER for FLOOD_S seconds from round 2 on;
    rounds 2..12 train under it, then the coordinator waits for the flood to end (heartbeats
    only). With heartbeat_timeout_s = 4, no peer may be found silent."""
    rounds = 12
    cast = Cast()
    flood: dict[str, Any] = {}

    async def start(coord: CoordinatorActor) -> None:
        path = tmp_path / "junk.json"
        path.write_text(json.dumps([[f.hex() for f in m] for m in junk(coord.env.schema_hash)]))
        endpoint = await coord.env.endpoints.resolve("server")
        cfg = {"templates": str(path), "identity": "stranger-7f3a", "seconds": FLOOD_S,
               "max_messages": FLOOD_MAX_MESSAGES, "endpoint": endpoint}  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", FLOOD_CHILD, json.dumps(cfg), stdout=subprocess.PIPE
        )
        flood["proc"] = proc
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            assert await proc.stdout.readline() == b"flooding\n"
        flood["rejected_before"] = cast["server"]._guard.rejected

    async def finish(coord: CoordinatorActor) -> None:
        proc = flood["proc"]
        async with asyncio.timeout(FLOOD_S + 30):
            out, _ = await proc.communicate()
        assert proc.returncode == 0
        flood.update(json.loads(out.decode().strip().splitlines()[-1]))

    topo = tiny(tmp_path, rounds=rounds, heartbeat_timeout_s=4.0)
    try:
        result = await run_topology(
            topo,
            transport="tcp",
            roles={
                "coordinator": coordinator_with(before={2: start}, after={rounds: finish}),
                "server": cast.role(HeadServerActor),
            },
            timeout_s=RUN_TIMEOUT_S + FLOOD_S,
        )
    finally:
        if "proc" in flood and flood["proc"].returncode is None:
            flood["proc"].kill()
            await flood["proc"].wait()
    s = summary(result)
    assert flood["sent"] > 1000, flood  # the flood did run...
    # ...and reached the server's actor (most of it is refused unread; HELLOs are refused handshakes)
    assert cast["server"]._guard.rejected - flood["rejected_before"] > flood["sent"] // 2
    assert s["devices_lost"] == 0 and s["rounds_aborted"] == []
    assert losses(s) == await clean_losses(tmp_path, rounds=rounds)


# --- 5. a frame that declares 1 GiB ------------------------------------------------------------

GIB = 2**30


def _zmtp_property(name: bytes, value: bytes) -> bytes:
    return bytes([len(name)]) + name + struct.pack(">I", len(value)) + value


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


@dataclasses.dataclass
class Declared:
    greeting: bytes
    ready: bytes
    accepted: int  # bytes of the body the kernel took before the peer closed
    closed_by: str


def declare_huge_frame(host: str, port: int, *, declared: int = GIB, stream: int = 200 * MB) -> Declared:
    """A raw ZMTP 3.0 DEALER (NULL mechanism) that announces a ``declared``-byte message frame,
    then streams zeros until ``stream`` bytes are sent or the peer closes the connection."""
    with socket.create_connection((host, port), timeout=10) as sock:
        # signature, version 3.0, mechanism NULL (20 bytes), as-server 0, 31 bytes filler
        sock.sendall(b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0") + bytes(32))
        greeting = _recv_exact(sock, 64)
        body = bytes([5]) + b"READY" + _zmtp_property(b"Socket-Type", b"DEALER")
        body += _zmtp_property(b"Identity", b"stranger-1g")
        sock.sendall(bytes([0x04, len(body)]) + body)  # a short command frame
        _flags, size = _recv_exact(sock, 2)
        ready = _recv_exact(sock, size)
        sock.sendall(bytes([0x02]) + struct.pack(">Q", declared))  # a long, final message frame
        chunk, sent = bytes(2**20), 0
        try:
            while sent < stream:
                sent += sock.send(chunk)
        except OSError as exc:
            return Declared(greeting, ready, sent, type(exc).__name__)
        return Declared(greeting, ready, sent, "nobody")


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


class PeakRss:
    """Peak resident memory of this process over a ``with`` block, as growth over its start:
    VmHWM after resetting it (/proc/self/clear_refs), or VmRSS sampled every millisecond by a
    thread where the reset is not allowed."""

    def __enter__(self) -> PeakRss:
        self.start = _status_bytes("VmRSS")
        self._stop = threading.Event()
        self._sampled = self.start
        self._thread: threading.Thread | None = None
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._sampled = max(self._sampled, _status_bytes("VmRSS"))

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.growth = self._sampled - self.start
        else:
            self.growth = _status_bytes("VmHWM") - self.start


@pytest.mark.asyncio
async def test_a_frame_declaring_a_gibibyte_is_cut_off_before_it_costs_memory(tmp_path: Path) -> None:
    cast = Cast()
    attack: dict[str, Any] = {}

    async def declare(coord: CoordinatorActor) -> None:
        router = cast["server"]._router
        assert router is not None
        attack["maxmsgsize"] = router.getsockopt(zmq.MAXMSGSIZE)
        endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
        with PeakRss() as peak:
            attack["result"] = await asyncio.to_thread(declare_huge_frame, host, int(port))
        attack["growth"] = peak.growth

    topo = tiny(tmp_path)
    result = await run_topology(
        topo,
        transport="tcp",
        roles={"coordinator": coordinator_with(after={1: declare}), "server": cast.role(HeadServerActor)},
        timeout_s=RUN_TIMEOUT_S,
    )
    # The server's frame cap is the budget's: 2 × the largest tiny frame + the header limit.
    expected = socket_options(topo, run_model_config(topo), wire_limits(topo)).max_msg_bytes
    assert attack["maxmsgsize"] == expected < 2 * 2**20
    done: Declared = attack["result"]
    assert done.greeting[:1] == b"\xff" and done.greeting[9:11] == b"\x7f\x03"  # a real ZMTP 3 peer
    assert b"READY" in done.ready
    assert done.closed_by != "nobody" and done.accepted < 64 * MB, done  # cut off, not read
    assert attack["growth"] < 50 * MB, f"the server process grew {attack['growth'] / MB:.0f} MB"
    s = summary(result)  # ...and it went on serving the devices
    assert s["devices_lost"] == 0
    assert losses(s) == await clean_losses(tmp_path)


# --- 6. coded tensors whose metadata declares a huge shape ------------------------------------

HUGE = (4096, 4096, 16)  # 2^28 elements: 1 GiB of float32


def rewritten(shape: tuple[int, ...]) -> WireTensor:
    """A genuinely coded (2, 16, 64) tensor (tiny.toml's uplink chain) whose meta and
    descriptor claim ``shape``."""
    chain = {"sparsify": {"keep": 0.2, "scope": "tensor"}, "quantize": {"bits": 8, "scale": "token"},
             "lossless": {"positions": "bitmap", "zstd_level": 3}}  # fmt: skip
    enc = Codec(ChainSpec.parse(chain)).encode(torch.randn(2, 16, 64), 0)
    meta = {**copy.deepcopy(enc.meta), "shape": list(shape)}
    return WireTensor.coded(meta, enc.payload, dtype=meta["dtype"], shape=shape)


def kept_nothing(shape: tuple[int, ...], dtype: str) -> WireTensor:
    """Token sparsification that keeps no token of ``shape``: the flags bitmap (one bit per
    token, all zero) compresses to a few dozen bytes with zstd."""
    chain = ChainSpec.parse({"sparsify": {"keep": 0.5, "scope": "tokens"}})
    enc = Codec(chain).encode(torch.randn(2, 8, 64), 0)
    tokens = 1
    for d in shape[:-1]:
        tokens *= d
    flags = zstandard.ZstdCompressor(level=3).compress(bytes((tokens + 7) // 8))
    meta = {**copy.deepcopy(enc.meta), "shape": list(shape), "dtype": dtype, "sparsify": {"kept": 0}}
    meta["sections"] = [["pos", len(flags), "zstd"], ["values", 0, "raw"]]
    return WireTensor.coded(meta, flags, dtype=dtype, shape=shape)


CODED = {
    "rewritten_shape": lambda: rewritten(HUGE),
    "no_token_kept_float32": lambda: kept_nothing(HUGE, "float32"),
    "no_token_kept_bfloat16": lambda: kept_nothing(HUGE, "bfloat16"),
    # (B, T, C) with the model's width and T within its context: passes the shape checks
    "no_token_kept_model_shape": lambda: kept_nothing((2048, 512, 64), "float32"),
}


@contextlib.asynccontextmanager
async def planned_head_server(ctx: zmq.asyncio.Context) -> AsyncIterator[tuple[HeadServerActor, ActorEnv]]:
    """A real head server with its plan, between scripted (idle) coordinator and nothing else:
    the test speaks as dev0 on a raw socket."""
    topo = small_topology(devices=2)
    (plan,) = server_plans(topo)
    with actor_env(topo, ctx) as env:
        coord, server = Idle(topo.actor("coordinator"), env), HeadServerActor(topo.actor("server"), env)
        async with serving(coord, server):
            await server.ready()
            await coord.call("server", plan)
            yield server, env


def micro_batch(activations: WireTensor | None = None) -> Activations:
    return Activations(
        device="dev0", round=1, step=0, cut=1,  # dev0's planned cut in small_topology
        activations=WireTensor.from_torch(torch.randn(2, 8, 64)) if activations is None else activations,
        labels=WireTensor.from_torch(torch.randint(0, 256, (2, 8))), n_samples=2, sent_at_ns=time.time_ns(),
    )  # fmt: skip


@pytest.mark.asyncio
@pytest.mark.parametrize("case", sorted(CODED))
async def test_coded_activations_declaring_a_huge_shape_are_refused_without_allocating_it(
    case: str, zmq_ctx: zmq.asyncio.Context
) -> None:
    tensor = CODED[case]()
    assert tensor.desc.nbytes < 4096  # a small payload...
    async with planned_head_server(zmq_ctx) as (server, env):
        with dealer(zmq_ctx, await env.endpoints.resolve("server"), "dev0") as (sock, _):
            await sock.send_multipart(hello("dev0", "device", env.schema_hash))
            welcome = await next_reply(sock, env.limits)
            with PeakRss() as peak:
                await sock.send_multipart(encode(micro_batch(tensor), sender="dev0", msg_id=2))
                reply = await next_reply(sock, env.limits, timeout_s=60)
            # ...and it still trains on an honest micro-batch
            await sock.send_multipart(encode(micro_batch(), sender="dev0", msg_id=3))
            honest = await next_reply(sock, env.limits, timeout_s=60)
    assert isinstance(welcome.msg, Welcome)
    assert isinstance(reply.msg, Error), reply.kind
    assert reply.msg.code in ("CodecError", "ProtocolViolation", "MalformedFrame"), reply.msg
    assert peak.growth < 50 * MB, f"{case}: the server grew {peak.growth / MB:.0f} MB to refuse it"
    assert isinstance(honest.msg, Gradients) and honest.reply_to == 3
    assert server.batches_served == 1


# --- 7. Throttle ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_throttle_logs_the_first_event_then_one_per_interval_with_the_suppressed_count() -> None:
    clock = FakeClock()
    t = Throttle(clock, interval_s=10.0)
    assert t.due("a") == 0  # the first event of a key is logged
    assert [t.due("a") for _ in range(5)] == [None] * 5
    clock.t += 9.999
    assert t.due("a") is None  # still inside the interval: 6 suppressed now
    assert t.due("b") == 0  # keys are independent
    clock.t += 0.001
    assert t.due("a") == 6  # one line, carrying what it did not log
    assert t.due("a") is None
    clock.t += 10.0
    assert t.due("a") == 1
    clock.t += 25.0
    assert t.due("a") == 0  # nothing suppressed since the last line
    assert t.total == 12


def test_throttle_remembers_at_most_max_keys() -> None:
    clock = FakeClock()
    t = Throttle(clock, interval_s=10.0, max_keys=3)
    assert [t.due(k) for k in "abc"] == [0, 0, 0]
    assert [t.due(k) for k in "abc"] == [None, None, None]
    assert t.due("d") == 0  # a fourth key forgets the oldest ("a")...
    assert t.due("a") == 0  # ...which is then logged as new (forgetting "b")
    assert t.due("c") is None and t.due("d") is None
    for i in range(10_000):  # a stranger varying its key cannot grow the table
        t.due(f"stranger-{i}")
    assert len(t._last) == 3
    assert t.total == 10_000 + 10
