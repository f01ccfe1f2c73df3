"""``address = "auto"``: nodes publish and find their hosts' addresses when the run starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sft_actors.errors import ConfigError, PeerTimeout
from sft_actors.rendezvous import address_file, auto_hosts, on_this_machine, publish, resolve
from sft_actors.topology import Topology, load_topology
from tests.ports import free_ports

ROOT = Path(__file__).resolve().parent.parent


def _topology(tmp_path: Path) -> Path:
    """tiny.toml on two auto hosts: the edge (coordinator, server) and a board (devices)."""
    text = (ROOT / "topologies" / "tiny.toml").read_text()
    ports = dict(zip(("47310", "47311"), free_ports(2), strict=True))
    for old, new in ports.items():
        text = text.replace(f"port = {old}\n", f"port = {new}\nhost = HOST\n")
    text = text.replace("host = HOST\n", 'host = "edge"\n')
    text = text.replace('role = "device"\n', 'role = "device"\nhost = "board"\n')
    text = text.replace('dir = "runs/tiny"', f'dir = "{tmp_path / "runs"}"')
    text = text.replace("[run.train]", "[run.security]\nallow_insecure = true\n\n[run.train]", 1)
    text += '\n[[hosts]]\nname = "edge"\naddress = "auto"\n\n[[hosts]]\nname = "board"\naddress = "auto"\n'
    path = tmp_path / "auto.toml"
    path.write_text(text)
    return path


def test_auto_hosts_resolve_from_flags_files_or_this_machine(tmp_path: Path) -> None:
    topo = load_topology(_topology(tmp_path))
    assert auto_hosts(topo) == {"edge", "board"}
    assert {h.address for h in on_this_machine(topo).hosts} == {"127.0.0.1"}
    given = resolve(
        topo, mine={"board"}, dials={"edge"}, addresses={"edge": "10.0.0.5"}, advertise="b1", timeout_s=0
    )
    assert {h.name: h.address for h in given.hosts} == {"edge": "10.0.0.5", "board": "b1"}
    with pytest.raises(ConfigError, match=r"give this node --rendezvous DIR .* or --address edge=ADDR"):
        resolve(topo, mine={"board"}, dials={"edge"}, timeout_s=0)
    with pytest.raises(ConfigError, match=r"names hosts \['nowhere'\]"):
        resolve(topo, mine=(), dials=(), addresses={"nowhere": "x"}, timeout_s=0)
    publish(tmp_path / "rv", "edge", "node07.cluster")
    assert address_file(tmp_path / "rv", "edge").read_text() == "node07.cluster\n"
    found = resolve(topo, mine=(), dials={"edge"}, rendezvous=tmp_path / "rv", timeout_s=0)
    assert found.host("edge").address == "node07.cluster" and found.host("board").address == "auto"


def test_a_host_that_never_publishes_times_out_naming_it(tmp_path: Path) -> None:
    topo: Topology = load_topology(_topology(tmp_path))
    t = [0.0]

    def sleep(s: float) -> None:
        t[0] += s

    with pytest.raises(PeerTimeout, match=r"no address for host 'edge' in .* after 3s"):
        resolve(
            topo, mine=(), dials={"edge"}, rendezvous=tmp_path, timeout_s=3.0, now=lambda: t[0], sleep=sleep
        )
    assert 3.0 <= t[0] < 3.5  # polled until the deadline, on the injected clock


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_nodes_on_auto_hosts_find_each_other_through_the_rendezvous_directory(tmp_path: Path) -> None:
    path = _topology(tmp_path)
    rv = tmp_path / "rendezvous"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def node(role: str, host: str) -> subprocess.Popen[str]:
        argv = [sys.executable, "-m", "sft_actors.node_process", "--role", role, "--topology", str(path)]
        argv += ["--host", host, "--rendezvous", str(rv), "--advertise", "127.0.0.1", "--threads", "1"]
        argv += ["--log-format", "json", "--timeout-s", "150"]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)

    # Devices first: they wait for the edge's file rather than failing on a missing address.
    procs = [node("device", "board"), node("coordinator", "edge"), node("server", "edge")]
    try:
        outs = [p.communicate(timeout=160)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    coordinator = json.loads(outs[1].strip().splitlines()[-1])
    assert coordinator["status"] == "completed"
    assert address_file(rv, "edge").read_text().strip() == "127.0.0.1"
