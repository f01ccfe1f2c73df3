"""CURVE between separate zmq Contexts (as between hosts): a key the peer does not know fails
fast with a message that says which key, instead of a HELLO that times out."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import zmq.auth

from sft_actors.errors import KeyFileError
from sft_actors.runtime import run_actors
from sft_actors.security import generate_keys, load_keyring
from sft_actors.topology import Topology, load_topology
from tests.ports import free_ports

ROOT = Path(__file__).resolve().parent.parent


def _topology(tmp_path: Path, keys: Path) -> Topology:
    text = (ROOT / "topologies" / "tiny.toml").read_text()
    text = text.replace("[run.train]", f'[run.security]\nmode = "curve"\nkeys = "{keys}"\n\n[run.train]', 1)
    coordinator, server = free_ports(2)
    text = text.replace("port = 47310", "port = COORDINATOR").replace("port = 47311", f"port = {server}")
    text = text.replace("port = COORDINATOR", f"port = {coordinator}")
    text = text.replace('dir = "runs/tiny"', f'dir = "{tmp_path / "runs"}"')
    path = tmp_path / "curve.toml"
    path.write_text(text)
    return load_topology(path)


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_device_whose_key_the_coordinator_does_not_know_is_refused_at_once(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    topo = _topology(tmp_path, keys)
    generate_keys(topo, keys)
    # The device's host holds a key pair of another generation (regenerated there by mistake).
    stale = tmp_path / "stale"
    shutil.copytree(keys, stale)
    for f in stale.glob("dev0.*"):
        f.unlink()
    _, secret = zmq.auth.create_certificates(stale, "dev0")
    os.chmod(secret, 0o600)
    device_topo = dataclasses.replace(
        topo,
        run=dataclasses.replace(topo.run, security=dataclasses.replace(topo.run.security, keys=str(stale))),
    )
    edge = [topo.coordinator, *topo.servers]
    served = asyncio.create_task(run_actors(topo, edge, transport="tcp", timeout_s=50))
    try:
        # Without the handshake monitor this would wait out connect_timeout_s and blame the network.
        result = await run_actors(device_topo, [device_topo.actor("dev0")], transport="tcp", timeout_s=40)
    finally:
        served.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await served
    assert result.outcomes["dev0"].error is not None
    assert "IdentityRefused" in result.outcomes["dev0"].error
    assert "coordinator refused dev0's CURVE key" in result.outcomes["dev0"].error


def test_every_process_loads_only_what_it_needs_and_refuses_unsafe_keys(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    topo = _topology(tmp_path, keys)
    generate_keys(topo, keys)
    ring = load_keyring(topo, ["dev0"])
    assert set(ring.publics) == {a.name for a in topo.actors} and set(ring.secrets) == {"dev0"}
    assert ring.actor_for(ring.public("server")) == "server" and ring.actor_for(b"x" * 40) is None
    with pytest.raises(KeyFileError, match="no secret key for 'server'"):
        ring.secret("server")
    (keys / "server.key_secret").unlink()
    with pytest.raises(KeyFileError, match=r"cannot read secret key .*server\.key_secret: No such file"):
        load_keyring(topo, ["server"])


def test_a_coordinator_without_its_keys_does_not_start(tmp_path: Path) -> None:
    topo = _topology(tmp_path, tmp_path / "absent")
    with pytest.raises(KeyFileError, match="sft keys generate"):
        asyncio.run(run_actors(topo, [topo.coordinator], transport="tcp", timeout_s=5))
