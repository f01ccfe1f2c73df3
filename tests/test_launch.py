"""``sft launch``: placement, quoting, shipping plans and outcomes (pure), then real launches.

The pure tests build argv and remote shell lines from hostile-looking values (a workdir of
``/x || echo INJECTED #``, quotes, ``$(…)``, a target that looks like an ssh option) and check
that the remote shell would see exactly the intended words — by parsing the line back, and by
running the node script under a real ``sh``.

The real tests start ``/usr/sbin/sshd`` on a free loopback port (its own host key, an
authorized client key, ``StrictModes no``) and reach it through an ssh config with host
aliases (``--ssh-config``). They run ``topologies/tiny.toml`` with the coordinator and the server
on an ssh host and the devices on a local host (empty ``ssh``), ``--ship checkout`` into
temporary workdirs, CURVE keys shipped per host. A thread reads the launcher's progress lines;
the tests wait, always bounded, for the lines they need (``run started``, ``round 1 done``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import getpass
import io
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from typer.testing import CliRunner

from sft_actors.cli.main import app
from sft_actors.launch import remote
from sft_actors.launch.outcome import NodeEnd, judge
from sft_actors.launch.placement import NODE_MODULE, placement, topology_destination
from sft_actors.launch.procs import Interrupted, LaunchConfigError, Signals, run_command
from sft_actors.launch.shipping import plan_shipments, shippable
from sft_actors.launch.transfer import Member, archive, extract
from sft_actors.security import generate_keys
from sft_actors.topology import HostSpec, Topology, load_topology, parse_topology
from tests.ports import free_ports

ROOT = Path(__file__).resolve().parent.parent
SSHD = Path("/usr/sbin/sshd")
WAIT_S = 90.0  # the most any single wait may take (never reached when healthy)
HOSTILE = "/x || echo INJECTED # $(touch pwned) `id`; 'q' \"dq\""


def _tiny(**hosts: dict[str, str]) -> dict[str, Any]:
    """tiny.toml as a document, its actors placed on ``hosts`` (name → HostSpec fields)."""
    import tomllib

    data = tomllib.loads((ROOT / "topologies" / "tiny.toml").read_text())
    data["hosts"] = [{"name": name, **fields} for name, fields in hosts.items()]
    return data


def _topology(data: dict[str, Any]) -> Topology:
    return parse_topology(data, source="lab.toml", model_config=lambda _spec: None, roles=())


def _words(line: str) -> list[str]:
    """The words a POSIX shell sees in ``line``, operators (``&&``, ``;``, ``|``) apart."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


# --- placement ---------------------------------------------------------------------------


def test_placement_groups_by_host_and_role_addressed_roles_first() -> None:
    data = _tiny(edge={"ssh": "sft@edge", "workdir": "~/sft_actors"}, board={"ssh": "sft@board"})
    actors = data["actors"]
    for a in actors:
        a["host"] = "board" if a["role"] == "device" else "edge"
    data["actors"] = [actors[2], actors[3], actors[1], actors[0]]  # devices listed first
    nodes = placement(_topology(data), topology="topologies/lab.toml", local_python="/usr/bin/python3")
    assert [(n.host.name, n.role, n.actors) for n in nodes] == [
        ("edge", "coordinator", ("coordinator",)),
        ("edge", "server", ("server",)),
        ("board", "device", ("dev0", "dev1")),
    ]
    assert list(nodes[2].argv) == [
        ".venv/bin/python", "-m", NODE_MODULE, "--role", "device", "--topology", "topologies/lab.toml",
        "--host", "board", "--transport", "tcp", "--log-format", "json",
    ]  # fmt: skip
    assert [n.label for n in nodes] == ["edge-coordinator", "edge-server", "board-device"]


def test_local_hosts_use_the_local_interpreter_and_threads_pass_through() -> None:
    data = _tiny(here={"ssh": ""})
    for a in data["actors"]:
        a["host"] = "here"
    nodes = placement(_topology(data), topology="t.toml", local_python="/opt/py", threads=1)
    assert {n.argv[0] for n in nodes} == {"/opt/py"}
    assert all(n.local and n.argv[-2:] == ("--threads", "1") for n in nodes)


