"""Topology files: the shipped ones load, and every mistake names file, table, key and fix."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from sft_actors.codec.spec import ChainSpec, SparsifySpec
from sft_actors.errors import TopologyError
from sft_actors.model.config import PRESETS
from sft_actors.topology import load_topology, parse_topology

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "topologies").glob("*.toml"))

BASE: dict[str, Any] = {
    "run": {"name": "t", "model": "smollm2-135m", "train": {"rounds": 1}},
    "actors": [
        {"name": "coordinator", "role": "coordinator", "port": 5000},
        {"name": "server", "role": "server", "port": 5001},
        {"name": "dev0", "role": "device", "cut": 2},
        {"name": "dev1", "role": "device", "cut": 4, "link": {"uplink_mbps": 10.0, "rtt_ms": 5.0}},
    ],
}


def doc(**changes: Any) -> dict[str, Any]:
    d = copy.deepcopy(BASE)
    d.update(changes)
    return d


def refused(d: dict[str, Any], *fragments: str, **kw: Any) -> str:
    with pytest.raises(TopologyError) as info:
        parse_topology(d, source="lab.toml", **kw)
    msg = str(info.value)
    assert msg.startswith("lab.toml: "), msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


def test_shipped_topologies_load() -> None:
    names = {p.name for p in SHIPPED}
    assert {"local.toml", "lab.toml", "tiny.toml", "vit-fmnist.toml"} <= names
    for path in SHIPPED:
        topo = load_topology(path)
        assert topo.coordinator.role == "coordinator" and topo.devices
    local = load_topology(ROOT / "topologies/local.toml")
    assert len(local.devices) == 4 and len({d.cut for d in local.devices}) == 4
    assert local.servers[0].start_block == min(d.cut or 0 for d in local.devices)
    assert len(load_topology(ROOT / "topologies/lab.toml").hosts) == 3


def test_defaults_and_connections() -> None:
    topo = parse_topology(doc())
    assert [d.shard for d in topo.devices] == [0, 1]
    assert topo.actor("server").start_block == 2
    assert topo.connections("dev0") == ("coordinator", "server")
    assert topo.connections("server") == ("coordinator",)
    assert topo.connections("coordinator") == ()
    assert topo.actor("dev1").link.uplink_mbps == 10.0 and topo.actor("dev1").link.downlink_mbps is None


def test_unknown_keys_suggest_a_close_match() -> None:
    d = doc()
    d["actors"][2]["cutt"] = 3
    refused(d, "[[actors]] #3 ('dev0')", "'cutt'", "did you mean 'cut'?")
    d = doc()
    d["run"]["train"]["round"] = 3
    refused(d, "[run].train", "'round'", "did you mean 'rounds'?")
    refused(doc(extra={}), "top level", "'extra'")


def test_bad_values_name_the_fix() -> None:
    d = doc()
    d["run"]["train"]["server_update"] = "per_batchh"
    refused(d, "'server_update'", "did you mean 'per_batch'?")
    d = doc()
    d["run"]["train"]["batch_size"] = "4"
    refused(d, "'batch_size'", "expected an integer")
    d = doc()
    d["run"]["runtime"] = {"heartbeat_interval_s": 2.0, "heartbeat_timeout_s": 3.0}
    refused(d, "[run.runtime]", "heartbeat_timeout_s", "at least 2 × heartbeat_interval_s")


def test_duplicates_are_refused() -> None:
    d = doc()
    d["actors"][3]["name"] = "dev0"
    refused(d, "'dev0' appears twice")
    d = doc()
    d["actors"][1]["port"] = 5000
    refused(d, "[[actors]] 'server'", "port 5000", "also used by 'coordinator'")
    d = doc()
    d["actors"][3]["shard"] = 0
    refused(d, "shard 0 is also used by 'dev0'")


def test_split_must_fit_the_model() -> None:
    d = doc()
    d["actors"][2]["cut"] = 31
    refused(d, "[[actors]] 'dev0'", "'cut'", "outside model 'smollm2-135m'", "1..30")
    d = doc()
    d["actors"][1]["start_block"] = 3
    refused(d, "[[actors]] 'server'", "start_block", "'dev0' cuts at 2", "<= 2")
    d = doc(run={"name": "t", "model": "my-model"})
    d["actors"][2]["cut"] = 7
    six = PRESETS["llama-tiny"]
    six = dataclasses.replace(six, num_blocks=6)
    refused(d, "1..6", model_config=lambda m: six if m == "my-model" else None)
    parse_topology(d, model_config=lambda m: None)  # unknown architecture: no bound
    refused(d, "[run], key 'model'", "cannot use model 'my-model'")  # the default reads the spec


def test_roles_and_hosts() -> None:
    d = doc()
    d["actors"] = d["actors"][1:]
    refused(d, "exactly one coordinator", "found 0")
    d = doc()
    d["actors"] = [a for a in d["actors"] if a["role"] != "device"]
    refused(d, "no device actors")
    d = doc()
    d["actors"][2]["host"] = "board"
    refused(d, "host 'board' is not defined")
    d = doc(hosts=[{"name": "edge"}, {"name": "board"}])
    refused(d, "several hosts are defined")
    d = doc()
    d["actors"][1]["cut"] = 3
    refused(d, "only devices take 'cut'")
    d = doc()
    del d["actors"][1]["port"]
    refused(d, "'port'", "give it a port")


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="cannot read"):
        load_topology(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nname=")
    with pytest.raises(TopologyError, match="not valid TOML"):
        load_topology(bad)


def test_schema_parts_follow_the_split() -> None:
    from sft_actors.actors.env import topology_schema_hash

    a = parse_topology(doc())
    d = doc()
    d["actors"][2]["cut"] = 3
    b = parse_topology(d)
    assert topology_schema_hash(a) == topology_schema_hash(parse_topology(doc()))
    assert topology_schema_hash(a) != topology_schema_hash(b)


def test_codec_tables_are_validated_by_the_codec() -> None:
    d = doc()
    d["run"]["codec"] = {"up": {"sparsfy": {"keep": 0.1}}}
    refused(d, "[run], key 'codec.up'", "invalid codec chain", "'sparsfy'")
    d["run"]["codec"] = {"up": {"sparsify": {"keep": 0.1}}, "down": {}}
    codec = parse_topology(d).run.codec
    assert codec.up == ChainSpec(sparsify=SparsifySpec(keep=0.1)) and codec.down.is_identity
