"""Two "machines" on one host: Linux network namespaces joined by a veth pair.

The edge namespace runs the coordinator and the server, the board namespace runs two devices;
each node is a real ``sft-node`` process started with ``ip netns exec``, talking tcp across the
veth (shaped with a tc token bucket on the board's side, like a slow radio). This is the
multi-host path of ``deploy/launch.sh`` without SSH. Needs root and iproute2 (CI has both).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None,
        reason="needs root and iproute2 (ip, tc) for network namespaces",
    ),
]

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Hosts:
    edge_ns: str
    board_ns: str
    edge_ip: str
    board_ip: str
    board_dev: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def two_hosts() -> Iterator[Hosts]:
    tag = f"{os.getpid() % 100000}"
    subnet = f"10.231.{os.getpid() % 250}"
    hosts = Hosts(
        edge_ns=f"sft-e{tag}",
        board_ns=f"sft-b{tag}",
        edge_ip=f"{subnet}.1",
        board_ip=f"{subnet}.2",
        board_dev=f"vb{tag}",
    )
    edge_dev = f"ve{tag}"
    try:
        _ip("netns", "add", hosts.edge_ns)
        _ip("netns", "add", hosts.board_ns)
        _ip("link", "add", edge_dev, "type", "veth", "peer", "name", hosts.board_dev)
        _ip("link", "set", edge_dev, "netns", hosts.edge_ns)
        _ip("link", "set", hosts.board_dev, "netns", hosts.board_ns)
        for ns, dev, addr in (
            (hosts.edge_ns, edge_dev, hosts.edge_ip),
            (hosts.board_ns, hosts.board_dev, hosts.board_ip),
        ):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        # The board's radio: 50 Mbit/s token bucket on its uplink.
        subprocess.run(
            ["ip", "netns", "exec", hosts.board_ns, "tc", "qdisc", "add", "dev", hosts.board_dev, "root",
             "tbf", "rate", "50mbit", "burst", "64kb", "latency", "100ms"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        yield hosts
    finally:
        for ns in (hosts.edge_ns, hosts.board_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _topology(tmp_path: Path, h: Hosts) -> Path:
    text = (ROOT / "topologies" / "tiny.toml").read_text()
    run_part = text[: text.index("[[actors]]")].replace('dir = "runs/tiny"', f'dir = "{tmp_path / "runs"}"')
    path = tmp_path / "two-hosts.toml"
    path.write_text(
        run_part
        + f"""
[run.security]
allow_insecure = true  # two network namespaces on this machine, no keys

[[hosts]]
name = "edge"
address = "{h.edge_ip}"

[[hosts]]
name = "board"
address = "{h.board_ip}"

[[actors]]
name = "coordinator"
role = "coordinator"
host = "edge"
port = 47610

[[actors]]
name = "server"
role = "server"
host = "edge"
port = 47611

[[actors]]
name = "dev0"
role = "device"
host = "board"
cut = 1

[[actors]]
name = "dev1"
role = "device"
host = "board"
cut = 2
"""
    )
    return path


def _tx_bytes(ns: str, dev: str) -> int:
    out = subprocess.run(
        ["ip", "-n", ns, "-j", "-s", "link", "show", dev], check=True, capture_output=True, text=True
    ).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])


@pytest.mark.timeout(240)
def test_split_fine_tuning_across_two_network_namespaces(tmp_path: Path, two_hosts: Hosts) -> None:
    h = two_hosts
    topo = _topology(tmp_path, h)
    node = str(Path(sys.executable).parent / "sft-node")
    common = ["--topology", str(topo), "--transport", "tcp", "--log-level", "warning", "--timeout-s", "200"]
    procs = {
        name: subprocess.Popen(
            ["ip", "netns", "exec", ns, node, "--role", role, "--host", host, *common],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, ns, role, host in (
            ("coordinator", h.edge_ns, "coordinator", "edge"),
            ("server", h.edge_ns, "server", "edge"),
            ("devices", h.board_ns, "device", "board"),
        )
    }
    try:
        outputs = {name: p.communicate(timeout=220) for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    for name, p in procs.items():
        assert p.returncode == 0, f"{name}: {outputs[name][1][-2000:]}"
    summary = json.loads(next((tmp_path / "runs").glob("tiny-*/summary.json")).read_text())
    assert len(summary["rounds"]) == 2 and summary["after"]["targets"] > 0
    # The coordinator's node prints the run's headline as one JSON line, as `sft run` does.
    line = json.loads(outputs["coordinator"][0].strip().splitlines()[-1])
    assert line["ok"] is True and line["result"]["run_dir"] == summary["run_dir"]
    # The activations really crossed the board's (shaped) link.
    assert _tx_bytes(h.board_ns, h.board_dev) > summary["totals"]["bytes_up"]
