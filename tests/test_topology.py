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
    refused(d, "[run.train], key 'round'", "did you mean 'rounds'?")
    d = doc()
    d["run"]["lora"] = {"rnak": 4}
    refused(d, "[run.lora], key 'rnak'", "did you mean 'rank'?")
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


def test_choices_suggest_case_insensitively_and_float16_is_not_offered_for_training() -> None:
    for value, want in [("float64", "'bfloat16'"), ("BFloat16", "'bfloat16'"), ("FLOAT32", "'float32'")]:
        msg = refused(doc(run={**BASE["run"], "dtype": value}), "[run], key 'dtype'", f"did you mean {want}?")
        assert "is not one of 'float32', 'bfloat16' (" in msg and "(float16 loads for inference only)" in msg
        assert "'float16'" not in msg, msg
    d = doc()
    d["run"]["train"]["lora_averaging"] = "SVD"
    refused(d, "[run.train], key 'lora_averaging'", "did you mean 'svd'?")
    d = doc(run={**BASE["run"], "dtype": "float16"})  # accepted by the schema, refused for training
    refused(d, "float16 training is not supported")


@pytest.mark.parametrize("spec", ["cuda:99999999999999999999", "cuda:1024", "cuda:"])
def test_a_bad_device_string_is_one_line(tmp_path: Path, spec: str) -> None:
    d = doc()
    d["actors"][2]["device"] = spec
    refused(d, "[[actors]] 'dev0'", "'device'", f"{spec!r} is not")
    path = tmp_path / "t.toml"
    path.write_text(_edit("cut = 1", f'cut = 1\ndevice = "{spec}"')(CHECK_BASE))
    out = _check(path)
    assert out.exit_code == 2 and out.exception is not None and isinstance(out.exception, SystemExit)
    assert out.stderr.splitlines() == [out.stderr.strip()] and f"{spec!r} is not" in out.stderr


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


# --- `sft topology check`: a battery of broken files, each one line naming file, table, key, fix ---

CHECK_BASE = """
[run]
name = "battery"
model = "llama-tiny"
dtype = "float32"

[run.train]
mode = "sft"
rounds = 1
steps_per_round = 1
batch_size = 2
seq_len = 16
lr = 0.001
max_inflight = 1
eval_batches = 1

[run.lora]
rank = 4
alpha = 8.0
targets = ["q", "v"]

[run.data]
dataset = "stdlib-docs"
partition = "iid"
alpha = 0.5
heldout_fraction = 0.1
options = { max_documents = 20 }

[run.codec.up]
sparsify = { keep = 0.2, scope = "tensor" }
[run.codec.down]
quantize = { bits = 8, scale = "token" }

[run.runtime]
link_window = 4

[[hosts]]
name = "local"
address = "127.0.0.1"

[[actors]]
name = "coordinator"
role = "coordinator"
port = 47600

[[actors]]
name = "server"
role = "server"
port = 47601

[[actors]]
name = "dev0"
role = "device"
cut = 1

[[actors]]
name = "dev1"
role = "device"
cut = 2
"""


def _edit(*pairs: str) -> Any:
    """Replace each ``old`` by ``new`` (pairs), insisting that ``old`` occurs exactly once."""

    def apply(text: str) -> str:
        for old, new in zip(pairs[::2], pairs[1::2], strict=True):
            assert text.count(old) == 1, old
            text = text.replace(old, new)
        return text

    return apply