@pytest.mark.parametrize(
    ("path", "want"),
    [
        ("topologies/lab.toml", "topologies/lab.toml"),
        ("./topologies/lab.toml", "topologies/lab.toml"),
        ("/repo/topologies/lab.toml", "topologies/lab.toml"),
        ("/elsewhere/lab.toml", ".sft/lab.toml"),
        ("../lab.toml", ".sft/lab.toml"),
        ("/elsewhere/pyproject.toml", ".sft/pyproject.toml"),  # never over the checkout's files
    ],
)
def test_topology_destination(path: str, want: str) -> None:
    assert topology_destination(path, "/repo") == want


# --- quoting -----------------------------------------------------------------------------


def test_ssh_argv_puts_the_target_after_double_dash() -> None:
    argv = remote.Ssh(config="/tmp/my config").argv("-oProxyCommand=touch /tmp/pwned", "true")
    assert argv[:3] == ["ssh", "-F", "/tmp/my config"]
    assert argv[-3:] == ["--", "-oProxyCommand=touch /tmp/pwned", "true"]


def test_remote_dir_strips_the_home_prefix() -> None:
    assert [remote.remote_dir(p) for p in ("~", "~/sft", "/abs", "rel", "~user/x")] == [
        ".", "sft", "/abs", "rel", "~user/x",
    ]  # fmt: skip


def test_transfer_lines_parse_back_to_the_intended_words() -> None:
    assert _words(remote.unpack_line(HOSTILE)) == [
        "mkdir", "-p", "--", HOSTILE, "&&", "tar", "-x", "-f", "-", "-C", HOSTILE, "--no-same-owner",
    ]  # fmt: skip
    assert _words(remote.keys_line(HOSTILE, "keys/$(id)")) == [
        "cd", "--", HOSTILE, "&&", "umask", "077", "&&", "mkdir", "-p", "--", "keys/$(id)",
        "&&", "chmod", "700", "--", "keys/$(id)", "&&", "tar", "-x", "-f", "-", "-C", "keys/$(id)",
        "--no-same-owner",
    ]  # fmt: skip
    assert _words(remote.pack_line("~/w", "runs/a b")) == [
        "cd", "--", "w", "&&", "tar", "-c", "-f", "-", "--exclude=*.key_secret", "-C", "runs/a b", ".",
    ]  # fmt: skip


