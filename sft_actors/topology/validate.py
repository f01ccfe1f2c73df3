"""Checks across a topology's tables that need nothing but the file itself.

Ranges of numbers, unique names and ports, one coordinator, a split that fits the model's
block count, the credit window against the pipeline depth, host fields a launcher can put in
a shell command unquoted, and no unauthenticated sockets on addresses other machines reach.
Each failure is one :class:`~sft_actors.errors.TopologyError` line naming the file, the
table, the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re

from sft_actors.errors import ConfigError
from sft_actors.placement import parse_device_spec
from sft_actors.topology.report import Reporter
from sft_actors.topology.schema import LORA_AVERAGING, ActorSpec, HostSpec, Topology
from sft_actors.topology.validate_data import validate_data_keys

_NAME_CHARS = "-_."
#: What a path that reaches a shell or another host may hold (``[[hosts]] workdir``,
#: ``[run.output] dir``, ``[run.security] keys``): nothing a shell splits, expands or redirects.
_PATH_CHAR = re.compile(r"[A-Za-z0-9/._~+@,%=-]")
_PATH_RULE = "write a plain path: letters, digits and / . _ - ~ + @ , % = (~ only as a leading ~/)"
#: A host name, an IPv4 address or an IPv6 address (optionally in brackets).
_ADDRESS = re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.:-]+")
#: ``ssh`` target: ``host`` or ``user@host`` (ssh config aliases included), nothing else.
_SSH = re.compile(r"(?:[A-Za-z0-9_.-]+@)?(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.:-]+)")


def validate_tables(r: Reporter, topo: Topology) -> None:
    """Every file-only check except the split (which needs the model's block count)."""
    _validate_train(r, topo)
    _validate_data_and_runtime(r, topo)
    _validate_pipeline(r, topo)
    _validate_hosts(r, topo)
    _validate_actors(r, topo)
    _validate_roles(r, topo)
    _validate_security(r, topo)


def _validate_train(r: Reporter, topo: Topology) -> None:
    run = topo.run
    if not run.name or not all(c.isalnum() or c in _NAME_CHARS for c in run.name):
        r.fail("[run]", "name", f"{run.name!r} must be non-empty letters, digits, '-', '_' or '.'")
    t = run.train
    for key in (
        "rounds",
        "steps_per_round",
        "batch_size",
        "seq_len",
        "aggregate_every",
        "max_inflight",
        "calibration_batches",
    ):
        if getattr(t, key) < 1:
            r.fail("[run.train]", key, f"must be at least 1, got {getattr(t, key)}")
    if t.eval_batches < 0:
        r.fail("[run.train]", "eval_batches", f"must be 0 or more, got {t.eval_batches}")
    if t.round_timeout_s <= 0:
        r.fail("[run.train]", "round_timeout_s", f"must be positive, got {t.round_timeout_s}")
    if t.lr <= 0:
        r.fail("[run.train]", "lr", f"must be positive, got {t.lr}")
    if t.lora_averaging not in LORA_AVERAGING:  # a topology built in code, not parsed
        choices = ", ".join(map(repr, LORA_AVERAGING))
        fix = f"{t.lora_averaging!r} is not one of {choices}; use one of them"
        r.fail("[run.train]", "lora_averaging", fix)
    if t.round_deadline_s is not None and not 0 < t.round_deadline_s <= t.round_timeout_s:
        r.fail(
            "[run.train]",
            "round_deadline_s",
            f"must be positive and at most round_timeout_s ({t.round_timeout_s}s), got {t.round_deadline_s}",
        )
    n = len(topo.devices)
    if t.min_devices is not None and not 1 <= t.min_devices <= max(1, n):
        r.fail("[run.train]", "min_devices", f"must be between 1 and the {n} devices, got {t.min_devices}")
    ck = run.checkpoint
    for key in ("every", "keep"):
        if getattr(ck, key) < 1:
            r.fail("[run.checkpoint]", key, f"must be at least 1, got {getattr(ck, key)}")


def _validate_data_and_runtime(r: Reporter, topo: Topology) -> None:
    d = topo.run.data
    if d.alpha <= 0:
        r.fail("[run.data]", "alpha", f"the Dirichlet concentration must be positive, got {d.alpha}")
    if not 0 < d.heldout_fraction < 1:
        r.fail("[run.data]", "heldout_fraction", f"must be in (0, 1), got {d.heldout_fraction}")
    validate_data_keys(r, d)
    rt = topo.run.runtime
    for key in (
        "heartbeat_interval_s",
        "heartbeat_timeout_s",
        "connect_timeout_s",
        "request_timeout_s",
        "drain_timeout_s",
        "max_message_mb",
        "queue_mb",
        "rejoin_timeout_s",
    ):
        if getattr(rt, key) <= 0:
            r.fail("[run.runtime]", key, f"must be positive, got {getattr(rt, key)}")
    if rt.heartbeat_timeout_s < 2 * rt.heartbeat_interval_s:
        r.fail(
            "[run.runtime]",
            "heartbeat_timeout_s",
            f"{rt.heartbeat_timeout_s}s would flag healthy peers; "
            f"make it at least 2 × heartbeat_interval_s ({2 * rt.heartbeat_interval_s}s)",
        )
    for key in ("link_window", "mailbox_size", "hwm"):
        if getattr(rt, key) < 1:
            r.fail("[run.runtime]", key, f"must be at least 1, got {getattr(rt, key)}")
    if rt.linger_ms < 0:
        r.fail("[run.runtime]", "linger_ms", f"must be 0 or more, got {rt.linger_ms}")


def _validate_pipeline(r: Reporter, topo: Topology) -> None:
    t = topo.run.train
    window = topo.run.runtime.link_window
    # The credit window bounds the calls in flight on a link, so a deeper pipeline would be
    # capped silently; fedlora has no server link and runs one micro-batch at a time anyway.
    if t.mode != "fedlora" and t.max_inflight > window:
        r.fail(
            "[run.train]",
            "max_inflight",
            f"{t.max_inflight} micro-batches cannot be in flight over a link_window of {window} "
            f"credits; lower max_inflight to {window} or raise [run.runtime] link_window",
        )


def _validate_actors(r: Reporter, topo: Topology) -> None:
    host_names = [h.name for h in topo.hosts]
    _unique(r, host_names, "[[hosts]]", "name")
    _unique(r, [a.name for a in topo.actors], "[[actors]]", "name")
    for a in topo.actors:
        where = f"[[actors]] {a.name!r}"
        if a.host not in host_names:
            close = difflib.get_close_matches(a.host, host_names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"define it in [[hosts]] ({host_names})"
            r.fail(where, "host", f"host {a.host!r} is not defined; {hint}")
        if not _is_name(a.name):
            r.fail(
                where,
                "name",
                "use letters, digits, '-', '_' or '.', not starting with '-' (names become socket "
                "identities and command-line arguments)",
            )
        if a.addressed and a.port is None:
            r.fail(where, "port", f"a {a.role} listens; give it a port (0 = ephemeral, one process only)")
        if a.port is not None and not 0 <= a.port <= 65535:
            r.fail(where, "port", f"{a.port} is not a TCP port; use 1..65535 (or 0)")
        _validate_device(r, where, a)
    seen: dict[tuple[str, int], str] = {}
    for a in topo.actors:
        if a.port:
            address = topo.host(a.host).address
            if (address, a.port) in seen:
                r.fail(
                    f"[[actors]] {a.name!r}",
                    "port",
                    f"port {a.port} on {address} is also used by "
                    f"{seen[(address, a.port)]!r}; pick another port",
                )
            seen[(address, a.port)] = a.name


def _validate_device(r: Reporter, where: str, a: ActorSpec) -> None:
    """``device`` is ``cpu``, ``cuda`` or ``cuda:N``; the coordinator computes nothing (cpu)."""
    try:
        kind, _ = parse_device_spec(a.device)
    except ConfigError as exc:
        r.fail(where, "device", f"{exc}; use one of those")
    if a.role == "coordinator" and kind != "cpu":
        r.fail(where, "device", "the coordinator trains nothing; remove device (it stays on the cpu)")


def _is_name(name: str) -> bool:
    """An actor or host name: letters, digits, ``-_.``, not starting with ``-`` (an option)."""
    return bool(name) and not name.startswith("-") and all(c.isalnum() or c in _NAME_CHARS for c in name)


def _validate_hosts(r: Reporter, topo: Topology) -> None:
    """Host fields a launcher puts into ``ssh TARGET "cd WORKDIR && ..."`` and node arguments."""
    for h in topo.hosts:
        where = f"[[hosts]] {h.name!r}"
        if not _is_name(h.name):
            r.fail(where, "name", f"{h.name!r}: use letters, digits, '-', '_' or '.', not starting with '-'")
        if h.address.startswith("-") or not _ADDRESS.fullmatch(h.address):
            r.fail(
                where,
                "address",
                f"{h.address!r} is not a host name or IP address; use letters, digits, '.', '-', ':' "
                "(and [] around an IPv6 address), not starting with '-'",
            )
        target = h.ssh.rpartition("@")
        if h.ssh and (not _SSH.fullmatch(h.ssh) or h.ssh.startswith("-") or target[2].startswith("-")):
            r.fail(
                where,
                "ssh",
                f"{h.ssh!r} is not an ssh target; write host or user@host (letters, digits, "
                "'.', '_', '-', ':', [] for IPv6; not starting with '-', which ssh reads as an "
                "option), or leave it empty to run locally",
            )
        _check_plain_path(r, where, "workdir", h.workdir)


def _check_plain_path(r: Reporter, where: str, key: str, value: str, *, home: bool = True) -> None:
    """Fail unless ``value`` is a non-empty path a shell reads as one word, unexpanded.
    ``home``: whether a leading ``~/`` is allowed (only where a shell on the host reads it)."""
    bad = sorted({c for c in value if not _PATH_CHAR.fullmatch(c)})
    if not value:
        problem = "is empty"
    elif not home and value.startswith("~"):
        problem = (
            "starts with '~', which no node expands; give a path relative to the node's directory or absolute"
        )
    elif bad:
        problem = f"holds {', '.join(map(repr, bad))}"
    elif value.startswith("-"):
        problem = "starts with '-' (a command would read it as an option)"
    elif value.startswith("~") and value != "~" and not value.startswith("~/"):
        problem = "starts with '~' but not '~/' (a shell would expand it to another user's home)"
    else:
        return
    r.fail(where, key, f"{value!r} {problem}; {_PATH_RULE}")


def is_loopback(address: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ``::1`` (bracketed or not): this machine only."""
    host = address.removeprefix("[").removesuffix("]")
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposed_hosts(topo: Topology) -> tuple[HostSpec, ...]:
    """Hosts that run an actor on an address other machines may reach (not loopback)."""
    used = {a.host for a in topo.actors}
    return tuple(h for h in topo.hosts if h.name in used and not is_loopback(h.address))


def _validate_security(r: Reporter, topo: Topology) -> None:
    """Paths that reach remote hosts are plain; ``mode = "none"`` stays on loopback unless
    ``allow_insecure`` accepts that anyone who can reach the ports may join as any actor."""
    sec = topo.run.security
    # Read by the nodes themselves (no shell): relative to their directory, or absolute.
    _check_plain_path(r, "[run.output]", "dir", topo.run.output.dir, home=False)
    _check_plain_path(r, "[run.security]", "keys", sec.keys, home=False)
    exposed = exposed_hosts(topo)
    if sec.mode == "none" and not sec.allow_insecure and exposed:
        h = exposed[0]
        r.fail(
            "[run.security]",
            "mode",
            f'mode "none" would let anyone who can reach host {h.name!r} ({h.address}, not loopback) '
            f'join as any actor; set mode = "curve" and run `sft keys generate {topo.source} '
            f"--out {sec.keys}`, or set allow_insecure = true to accept that risk",
        )


def _validate_roles(r: Reporter, topo: Topology) -> None:
    coordinators = topo.by_role("coordinator")
    if len(coordinators) != 1:
        r.fail(
            "[[actors]]",
            "role",
            f"exactly one coordinator is required, found {len(coordinators)}; "
            'add (or remove) an actor with role = "coordinator"',
        )
    if not topo.devices:
        r.fail("[[actors]]", "role", 'no device actors; add at least one [[actors]] with role = "device"')
    if not topo.servers and topo.run.train.mode != "fedlora":
        r.fail(
            "[[actors]]",
            "role",
            f"mode {topo.run.train.mode!r} needs a server; add an [[actors]] table with "
            'role = "server" (only fedlora runs without one)',
        )


def validate_split(r: Reporter, topo: Topology, blocks: int | None) -> None:
    """Device cuts in ``1..blocks``, unique shards, sane links, server stages below the cuts.

    ``blocks`` is the model's block count (None: unknown, so cuts are bounded below only).
    """
    _validate_devices(r, topo, blocks)
    _validate_servers(r, topo, blocks)


def _validate_devices(r: Reporter, topo: Topology, blocks: int | None) -> None:
    shards: dict[int, str] = {}
    for i, d in enumerate(topo.devices):
        where = f"[[actors]] {d.name!r}"
        if d.cut is None:
            if topo.run.train.mode == "fedlora":
                continue
            r.fail(where, "cut", "a device needs cut = <number of blocks it runs>")
        if d.cut < 1 or (blocks is not None and d.cut > blocks):
            bound = f"1..{blocks}" if blocks is not None else "at least 1"
            r.fail(where, "cut", f"cut {d.cut} is outside model {topo.run.model!r}; use {bound}")
        shard = d.shard if d.shard is not None else i
        if shard < 0:
            r.fail(where, "shard", f"must be 0 or more, got {shard}")
        if shard in shards:
            r.fail(where, "shard", f"shard {shard} is also used by {shards[shard]!r}; give each its own")
        shards[shard] = d.name
        link = d.link
        for key in ("uplink_mbps", "downlink_mbps"):
            rate = getattr(link, key)
            if rate is not None and rate <= 0:
                r.fail(f"{where}.link", key, "must be positive (leave it out for an unpaced link)")
        if link.rtt_ms < 0:
            r.fail(f"{where}.link", "rtt_ms", "must be 0 or more")


def _validate_servers(r: Reporter, topo: Topology, blocks: int | None) -> None:
    devices = topo.devices
    cuts = [d.cut for d in devices if d.cut is not None]
    # Several servers are stages of one server: [start_k, start_{k+1}). The first stage must
    # start at or below every device cut; later stages split the remaining blocks.
    default_start = min(cuts, default=0)
    starts = {s.name: (s.start_block if s.start_block is not None else default_start) for s in topo.servers}
    seen: dict[int, str] = {}
    for s in topo.servers:
        where = f"[[actors]] {s.name!r}"
        if s.start_block is not None and s.start_block < 0:
            r.fail(where, "start_block", "must be 0 or more")
        if starts[s.name] in seen:
            r.fail(
                where,
                "start_block",
                f"stage {seen[starts[s.name]]!r} also starts at block {starts[s.name]}; "
                "give each server stage its own start_block",
            )
        seen[starts[s.name]] = s.name
        if blocks is not None and starts[s.name] >= blocks and len(topo.servers) > 1:
            r.fail(where, "start_block", f"a stage must start below the model's {blocks} blocks")
    first = min(starts.values(), default=0)
    if cuts and first > min(cuts):
        low = min(devices, key=lambda d: d.cut or 0)
        name = min(starts, key=lambda n: starts[n])
        r.fail(
            f"[[actors]] {name!r}",
            "start_block",
            f"the server starts at block {first} but "
            f"device {low.name!r} cuts at {low.cut}; set start_block <= {min(cuts)} (or leave it out)",
        )


def resolve_defaults(topo: Topology) -> tuple[ActorSpec, ...]:
    """Defaults that depend on other tables: shard = device index, server start = min cut."""
    cuts = [d.cut for d in topo.devices if d.cut is not None]
    resolved = []
    device_index = 0
    for a in topo.actors:
        if a.role == "device":
            if a.shard is None:
                a = dataclasses.replace(a, shard=device_index)
            device_index += 1
        elif a.role == "server" and a.start_block is None and cuts:
            a = dataclasses.replace(a, start_block=min(cuts))
        resolved.append(a)
    return tuple(resolved)


def _unique(r: Reporter, names: list[str], where: str, key: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            r.fail(where, key, f"{n!r} appears twice; names must be unique (rename one)")
        seen.add(n)
