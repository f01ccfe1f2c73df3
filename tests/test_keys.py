"""Keys and hostile networks: ``sft keys generate``, key files refused by ``load_keyring``,
no unauthenticated sockets off loopback, and host fields a launcher can put in a shell."""

from __future__ import annotations

import copy
import shutil
import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sft_actors.cli.main import app
from sft_actors.errors import KeyFileError, TopologyError
from sft_actors.security import generate_keys, key_paths, load_keyring
from sft_actors.topology import Topology, parse_topology, topology_warnings

pytestmark = pytest.mark.timeout(60)

TEXT = """
[run]
name = "keys"
model = "llama-tiny"

[run.train]
rounds = 1
seq_len = 16

[run.data]
options = { max_documents = 20 }

[run.security]
mode = "curve"
keys = "keys/k"

[[hosts]]
name = "edge"
address = "127.0.0.1"
ssh = "sft@edge.lan"
workdir = "~/sft_actors"

[[hosts]]
name = "board"
address = "127.0.0.1"
workdir = "/opt/sft_actors"

[[actors]]
name = "coordinator"
role = "coordinator"
host = "edge"
port = 47700

[[actors]]
name = "server"
role = "server"
host = "edge"
port = 47701

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
BASE: dict[str, Any] = tomllib.loads(TEXT)
ACTORS = ("coordinator", "server", "dev0", "dev1")


def doc(security: dict[str, Any] | None = None, **host: Any) -> dict[str, Any]:
    """BASE with ``[run.security]`` replaced and the fields of host 'edge' changed."""
    d = copy.deepcopy(BASE)
    if security is not None:
        d["run"]["security"] = security
    d["hosts"][0].update(host)
    return d


def refused(d: dict[str, Any], *fragments: str) -> str:
    with pytest.raises(TopologyError) as info:
        parse_topology(d, source="k.toml")
    msg = str(info.value)
    assert msg.startswith("k.toml: ") and "\n" not in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


def sft(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


@pytest.fixture
def topo_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The curve topology as a file in the cwd (a tmp folder: the key directory is relative)."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "k.toml"
    path.write_text(TEXT)
    return path


@pytest.fixture
def keyed() -> tuple[Topology, Path]:
    """A topology and its generated keys (in the cwd the ``topo_file`` fixture chose)."""
    topo = parse_topology(BASE, source="k.toml")
    generate_keys(topo, "keys/k")
    return topo, Path("keys/k")


# --- sft keys generate -------------------------------------------------------------------


def test_generate_writes_private_secrets_and_says_where_they_go(topo_file: Path) -> None:
    out = sft("keys", "generate", str(topo_file))
    assert out.exit_code == 0 and out.stderr == "", out.output
    d = Path("keys/k")  # default --out: [run.security] keys, from the cwd
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    lines = out.stdout.splitlines()
    assert len(lines) == len(ACTORS) + 1, lines
    for name, line in zip(ACTORS, lines, strict=False):
        public, secret = key_paths(d, name)
        assert line.split() == [name, str(public), str(secret)]
        assert stat.S_IMODE(public.stat().st_mode) == 0o644
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    hint = lines[-1]
    assert "edge (sft@edge.lan:~/sft_actors/keys/k/): coordinator.key_secret server.key_secret" in hint
    assert "board (local:/opt/sft_actors/keys/k/): dev0.key_secret dev1.key_secret" in hint
    topo = parse_topology(BASE, source="k.toml")
    assert set(load_keyring(topo, own=ACTORS).secrets) == set(ACTORS)


def test_generate_refuses_to_overwrite_without_force(topo_file: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "elsewhere"
    assert sft("keys", "generate", str(topo_file), "--out", str(out_dir)).exit_code == 0
    before = key_paths(out_dir, "server")[0].read_bytes()
    out = sft("keys", "generate", str(topo_file), "--out", str(out_dir))
    assert out.exit_code == 2 and out.stdout == "", out.output
    assert out.stderr.splitlines() == [out.stderr.strip()] and "pass --force" in out.stderr
    assert key_paths(out_dir, "server")[0].read_bytes() == before
    assert sft("keys", "generate", str(topo_file), "--out", str(out_dir), "--force").exit_code == 0
    assert key_paths(out_dir, "server")[0].read_bytes() != before


def test_generate_on_a_broken_topology_is_one_line(topo_file: Path) -> None:
    topo_file.write_text(TEXT.replace('workdir = "~/sft_actors"', 'workdir = "~/sft actors"'))
    out = sft("keys", "generate", str(topo_file))
    assert out.exit_code == 2 and out.stdout == "" and not Path("keys").exists(), out.output
    assert out.stderr.splitlines() == [out.stderr.strip()] and "key 'workdir'" in out.stderr


# --- load_keyring refuses what would let the wrong process in -------------------------------


def test_a_secret_readable_by_others_is_refused(topo_file: Path, keyed: tuple[Topology, Path]) -> None:
    topo, d = keyed
    secret = key_paths(d, "server")[1]
    secret.chmod(0o644)
    with pytest.raises(KeyFileError, match=f"chmod 600 {secret}"):
        load_keyring(topo, own=["server"])
    load_keyring(topo, own=["coordinator"])  # only the secrets this process loads are checked


def test_a_missing_public_key_is_refused(topo_file: Path, keyed: tuple[Topology, Path]) -> None:
    topo, d = keyed
    key_paths(d, "dev1")[0].unlink()
    with pytest.raises(KeyFileError, match=r"missing key file .*dev1\.key; run: sft keys generate"):
        load_keyring(topo, own=[])


def test_two_actors_with_one_key_are_refused(topo_file: Path, keyed: tuple[Topology, Path]) -> None:
    topo, d = keyed
    shutil.copyfile(key_paths(d, "dev0")[0], key_paths(d, "dev1")[0])
    with pytest.raises(KeyFileError, match="same public key as 'dev0'"):
        load_keyring(topo, own=[])


def test_a_secret_of_another_pair_is_refused(topo_file: Path, keyed: tuple[Topology, Path]) -> None:
    topo, d = keyed
    secret = key_paths(d, "dev1")[1]
    shutil.copyfile(key_paths(d, "dev0")[1], secret)
    secret.chmod(0o600)
    with pytest.raises(KeyFileError, match="does not belong to"):
        load_keyring(topo, own=["dev1"])


# --- sft topology check in curve mode ------------------------------------------------------


def test_check_prints_the_keys_line(topo_file: Path, keyed: tuple[Topology, Path]) -> None:
    _, d = keyed
    for name in ("dev0", "dev1"):  # the edge's secrets only, as on the edge host
        key_paths(d, name)[1].unlink()
    out = sft("topology", "check", str(topo_file))
    assert out.exit_code == 0 and out.stderr == "", out.output
    assert "  keys: keys/k (4 public, secret here for: coordinator, server)" in out.stdout.splitlines()


def test_check_fails_without_the_key_directory(topo_file: Path) -> None:
    out = sft("topology", "check", str(topo_file))
    assert out.exit_code == 2 and out.stdout == "", out.output
    assert out.stderr.splitlines() == [out.stderr.strip()]
    assert "key directory keys/k does not exist" in out.stderr and "sft keys generate" in out.stderr


def test_check_fails_on_a_secret_readable_by_others(topo_file: Path, keyed: tuple[Topology, Path]) -> None:
    _, d = keyed
    key_paths(d, "dev0")[1].chmod(0o640)
    out = sft("topology", "check", str(topo_file))
    assert out.exit_code == 2 and out.stdout == "" and "chmod 600" in out.stderr, out.output


# --- mode "none" stays on loopback --------------------------------------------------------


@pytest.mark.parametrize("address", ["192.168.1.10", "board.lan", "0.0.0.0", "::", "fe80::1"])
def test_mode_none_off_loopback_is_refused(address: str) -> None:
    refused(
        doc({"mode": "none"}, address=address),
        "[run.security], key 'mode'",
        f"'edge' ({address}, not loopback)",
        "anyone who can reach",
        'set mode = "curve" and run `sft keys generate k.toml --out keys`',
        "or set allow_insecure = true",
    )


def test_allow_insecure_is_accepted_with_a_warning() -> None:
    topo = parse_topology(doc({"allow_insecure": True}, address="192.168.1.10"), source="k.toml")
    (warning,) = topology_warnings(topo)
    assert warning.startswith("k.toml: [run.security], key 'allow_insecure': ")
    assert "'edge' (192.168.1.10)" in warning and "anyone who can reach the ports" in warning


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.1.1", "localhost", "LOCALHOST", "::1", "[::1]"])
def test_loopback_needs_no_keys_and_no_warning(address: str) -> None:
    topo = parse_topology(doc({"mode": "none"}, address=address), source="k.toml")
    assert topology_warnings(topo) == ()


def test_a_remote_host_without_actors_is_fine_in_mode_none() -> None:
    d = doc({"mode": "none"})
    d["hosts"].append({"name": "spare", "address": "10.0.0.9"})
    assert topology_warnings(parse_topology(d, source="k.toml")) == ()


def test_curve_off_loopback_is_accepted_silently() -> None:
    topo = parse_topology(doc(address="192.168.1.10"), source="k.toml")
    assert topo.run.security.mode == "curve" and topology_warnings(topo) == ()


# --- host fields a launcher puts into a shell ----------------------------------------------


def test_an_injected_workdir_is_refused_by_check(topo_file: Path) -> None:
    topo_file.write_text(TEXT.replace('workdir = "~/sft_actors"', 'workdir = "/x || echo INJECTED #"'))
    out = sft("topology", "check", str(topo_file))
    assert out.exit_code == 2 and out.stdout == "", out.output
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"error: {topo_file}: [[hosts]] 'edge', key 'workdir': '/x || echo INJECTED #' ")
    assert "write a plain path" in line
    out = sft("topology", "hosts", str(topo_file), "--format", "tsv")  # what the launcher reads
    assert out.exit_code == 2 and "INJECTED" not in out.stdout


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("workdir", "$(reboot)", "holds '$', '(', ')'"),
        ("workdir", "a;b", "holds ';'"),
        ("workdir", "x\ny", "holds '\\n'"),
        ("workdir", "-rf", "starts with '-'"),
        ("workdir", "~root/x", "starts with '~' but not '~/'"),
        ("workdir", "", "is empty"),
        ("ssh", "-oProxyCommand=touch /tmp/x", "not starting with '-'"),
        ("ssh", "-board", "not an ssh target"),
        ("ssh", "user@-oProxyCommand=x", "not an ssh target"),
        ("ssh", "sft@board; reboot", "not an ssh target"),
        ("ssh", "sft@", "not an ssh target"),
        ("address", "-board", "not a host name or IP address"),
        ("address", "board lan", "not a host name or IP address"),
        ("address", "", "not a host name or IP address"),
        ("address", "a[b]", "not a host name or IP address"),
        ("ssh", "sft@[board]", "not an ssh target"),
    ],
)
def test_unsafe_host_fields_are_refused(key: str, value: str, fragment: str) -> None:
    refused(doc(**{key: value}), f"[[hosts]] 'edge', key {key!r}: {value!r}", fragment)


@pytest.mark.parametrize("name", ["-edge", "ed ge", "ed;ge", ""])
def test_unsafe_host_names_are_refused(name: str) -> None:
    d = doc(name=name)
    for actor in d["actors"]:
        if actor["host"] == "edge":
            actor["host"] = name
    refused(d, "key 'name'", "use letters, digits")


@pytest.mark.parametrize(
    ("table", "key", "value"),
    [
        ("output", "dir", "runs/my run"),
        ("output", "dir", "`id`"),
        ("security", "keys", ""),
        ("security", "keys", "k*"),
    ],
)
def test_paths_sent_to_remote_hosts_are_plain(table: str, key: str, value: str) -> None:
    d = doc()
    d["run"].setdefault(table, {})[key] = value
    refused(d, f"[run.{table}], key {key!r}: {value!r}", "write a plain path")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("workdir", "~"),
        ("workdir", "."),
        ("workdir", "/srv/sft-actors_2/v1.0+git@x,y%z=w"),
        ("ssh", ""),
        ("ssh", "board-a"),
        ("ssh", "sft@192.168.1.21"),
        ("ssh", "sft@[fe80::1]"),
        ("address", "edge.lan"),
        ("address", "::1"),
        ("address", "[fe80::1]"),
        ("address", "10.0.0.1"),
    ],
)
def test_plain_host_fields_are_accepted(key: str, value: str) -> None:
    assert getattr(parse_topology(doc(**{key: value})).host("edge"), key) == value
