"""Moving files: tar streams over ssh (and plain copies for local hosts), both ways.

Out (before the nodes start): each :class:`~sft_actors.launch.shipping.Shipment` becomes up to
three tar streams — checkout, topology, keys — each unpacked by one remote command from
:mod:`sft_actors.launch.remote`. The archives are built here with :mod:`tarfile`, so a key's
mode is set per entry (0600 for secrets) and no local ``tar`` is needed.

Back (after the nodes exit): the run directory from the coordinator's host, unpacked into
``LOGS/results/<run>`` keeping only regular files and directories inside it, never a secret
key file.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import shutil
import stat
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sft_actors.launch import remote
from sft_actors.launch.procs import LaunchError, Signals, run_command
from sft_actors.launch.shipping import Shipment, local_dir
from sft_actors.security import SECRET_SUFFIX

#: Bound on one copy (a checkout over a slow link, a run directory with checkpoints).
TRANSFER_TIMEOUT_S = 600.0


@dataclass(frozen=True, slots=True)
class Member:
    """One file of an archive: where it is here, its name there, its mode (None: its own)."""

    source: Path
    name: str
    mode: int | None = None


@dataclass(frozen=True, slots=True)
class Transfer:
    """One tar stream into a destination: the command that unpacks it, and what it holds."""

    argv: tuple[str, ...]
    what: str
    members: tuple[Member, ...]

    def describe(self) -> str:
        """The exact command, and what its stdin carries."""
        return f"{shlex.join(self.argv)}  # stdin: tar of {self.what}"


def transfers(shipment: Shipment, ssh: remote.Ssh, checkout: Path, code: Sequence[str]) -> list[Transfer]:
    """The tar streams a remote ``shipment`` takes, in order (checkout, topology, keys)."""
    target, workdir = shipment.target, shipment.workdir
    out = []
    if shipment.code:
        members = tuple(Member(checkout / f, f) for f in code)
        what = f"{len(members)} tracked files of {checkout}"
        out.append(Transfer(tuple(ssh.argv(target, remote.unpack_line(workdir))), what, members))
    if shipment.topology is not None:
        t = shipment.topology
        member = Member(t.source, t.dest, t.mode)
        what = f"{t.source} as {t.dest}"
        out.append(Transfer(tuple(ssh.argv(target, remote.topology_line(workdir))), what, (member,)))
    if shipment.keys and shipment.key_dir is not None:
        members = tuple(Member(k.source, k.dest, k.mode) for k in shipment.keys)
        secrets = [m.name for m in members if m.name.endswith(SECRET_SUFFIX)]
        what = f"{len(members) - len(secrets)} public keys, secret keys {', '.join(secrets) or 'none'}"
        line = remote.keys_line(workdir, shipment.key_dir)
        out.append(Transfer(tuple(ssh.argv(target, line)), what, members))
    return out


def archive(members: Iterable[Member]) -> bytes:
    """A tar archive of ``members``: regular files, directories made by the unpacking side,
    owner ``0:0``, the given modes (a file's own when None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            try:
                info = tar.gettarinfo(str(m.source), arcname=m.name)
            except OSError as exc:
                raise LaunchError(f"cannot read {m.source}: {exc.strerror or exc}") from None
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if m.mode is not None:
                info.mode = m.mode
            if info.isreg():
                with open(m.source, "rb") as f:
                    tar.addfile(info, f)
            elif info.issym():
                tar.addfile(info)
    return buf.getvalue()


async def send(transfer: Transfer, *, signals: Signals, timeout_s: float = TRANSFER_TIMEOUT_S) -> None:
    """Run ``transfer``'s command with its archive on stdin; :class:`LaunchError` if it fails."""
    done = await run_command(
        transfer.argv, signals=signals, stdin=archive(transfer.members), timeout_s=timeout_s
    )
    if done.returncode != 0:
        raise LaunchError(f"copying {transfer.what} failed: {done.why()}")


# --- local hosts -------------------------------------------------------------------------


def copy_local(shipment: Shipment, *, checkout: Path, code: Sequence[str], cwd: Path) -> list[str]:
    """Copy what a local ``shipment`` takes into its workdir; one line per step done."""
    dest = local_dir(shipment.workdir, cwd)
    done = []
    if shipment.code:
        for f in code:
            _copy(checkout / f, dest / f)
        done.append(f"copied {len(code)} tracked files of {checkout} to {dest}")
    if shipment.topology is not None:
        _copy(shipment.topology.source, dest / shipment.topology.dest)
        done.append(f"copied {shipment.topology.source} to {dest / shipment.topology.dest}")
    if shipment.keys and shipment.key_dir is not None:
        key_dir = dest / shipment.key_dir
        with _umask(0o077):
            key_dir.mkdir(parents=True, exist_ok=True)
            key_dir.chmod(0o700)
            for k in shipment.keys:
                _write_private(key_dir / k.dest, k.source.read_bytes(), k.mode)
        done.append(f"wrote {len(shipment.keys)} key files to {key_dir}")
    return done


def _copy(source: Path, dest: Path) -> None:
    if dest.exists() and dest.resolve() == source.resolve():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    if source.is_symlink():
        dest.unlink(missing_ok=True)
        dest.symlink_to(os.readlink(source))
    else:
        shutil.copy2(source, dest)


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` with ``mode``: created with it (never wider), narrowed if it existed."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


# --- back: the run directory -------------------------------------------------------------


def collect_argv(ssh: remote.Ssh, target: str, workdir: str, run_dir: str) -> list[str]:
    return ssh.argv(target, remote.pack_line(workdir, run_dir))


async def collect_remote(
    argv: Sequence[str], dest: Path, *, signals: Signals, timeout_s: float = TRANSFER_TIMEOUT_S
) -> int:
    """Run ``argv`` (a :func:`collect_argv`), unpack its tar stream into ``dest``; the number
    of files written."""
    done = await run_command(argv, signals=signals, timeout_s=timeout_s)
    if done.returncode != 0:
        raise LaunchError(f"collecting the run directory failed: {done.why()}")
    return extract(done.stdout, dest)


def collect_local(source: Path, dest: Path) -> int:
    """Copy the run directory ``source`` into ``dest`` (no secret key files); files copied."""
    if not source.is_dir():
        raise LaunchError(f"no run directory {source}")
    count = 0
    for path in sorted(source.rglob("*")):
        if path.is_file() and not path.is_symlink() and not path.name.endswith(SECRET_SUFFIX):
            _copy(path, dest / path.relative_to(source))
            count += 1
    return count


def extract(data: bytes, dest: Path) -> int:
    """Unpack the tar ``data`` into ``dest``: regular files and directories whose names stay
    inside it; links, devices and secret key files are skipped. Files written."""
    count = 0
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            parts = PurePosixPath(info.name).parts
            if not parts or PurePosixPath(info.name).is_absolute() or ".." in parts:
                continue
            path = dest.joinpath(*parts)
            if info.isdir():
                path.mkdir(parents=True, exist_ok=True)
            elif info.isreg() and not info.name.endswith(SECRET_SUFFIX):
                source = tar.extractfile(info)
                assert source is not None
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(source.read())
                path.chmod(stat.S_IMODE(info.mode) & 0o755 | 0o600)
                count += 1
    return count


__all__ = [
    "TRANSFER_TIMEOUT_S",
    "Member",
    "Transfer",
    "archive",
    "collect_argv",
    "collect_local",
    "collect_remote",
    "copy_local",
    "extract",
    "send",
    "transfers",
]