VIT = ('model = "llama-tiny"', 'model = "vit-tiny"')
_INSECURE = "link_window = 4\n\n[run.security]\nallow_insecure = true"
# id, edit of CHECK_BASE ({tmp} is the test's folder), table, key, a fragment of the fix
BROKEN: list[tuple[str, Any, str, str, str]] = [
    ("unsupported-model-dir", _edit('"llama-tiny"', '"{tmp}/bert"'), "[run]", "model", "unsupported model"),
    ("model-dir-no-config", _edit('"llama-tiny"', '"{tmp}/empty"'), "[run]", "model", "put the checkpoint"),
    ("llama-dir-no-weights", _edit('"llama-tiny"', '"{tmp}/llama"'), "[run]", "model", "put the weights"),
    (
        "llama-config-lacks-field",
        _edit('"llama-tiny"', '"{tmp}/llama-bad"'),
        "[run]",
        "model",
        "add that field",
    ),
    (
        "corrupt-gguf",
        _edit('"llama-tiny"', '"{tmp}/bad.gguf"'),
        "[run]",
        "model",
        "point model at a supported",
    ),
    (
        "corrupt-safetensors",
        _edit('"llama-tiny"', '"{tmp}/bad.safetensors"'),
        "[run]",
        "model",
        "does not parse",
    ),
    ("unknown-model", _edit('"llama-tiny"', '"llama-tiyn"'), "[run]", "model", "use smollm2-135m"),
    ("gguf-missing", _edit('"llama-tiny"', '"{tmp}/nope.gguf"'), "[run]", "model", "use smollm2-135m"),
    ("float16", _edit('"float32"', '"float16"'), "[run]", "dtype", 'use dtype = "bfloat16"'),
    (
        "device-spec",
        _edit('role = "server"', 'role = "server"\ndevice = "tpu"'),
        "[[actors]] 'server'",
        "device",
        "cuda:N",
    ),
    ("float64", _edit('"float32"', '"float64"'), "[run]", "dtype", "is not one of"),
    (
        "project-in-down",
        _edit("quantize = { bits = 8", 'project = { basis = "pca" }\nquantize = { bits = 8'),
        "[run]",
        "codec.down",
        "remove 'project'",
    ),
    (
        "project-in-device-down",
        _edit("cut = 2", 'cut = 2\ncodec = { down = { project = { basis = "pca" } } }'),
        "[[actors]] #4 ('dev1')",
        "codec.down",
        "remove 'project'",
    ),
    (
        "codec-stage-typo",
        _edit("sparsify = {", "sparsfy = {"),
        "[run]",
        "codec.up",
        "did you mean 'sparsify'",
    ),
    ("codec-bits", _edit("bits = 8", "bits = 9"), "[run]", "codec.down", "must be one of"),
    (
        "codec-nan",
        _edit('scope = "tensor" }', 'scope = "tensor" }\noutliers = { channel_factor = nan }'),
        "[run.codec.up.outliers]",
        "channel_factor",
        "write a number",
    ),
    (
        "text-path-missing",
        _edit('"stdlib-docs"', '"text:{tmp}/nope.txt"'),
        "[run.data]",
        "dataset",
        "does not exist",
    ),
    (
        "jsonl-path-missing",
        _edit('"stdlib-docs"', '"jsonl:{tmp}/no"'),
        "[run.data]",
        "dataset",
        "does not exist",
    ),
    (
        "unknown-dataset",
        _edit('"stdlib-docs"', '"stdlib-doc"'),
        "[run.data]",
        "dataset",
        "did you mean 'stdlib-docs'",
    ),
    (
        "stdlib-root-missing",
        _edit('partition = "iid"', 'partition = "iid"\nroot = "{tmp}/nope"'),
        "[run.data]",
        "root",
        "folder of .py files",
    ),
    (
        "unknown-data-option",
        _edit("max_documents", "max_docs"),
        "[run.data]",
        "options",
        "did you mean 'max_documents'",
    ),
    (
        "images-for-llama",
        _edit('"stdlib-docs"', '"fashion-mnist"', "options = { max_documents = 20 }", ""),
        "[run.data]",
        "dataset",
        "use a text dataset",
    ),
    ("text-for-vit", _edit(*VIT), "[run.data]", "dataset", "use an image dataset (e.g. fashion-mnist)"),
    (
        "fashion-mnist-root-missing",
        _edit(
            *VIT, '"stdlib-docs"', '"fashion-mnist"', "options = { max_documents = 20 }", 'root = "{tmp}/fm"'
        ),
        "[run.data]",
        "root",
        "apt-get install dataset-fashion-mnist",
    ),
    (
        "cifar-without-root",
        _edit(*VIT, '"stdlib-docs"', '"cifar100"', "options = { max_documents = 20 }", ""),
        "[run.data]",
        "root",
        "pass root=<folder>",
    ),
    ("lora-target-typo", _edit('["q", "v"]', '["qq"]'), "[run.lora]", "targets", "did you mean 'q'"),
    ("lora-target-vit-only", _edit('["q", "v"]', '["qkv"]'), "[run.lora]", "targets", "use some of"),
    ("lora-alpha-nan", _edit("alpha = 8.0", "alpha = nan"), "[run.lora]", "alpha", "finite number"),
    ("lora-alpha-negative", _edit("alpha = 8.0", "alpha = -1.0"), "[run.lora]", "alpha", "fix the value"),
    ("lora-rank-zero", _edit("rank = 4", "rank = 0"), "[run.lora]", "rank", "fix the value"),
    (
        "lora-dropout-one",
        _edit("rank = 4", "rank = 4\ndropout = 1.0"),
        "[run.lora]",
        "dropout",
        "fix the value",
    ),
    (
        "seq-len-beyond-context",
        _edit("seq_len = 16", "seq_len = 100000000"),
        "[run.train]",
        "seq_len",
        "use seq_len <= 512",
    ),
    ("seq-len-one", _edit("seq_len = 16", "seq_len = 1"), "[run.train]", "seq_len", "at least 2"),
    ("lr-nan", _edit("lr = 0.001", "lr = nan"), "[run.train]", "lr", "finite number"),
    ("lr-inf", _edit("lr = 0.001", "lr = inf"), "[run.train]", "lr", "finite number"),
    ("lr-zero", _edit("lr = 0.001", "lr = 0.0"), "[run.train]", "lr", "must be positive"),
    ("rounds-float", _edit("rounds = 1", "rounds = 1.5"), "[run.train]", "rounds", "expected an integer"),
    (
        "batch-size-string",
        _edit("batch_size = 2", 'batch_size = "2"'),
        "[run.train]",
        "batch_size",
        "expected an integer",
    ),
    ("mode-typo", _edit('mode = "sft"', 'mode = "sfl "'), "[run.train]", "mode", "did you mean 'sfl'"),
    (
        "eval-batches-negative",
        _edit("eval_batches = 1", "eval_batches = -1"),
        "[run.train]",
        "eval_batches",
        "0 or more",
    ),
    (
        "calibration-zero",
        _edit("eval_batches = 1", "calibration_batches = 0"),
        "[run.train]",
        "calibration_batches",
        "at least 1",
    ),
    (
        "max-inflight-over-window",
        _edit("max_inflight = 1", "max_inflight = 8"),
        "[run.train]",
        "max_inflight",
        "raise [run.runtime] link_window",
    ),
    ("bad-partition", _edit('"iid"', '"dirichlett"'), "[run.data]", "partition", "did you mean 'dirichlet'"),
    ("data-alpha-nan", _edit("alpha = 0.5", "alpha = nan"), "[run.data]", "alpha", "finite number"),
    ("data-alpha-zero", _edit("alpha = 0.5", "alpha = 0.0"), "[run.data]", "alpha", "must be positive"),
    (
        "heldout-one",
        _edit("heldout_fraction = 0.1", "heldout_fraction = 1.0"),
        "[run.data]",
        "heldout_fraction",
        "must be in (0, 1)",
    ),
    (
        "heartbeat",
        _edit("link_window = 4", "heartbeat_interval_s = 3.0"),
        "[run.runtime]",
        "heartbeat_timeout_s",
        "at least 2 × heartbeat_interval_s",
    ),
    (
        "link-window-zero",
        _edit("link_window = 4", "link_window = 0"),
        "[run.runtime]",
        "link_window",
        "at least 1",
    ),
    ("unknown-run-table", _edit("[run.lora]", "[run.lorra]"), "[run]", "lorra", "did you mean 'lora'"),
    (
        "run-table-at-top",
        _edit("[run.runtime]", "[runtime]"),
        "top level",
        "runtime",
        "rename the table [run.runtime]",
    ),
    ("unknown-top-table", _edit("[run.runtime]", "[extra]"), "top level", "extra", "Rename or remove"),
    ("key-above-run", lambda t: "seed = 3\n" + t, "top level", "seed", "move it under [run]"),
    ("missing-run", lambda t: t[t.index("[[hosts]]") :], "top level", "run", "add [run]"),
    ("run-name-empty", _edit('name = "battery"', 'name = ""'), "[run]", "name", "must be non-empty"),
    ("negative-port", _edit("port = 47601", "port = -1"), "[[actors]] 'server'", "port", "use 1..65535"),
    ("port-clash", _edit("port = 47601", "port = 47600"), "[[actors]] 'server'", "port", "pick another port"),
    ("server-without-port", _edit("port = 47601\n", ""), "[[actors]] 'server'", "port", "give it a port"),
    ("duplicate-actor", _edit('name = "dev1"', 'name = "dev0"'), "[[actors]]", "name", "appears twice"),
    (
        "actor-name-chars",
        _edit('name = "dev1"', 'name = "dev 1"'),
        "[[actors]] 'dev 1'",
        "name",
        "use letters, digits",
    ),
    ("cut-zero", _edit("cut = 1", "cut = 0"), "[[actors]] 'dev0'", "cut", "use 1..4"),
    ("cut-beyond-model", _edit("cut = 2", "cut = 5"), "[[actors]] 'dev1'", "cut", "use 1..4"),
    ("device-without-cut", _edit("cut = 2\n", ""), "[[actors]] 'dev1'", "cut", "a device needs cut"),
    ("cut-typo", _edit("cut = 2", "cutt = 2"), "[[actors]] #4 ('dev1')", "cutt", "did you mean 'cut'"),
    (
        "server-with-cut",
        _edit("port = 47601", "port = 47601\ncut = 1"),
        "[[actors]] #2 ('server')",
        "cut",
        "only devices take 'cut'",
    ),
    (
        "start-block-above-cut",
        _edit("port = 47601", "port = 47601\nstart_block = 2"),
        "[[actors]] 'server'",
        "start_block",
        "set start_block <= 1",
    ),
    (
        "two-coordinators",
        _edit('name = "server"\nrole = "server"', 'name = "server"\nrole = "coordinator"'),
        "[[actors]]",
        "role",
        "exactly one coordinator",
    ),
    (
        "no-server",
        _edit('role = "server"', 'role = "device"\ncut = 3'),
        "[[actors]]",
        "role",
        "needs a server",
    ),
    (
        "unknown-role",
        _edit('role = "server"', 'role = "sever"'),
        "[[actors]] #2 ('server')",
        "role",
        "did you mean 'server'",
    ),
    (
        "undefined-host",
        _edit("cut = 2", 'cut = 2\nhost = "board"'),
        "[[actors]] 'dev1'",
        "host",
        "define it in [[hosts]]",
    ),
    (
        "duplicate-shard",
        _edit("cut = 2", "cut = 2\nshard = 0"),
        "[[actors]] 'dev1'",
        "shard",
        "give each its own",
    ),
    (
        "uplink-zero",
        _edit("cut = 2", "cut = 2\nlink = { uplink_mbps = 0.0 }"),
        "[[actors]] 'dev1'.link",
        "uplink_mbps",
        "must be positive",
    ),
    (
        "unresolvable-host",  # not loopback: mode "none" needs allow_insecure to get this far
        _edit('"127.0.0.1"', '"no-such-host.invalid"', "link_window = 4", _INSECURE),
        "[[hosts]] 'local'",
        "address",
        "use an IP address",
    ),
    (
        "actors-not-tables",
        lambda t: 'actors = ["dev0", "dev1"]\n' + t[: t.index("[[actors]]")],
        "top level",
        "actors",
        "write each as [[actors]]",
    ),
    (
        "actor-table-typo",
        _edit('[[actors]]\nname = "dev1"', '[[actor]]\nname = "dev1"'),
        "top level",
        "actor",
        "did you mean 'actors'",
    ),
]


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """Model folders a user might point ``model`` at: not a Llama or ViT, empty, no weights, a bad config."""
    import json

    for name, config in {
        "bert": {"model_type": "bert"},
        "llama": {
            "model_type": "llama",
            "vocab_size": 256,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
        },
        "llama-bad": {"model_type": "llama", "hidden_size": 64},
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    (tmp_path / "bad.safetensors").write_bytes(b"xx")
    return tmp_path


def _check(path: Path) -> Any:
    from typer.testing import CliRunner

    from sft_actors.cli.main import app

    return CliRunner().invoke(app, ["topology", "check", str(path)])


@pytest.mark.parametrize(("case", "edit", "table", "key", "fix"), BROKEN, ids=[c[0] for c in BROKEN])
def test_check_refuses_a_broken_topology_in_one_line(
    models: Path, case: str, edit: Any, table: str, key: str, fix: str
) -> None:
    path = models / f"{case}.toml"
    path.write_text(edit(CHECK_BASE).replace("{tmp}", str(models)))
    out = _check(path)
    assert out.exit_code == 2, out.output
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {path}: {table}"), lines[0]
    assert f"key {key!r}" in lines[0], lines[0]
    assert fix in lines[0], lines[0]


def test_battery_covers_the_issue() -> None:
    assert len(BROKEN) >= 60 and len({c[0] for c in BROKEN}) == len(BROKEN)


def test_the_base_of_the_battery_passes(models: Path) -> None:
    path = models / "base.toml"
    path.write_text(CHECK_BASE)
    out = _check(path)
    assert out.exit_code == 0 and out.stderr == "", out.output
    assert "ok — run 'battery'" in out.stdout


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\xff\xfe\x00", b'[run]\nname = "\xe9"\n', None])
def test_an_unreadable_file_is_one_line(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "topology.toml"
    if content is None:
        path.mkdir()  # a folder
    else:
        path.write_bytes(content)
    out = _check(path)
    assert out.exit_code == 2 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), lines
    assert ("not a UTF-8 text file" if content else "Is a directory") in lines[0]
    assert "check the path" in lines[0]
    for name, fix in (("missing.toml", "No such file"), ("syntax.toml", "fix the syntax")):
        if name == "syntax.toml":
            (tmp_path / name).write_text("[run\nname = 'x'\n")
        out = _check(tmp_path / name)
        assert out.exit_code == 2 and len(out.stderr.splitlines()) == 1 and fix in out.stderr, out.stderr


def test_check_in_a_subprocess_prints_one_line(tmp_path: Path) -> None:
    """No stray warning or log line from the imports: stderr is exactly the error."""
    import subprocess
    import sys

    path = tmp_path / "binary.toml"
    path.write_bytes(bytes(range(256)))
    proc = subprocess.run(
        [sys.executable, "-m", "sft_actors.cli.main", "topology", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and "not a UTF-8 text file" in proc.stderr


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_topologies_pass_check(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    topo = load_topology(path, log_warnings=False)
    if topo.run.security.mode == "curve":  # keys are made per checkout (keys/ is not in git)
        from sft_actors.security import generate_keys

        monkeypatch.chdir(tmp_path)
        generate_keys(topo, topo.run.security.keys)
    out = _check(path)
    assert out.exit_code == 0 and out.stderr == "", out.output
    assert f"{path}: ok" in out.stdout


@pytest.mark.parametrize("mode", ["sl", "sfl", "fedlora"])
def test_modes_without_a_codec_warn_that_they_ignore_it(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "baseline.toml"
    text = _edit('mode = "sft"', f'mode = "{mode}"', "max_inflight = 1", "max_inflight = 2")(CHECK_BASE)
    path.write_text(_edit("cut = 2", "cut = 2\ncodec = { up = { quantize = { bits = 4 } } }")(text))
    out = _check(path)
    assert out.exit_code == 0, out.output
    warnings = out.stderr.splitlines()
    assert all(w.startswith(f"warning: {path}: ") for w in warnings), warnings
    assert any(
        "[run.codec]:" in w and f"mode {mode!r} sends raw tensors and ignores it" in w for w in warnings
    )
    assert any("[[actors]] 'dev1', key 'codec'" in w for w in warnings), warnings
    assert any("key 'max_inflight'" in w for w in warnings) == (mode in ("sl", "fedlora")), warnings
    assert any("will sit idle" in w for w in warnings) == (mode == "fedlora"), warnings
    sft = tmp_path / "sft.toml"
    sft.write_text(CHECK_BASE)
    assert _check(sft).stderr == ""


def test_sl_warns_that_it_ignores_lora_averaging(tmp_path: Path) -> None:
    from sft_actors.topology import topology_warnings

    path = tmp_path / "sl.toml"
    path.write_text(_edit('mode = "sft"', 'mode = "sl"\nlora_averaging = "svd"')(CHECK_BASE))
    warnings = topology_warnings(load_topology(path, log_warnings=False))
    assert any("[run.train], key 'lora_averaging': mode 'sl'" in w for w in warnings), warnings
    path.write_text(_edit('mode = "sft"', 'mode = "sfl"\nlora_averaging = "svd"')(CHECK_BASE))
    assert not any("lora_averaging" in w for w in topology_warnings(load_topology(path, log_warnings=False)))


def test_load_logs_the_warnings(tmp_path: Path) -> None:
    from sft_actors.topology import topology_warnings

    path = tmp_path / "sl.toml"
    path.write_text(_edit('mode = "sft"', 'mode = "sl"')(CHECK_BASE))
    topo = load_topology(path)
    assert len(topology_warnings(topo)) == 1
    # An identity chain (only `lossless` counts as a codec too) is nothing to warn about.
    path.write_text(
        _edit(
            'mode = "sft"',
            'mode = "sl"',
            '[run.codec.up]\nsparsify = { keep = 0.2, scope = "tensor" }\n',
            "",
            '[run.codec.down]\nquantize = { bits = 8, scale = "token" }\n',
            "",
        )(CHECK_BASE)
    )
    assert topology_warnings(load_topology(path)) == ()


def test_dataset_files_are_checked_only_where_devices_run(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(_edit('"stdlib-docs"', f'"text:{tmp_path}/corpus.txt"')(CHECK_BASE))
    with pytest.raises(TopologyError, match="key 'dataset'"):
        load_topology(path)
    topo = load_topology(path, roles=("coordinator", "server"))  # an edge host needs no data
    assert topo.run.data.dataset.endswith("corpus.txt")
    (tmp_path / "corpus.txt").write_text("some text\n" * 50)
    load_topology(path)


@pytest.mark.asyncio
async def test_bfloat16_runs_without_a_server(tmp_path: Path) -> None:
    """What check_dtype lets through runs: bfloat16 in fedlora (the split modes: test_precision)."""
    import math

    from sft_actors.runtime import run_topology

    path = tmp_path / "bf16.toml"
    text = _edit('"float32"', '"bfloat16"', 'mode = "sft"', 'mode = "fedlora"')(CHECK_BASE)
    path.write_text(f'{text}\n[run.output]\ndir = "{tmp_path / "runs"}"\n')
    topo = load_topology(path)
    assert topo.run.dtype == "bfloat16"
    result = await run_topology(topo, transport="inproc", timeout_s=120)
    assert result.ok, result.failures
    assert math.isfinite(result.result["after"]["loss"])


def test_remote_host_names_resolve_only_when_checked(tmp_path: Path) -> None:
    """An in-process run never dials host addresses: a file naming remote boards still loads;
    `check_hosts` (sft topology check, a node for what it dials) is where they must resolve."""
    from sft_actors.topology import check_hosts

    path = tmp_path / "remote.toml"
    path.write_text(
        _edit(
            '[[hosts]]\nname = "local"\naddress = "127.0.0.1"\n',
            '[[hosts]]\nname = "local"\naddress = "127.0.0.1"\n\n'
            '[[hosts]]\nname = "board"\naddress = "board.invalid"\n',
            "cut = 2",
            'cut = 2\nhost = "board"',
            'role = "coordinator"',
            'role = "coordinator"\nhost = "local"',
            'role = "server"',
            'role = "server"\nhost = "local"',
            "cut = 1",
            'cut = 1\nhost = "local"',
            "link_window = 4",
            _INSECURE,  # a remote board with mode "none"
        )(CHECK_BASE)
    )
    topo = load_topology(path, log_warnings=False)
    check_hosts(topo, hosts=["local"])
    with pytest.raises(TopologyError, match=r"'board', key 'address': 'board.invalid' does not"):
        check_hosts(topo)