def test_node_line_runs_exactly_the_intended_argv_under_sh(tmp_path: Path) -> None:
    """The line ssh would send, run by a real shell: the node gets exactly its argv, in the
    hostile workdir, and nothing is injected."""
    workdir = tmp_path / "w" / HOSTILE.lstrip("/")
    workdir.mkdir(parents=True)
    script = "import json, os, sys; print(json.dumps([os.getcwd(), sys.argv[1:]]))"
    args = ["it's", "$(touch pwned)", "`touch pwned2`", "; echo INJECTED", "a\nb", "*"]
    line = remote.node_line(str(workdir), [sys.executable, "-c", script, *args])
    assert shlex.split(line)[:2] == ["sh", "-c"]
    assert shlex.join([sys.executable, "-c", script, *args]) in shlex.split(line)[2]
    # stdin stays open, as the launcher keeps it: its end would stop the node
    with subprocess.Popen(
        line, shell=True, cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
        assert proc.wait(timeout=WAIT_S) == 0, err
    assert json.loads(out) == [str(workdir), args]  # one line: nothing else ran and printed
    assert err == ""
    assert not list(tmp_path.rglob("pwned*"))


def test_node_script_relays_lines_as_sigterm_and_end_of_input_as_sighup(tmp_path: Path) -> None:
    node = (
        "import signal, sys\n"
        "def on(sig, _):\n"
        "    print(signal.Signals(sig).name, flush=True)\n"
        "    if sig == signal.SIGHUP: sys.exit(7)\n"
        "signal.signal(signal.SIGTERM, on); signal.signal(signal.SIGHUP, on)\n"
        "print('ready', flush=True)\n"
        "while True: signal.pause()\n"
    )
    script = remote.node_script(str(tmp_path), [sys.executable, "-c", node])
    proc = subprocess.Popen(
        ["sh", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "SIGTERM\n"
        proc.stdin.close()
        assert proc.stdout.readline() == "SIGHUP\n"
        assert proc.wait(timeout=WAIT_S) == 7
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


def test_node_line_with_a_missing_workdir_exits_2(tmp_path: Path) -> None:
    line = remote.node_line(str(tmp_path / "missing"), ["true"])
    assert subprocess.run(line, shell=True, capture_output=True, timeout=WAIT_S).returncode == 2


def test_hostile_host_fields_stay_single_words_in_every_command(tmp_path: Path) -> None:
    """Values a load-time check may later refuse, set on the HostSpec directly."""
    topo = _topology(_tiny(edge={"ssh": "sft@edge"}))
    evil = HostSpec(name="edge", ssh="-oProxyCommand=sh -c 'touch /tmp/pwned'", workdir=HOSTILE)
    topo = dataclasses.replace(
        topo, hosts=(evil,), actors=tuple(dataclasses.replace(a, host="edge") for a in topo.actors)
    )
    from sft_actors.launch.nodes import node_command

    for node in placement(topo, topology="a b.toml", local_python="py"):
        argv, cwd = node_command(node, remote.Ssh(), tmp_path)
        assert cwd is None
        assert argv[-3:-1] == ["--", evil.ssh]
        sh, dash_c, script = shlex.split(argv[-1])
        assert (sh, dash_c) == ("sh", "-c")
        assert script.startswith(f"cd -- {shlex.quote(HOSTILE)} || exit 2; ")
        assert shlex.join(node.argv) in script


# --- shipping ----------------------------------------------------------------------------


def _curve(data: dict[str, Any]) -> dict[str, Any]:
    data["run"]["security"] = {"mode": "curve", "keys": "keys/lab"}
    for a in data["actors"]:
        a["host"] = "board" if a["role"] == "device" else "edge"
    return data


def test_each_host_gets_every_public_key_and_only_its_own_secret_keys(tmp_path: Path) -> None:
    topo = _topology(_curve(_tiny(edge={"ssh": "sft@edge"}, board={"ssh": "sft@board", "workdir": "/b"})))
    generate_keys(topo, tmp_path / "keys/lab")
    topo_file = tmp_path / "lab.toml"
    topo_file.write_text("")
    ships = plan_shipments(
        topo, topology_path=topo_file, topology_dest="lab.toml", ship_code=True, checkout=ROOT, cwd=tmp_path
    )  # fmt: skip
    by_host = {s.hosts: s for s in ships}
    edge, board = by_host[("edge",)], by_host[("board",)]
    assert edge.code and board.code and edge.key_dir == "keys/lab"
    secrets = {s.hosts[0]: sorted(k.dest for k in s.keys if k.mode == 0o600) for s in ships}
    assert secrets == {
        "edge": ["coordinator.key_secret", "server.key_secret"],
        "board": ["dev0.key_secret", "dev1.key_secret"],
    }
    publics = sorted(k.dest for k in board.keys if k.mode == 0o644)
    assert publics == ["coordinator.key", "dev0.key", "dev1.key", "server.key"]
    assert edge.topology is not None and edge.topology.dest == "lab.toml"


def test_a_local_host_in_this_directory_needs_no_copies(tmp_path: Path) -> None:
    topo = _topology(_curve(_tiny(edge={"ssh": ""}, board={"ssh": "", "workdir": str(tmp_path)})))
    generate_keys(topo, tmp_path / "keys/lab")
    topo_file = tmp_path / "lab.toml"
    topo_file.write_text("")
    (ship,) = plan_shipments(
        topo, topology_path=topo_file, topology_dest="lab.toml", ship_code=True, checkout=tmp_path,
        cwd=tmp_path,
    )  # fmt: skip
    assert (ship.code, ship.topology, ship.keys) == (False, None, ())


def test_a_missing_key_file_is_a_configuration_error(tmp_path: Path) -> None:
    topo = _topology(_curve(_tiny(edge={"ssh": "sft@edge"}, board={"ssh": "sft@board"})))
    with pytest.raises(
        LaunchConfigError, match=r"coordinator\.key.*sft keys generate lab\.toml --out keys/lab"
    ):
        plan_shipments(
            topo, topology_path=tmp_path / "x", topology_dest="x", ship_code=False, checkout=ROOT,
            cwd=tmp_path,
        )  # fmt: skip


def test_shippable_leaves_out_environments_outputs_and_keys() -> None:
    paths = [".venv/bin/python", "runs/x/summary.json", "keys/a.key_secret", "lab/keys/a.key",
             "sft_actors/security/keys.py", "out/tiny/summary.json", "README.md"]  # fmt: skip
    assert shippable(paths, also_excluded=["lab/keys", "out/tiny", "/abs"]) == [
        "sft_actors/security/keys.py",
        "README.md",
    ]


def test_archive_sets_each_members_mode(tmp_path: Path) -> None:
    (tmp_path / "a.key_secret").write_text("s")
    (tmp_path / "a.key").write_text("p")
    os.chmod(tmp_path / "a.key_secret", 0o644)  # the archive's mode wins
    data = archive(
        [Member(tmp_path / "a.key_secret", "a.key_secret", 0o600), Member(tmp_path / "a.key", "a.key", 0o644)]
    )
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert {m.name: (stat.S_IMODE(m.mode), m.uid) for m in tar} == {
            "a.key_secret": (0o600, 0),
            "a.key": (0o644, 0),
        }


def test_extract_keeps_only_plain_files_inside_and_never_secret_keys(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("./summary.json", "../evil", "/abs", "ckpt/x.key_secret", "ckpt/a.safetensors"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    dest = tmp_path / "out"
    assert extract(buf.getvalue(), dest) == 2
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == [
        "ckpt/a.safetensors",
        "summary.json",
    ]
    assert not (tmp_path / "evil").exists() and not (dest / "link").exists()


def test_a_signal_interrupts_a_transfer_and_its_child_ends() -> None:
    async def interrupted() -> None:
        signals = Signals()
        task = asyncio.create_task(run_command(["sleep", "600"], signals=signals, timeout_s=WAIT_S))
        await asyncio.sleep(0)  # run_command has begun: what comes now interrupts it
        signals.deliver()
        with pytest.raises(Interrupted):
            await asyncio.wait_for(task, WAIT_S)  # returns once the child has been reaped

    asyncio.run(interrupted())


def test_a_failing_transfer_is_one_launch_error_line() -> None:
    async def failing() -> None:
        done = await run_command(
            ["sh", "-c", "echo one >&2; echo two >&2; exit 3"], signals=Signals(), timeout_s=WAIT_S
        )
        assert (done.returncode, done.why()) == (3, "two")

    asyncio.run(failing())


# --- outcome -----------------------------------------------------------------------------


def _ends(coordinator: int | None, status: str | None = None, device: int = 0) -> list[NodeEnd]:
    return [
        NodeEnd(label="edge-coordinator", role="coordinator", returncode=coordinator, status=status),
        NodeEnd(label="board-device", role="device", returncode=device),
    ]


@pytest.mark.parametrize(
    ("ends", "signals", "overdue", "want"),
    [
        (_ends(0, "completed"), 0, (), ("completed", 0)),
        (_ends(0, "completed", device=1), 0, (), ("completed", 0)),  # the coordinator decides
        (_ends(130, "interrupted"), 1, (), ("interrupted", 0)),
        (_ends(143), 1, (), ("interrupted", 0)),  # stopped before it handled signals
        (_ends(130, "interrupted"), 1, ("board-device",), ("interrupted", 1)),
        (_ends(130, "interrupted"), 2, (), ("interrupted", 130)),
        (_ends(130, "interrupted"), 0, (), ("failed", 1)),  # not stopped by this launcher
        (_ends(1, "failed"), 0, (), ("failed", 1)),
        (_ends(255), 0, (), ("failed", 1)),  # ssh could not connect
        (_ends(2, "failed", device=2), 0, (), ("failed", 2)),
        (_ends(1, "failed"), 1, (), ("failed", 1)),
    ],
)
def test_judge(ends: list[NodeEnd], signals: int, overdue: tuple[str, ...], want: tuple[str, int]) -> None:
    outcome = judge(ends, signals=signals, overdue=overdue)
    assert (outcome.status, outcome.exit_code) == want


# --- the command -------------------------------------------------------------------------


def test_dry_run_prints_every_command_and_does_nothing(tmp_path: Path) -> None:
    data = _tiny(edge={"ssh": "sft@edge", "workdir": "~/sft-actors"}, board={"ssh": ""})
    lines = ["[[hosts]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in h.items()) for h in data["hosts"]]
    text = (
        (ROOT / "topologies/tiny.toml")
        .read_text()
        .replace('role = "device"\n', 'role = "device"\nhost = "board"\n')
    )
    text = text.replace('role = "coordinator"\n', 'role = "coordinator"\nhost = "edge"\n')
    text = text.replace('role = "server"\n', 'role = "server"\nhost = "edge"\n')
    (tmp_path / "lab.toml").write_text(text + "\n" + "\n".join(lines))
    logs = tmp_path / "logs"
    with _cwd(tmp_path):
        out = CliRunner().invoke(
            app, ["launch", "lab.toml", "--dry-run", "--ship", "checkout", "--logs", str(logs)]
        )
    assert out.exit_code == 0, out.output
    cmds = [shlex.split(line, comments=True) for line in out.stdout.splitlines() if line.startswith("ssh ")]
    unpack, topology, coordinator, server, collect = cmds
    assert unpack[-2:] == ["sft@edge", remote.unpack_line("~/sft-actors")]
    assert unpack[-1] == "mkdir -p -- sft-actors && tar -x -f - -C sft-actors --no-same-owner"
    assert topology[-1] == remote.topology_line("~/sft-actors")
    assert coordinator[-1] == remote.node_line(
        "~/sft-actors", [".venv/bin/python", *_node_args("coordinator", "edge")]
    )
    assert server[-1].endswith(
        shlex.quote(remote.node_script("~/sft-actors", [".venv/bin/python", *_node_args("server", "edge")]))
    )
    assert collect[-1] == remote.pack_line("~/sft-actors", "runs/tiny/RUN")
    local = [line for line in out.stdout.splitlines() if f"# cwd {tmp_path.resolve()}," in line]
    assert len(local) == 1 and shlex.join([sys.executable, *_node_args("device", "board")]) in local[0]
    assert not logs.exists()


def _node_args(role: str, host: str) -> list[str]:
    return ["-m", NODE_MODULE, "--role", role, "--topology", "lab.toml", "--host", host, "--transport", "tcp",
            "--log-format", "json"]  # fmt: skip


def test_a_bad_topology_is_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text((ROOT / "topologies/tiny.toml").read_text().replace("cut = 2", "cutt = 2"))
    out = CliRunner().invoke(app, ["launch", str(bad), "--logs", str(tmp_path / "logs")])
    assert out.exit_code == 2
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1
    assert not (tmp_path / "logs").exists()


def test_an_unknown_backend_is_a_usage_error(tmp_path: Path) -> None:
    out = CliRunner().invoke(app, ["launch", str(ROOT / "topologies/tiny.toml"), "--backend", "k8s"])
    assert out.exit_code == 2


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


# --- real launches over a real sshd on loopback --------------------------------------------


class Lines:
    """A stream's lines as a thread reads them; :meth:`wait_for` blocks (bounded) on one."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def wait_until(self, predicate: Callable[[str], bool], timeout_s: float) -> bool:
        """Whether ``predicate(everything read so far)`` held within ``timeout_s``."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate("".join(self.lines)), timeout_s)

    def wait_for(self, text: str, timeout_s: float = WAIT_S) -> str:
        with self._changed:
            found = self._changed.wait_for(
                lambda: next((x for x in self.lines if text in x), None), timeout_s
            )
        if found is None:
            pytest.fail(f"no line with {text!r} within {timeout_s}s; got:\n{self.text()}")
        return found

    def join(self, timeout_s: float = WAIT_S) -> None:
        self._thread.join(timeout_s)

    def text(self) -> str:
        with self._changed:
            return "".join(self.lines)


@dataclasses.dataclass
class Sshd:
    config: Path  # the client's ssh config: aliases launch-edge and launch-board
    user: str


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """sshd on a free loopback port, its own host key, one authorized client key."""
    if not SSHD.exists() or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip(
            f"{SSHD} or ssh is missing: as root run apt-get install openssh-server (bin/_setup.sh does)"
        )
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    user, (port,) = getpass.getuser(), free_ports(1)
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile none\nUsePAM no\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nStrictModes no\nAllowUsers {user}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
    )
    kind, host_key = (d / "host_key.pub").read_text().split()[:2]
    (d / "known_hosts").write_text(f"sft-launch-test {kind} {host_key}\n")
    (d / "ssh_config").write_text(
        f"Host launch-edge launch-board\n  HostName 127.0.0.1\n  Port {port}\n"
        f"  IdentityFile {d / 'client_key'}\n"
        f"  IdentitiesOnly yes\n  HostKeyAlias sft-launch-test\n  UserKnownHostsFile {d / 'known_hosts'}\n"
        "  StrictHostKeyChecking yes\n"
        f"Host launch-closed\n  HostName 127.0.0.1\n  Port {free_ports(1)[0]}\n"  # nobody listens
    )
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    proc = subprocess.Popen(
        [str(SSHD), "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.PIPE, text=True
    )  # fmt: skip
    assert proc.stderr is not None
    log = Lines(proc.stderr)
    try:
        up = log.wait_until(lambda text: "Server listening" in text or proc.poll() is not None, 30)
        if not up or proc.poll() is not None:
            if os.geteuid() != 0:
                pytest.skip(f"sshd does not start as {user}: {log.text()}")
            pytest.fail(f"sshd did not start: {log.text()}")
        yield Sshd(config=d / "ssh_config", user=user)
    finally:
        proc.terminate()
        proc.wait(timeout=WAIT_S)
        proc.stderr.close()


def _launch_topology(tmp_path: Path, sshd: Sshd, *, rounds: int) -> Path:
    """tiny.toml: coordinator and server on the ssh host ``edge``, the devices on the local host
    ``board``, each with its own workdir under ``tmp_path``; CURVE keys in ``tmp_path/keys``."""
    text = (ROOT / "topologies" / "tiny.toml").read_text().replace("rounds = 2\n", f"rounds = {rounds}\n", 1)
    coordinator, server = free_ports(2)
    text = text.replace("port = 47310", f"port = {coordinator}").replace("port = 47311", f"port = {server}")
    for role, host in (("coordinator", "edge"), ("server", "edge"), ("device", "board")):
        text = text.replace(f'role = "{role}"\n', f'role = "{role}"\nhost = "{host}"\n')
    text = text.replace("[run.output]", '[run.security]\nmode = "curve"\nkeys = "keys"\n\n[run.output]')
    for name, ssh in (("edge", f"{sshd.user}@launch-edge"), ("board", "")):
        workdir = tmp_path / name
        text += f'\n[[hosts]]\nname = "{name}"\naddress = "127.0.0.1"\nssh = "{ssh}"\nworkdir = "{workdir}"\n'
    path = tmp_path / "launch.toml"
    path.write_text(text)
    generate_keys(load_topology(path, roles=()), tmp_path / "keys")
    return path


class Launcher:
    """``sft launch`` as a process, its progress lines read as they come."""

    def __init__(self, tmp_path: Path, sshd: Sshd, topology: Path) -> None:
        self.logs = tmp_path / "logs"
        cmd = [sys.executable, "-m", "sft_actors.cli.main", "launch", topology.name, "--backend", "ssh"]
        cmd += ["--ship", "checkout", "--ssh-config", str(sshd.config), "--python", sys.executable]
        cmd += ["--logs", str(self.logs), "--threads", "1"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )  # fmt: skip
        assert self.proc.stderr is not None
        self.progress = Lines(self.proc.stderr)

    def finish(self, timeout_s: float = WAIT_S) -> tuple[int, dict[str, Any]]:
        """The launcher's exit code and its JSON line."""
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launcher did not end within {timeout_s}s:\n{self.progress.text()}")
        self.progress.join()
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        assert out.count("\n") == 1, f"stdout: {out!r}\nstderr:\n{self.progress.text()}"
        return code, json.loads(out)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _processes_in(directory: Path) -> list[int]:
    """Live processes whose working directory is under ``directory`` (this test's nodes and
    the remote shells running them)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if Path(os.readlink(entry / "cwd")).is_relative_to(directory):
                    pids.append(int(entry.name))
    return pids


@pytest.fixture
def launcher(tmp_path: Path, sshd: Sshd) -> Iterator[Callable[[int], Launcher]]:
    made: list[Launcher] = []

    def make(rounds: int) -> Launcher:
        made.append(Launcher(tmp_path, sshd, _launch_topology(tmp_path, sshd, rounds=rounds)))
        return made[-1]

    yield make
    for launched in made:
        launched.close()
    for pid in _processes_in(tmp_path):  # only what this test started; it has already failed
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _secret_keys(directory: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.glob("*.key_secret")}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_launch_over_ssh_completes_and_collects_the_run(
    tmp_path: Path, launcher: Callable[[int], Launcher]
) -> None:
    launched = launcher(2)
    code, line = launched.finish()
    assert (code, line["status"], line["ok"]) == (0, "completed", True), launched.progress.text()
    assert line["nodes"] == {"edge-coordinator": 0, "edge-server": 0, "board-device": 0}
    for label in line["nodes"]:
        assert (launched.logs / f"{label}.log").stat().st_size > 0
    (summary,) = (launched.logs / "results").rglob("summary.json")
    assert json.loads(summary.read_text())["status"] == "completed"
    assert not list(launched.logs.rglob("*.key_secret"))
    # each workdir got the checkout, the topology and only its own actors' secret keys
    edge, board = tmp_path / "edge", tmp_path / "board"
    assert (edge / "sft_actors/node_process.py").is_file() and (board / "launch.toml").is_file()
    assert not (edge / ".venv").exists()
    assert _secret_keys(edge / "keys") == {"coordinator.key_secret": 0o600, "server.key_secret": 0o600}
    assert _secret_keys(board / "keys") == {"dev0.key_secret": 0o600, "dev1.key_secret": 0o600}
    assert (
        stat.S_IMODE((edge / "keys").stat().st_mode) == stat.S_IMODE((board / "keys").stat().st_mode) == 0o700
    )
    assert len(list((edge / "keys").glob("*.key"))) == 4
    assert _processes_in(tmp_path) == []


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_one_sigint_stops_every_node_politely_and_exits_0(
    tmp_path: Path, launcher: Callable[[int], Launcher]
) -> None:
    launched = launcher(10_000)
    launched.progress.wait_for("round 1 done")
    launched.proc.send_signal(signal.SIGINT)
    code, line = launched.finish()
    assert (code, line["status"]) == (0, "interrupted"), launched.progress.text()
    assert set(line["nodes"]) == {"edge-coordinator", "edge-server", "board-device"}
    assert set(line["nodes"].values()) <= {0, 130}, line  # each stopped itself, none was killed
    assert "stopping 3 node(s) politely" in launched.progress.text()
    assert "not a child" not in launched.progress.text()
    (summary,) = (launched.logs / "results").rglob("summary.json")
    assert json.loads(summary.read_text())["status"] == "interrupted"
    assert _processes_in(tmp_path) == []


@pytest.mark.timeout(120)
def test_an_unreachable_host_fails_the_launch_before_any_node_starts(tmp_path: Path, sshd: Sshd) -> None:
    topology = _launch_topology(tmp_path, sshd, rounds=2)
    topology.write_text(topology.read_text().replace("@launch-edge", "@launch-closed"))
    launched = Launcher(tmp_path, sshd, topology)
    try:
        code, line = launched.finish()
    finally:
        launched.close()
    assert (code, line["status"], line["nodes"]) == (1, "failed", {}), launched.progress.text()
    assert "copying" in line["reason"] and "refused" in line["reason"]
    assert " on edge (" not in launched.progress.text()  # no node was started
    assert _processes_in(tmp_path) == []
