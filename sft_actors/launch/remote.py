"""Commands for another machine, as argument lists: ssh's argv and the one shell line it sends.

ssh joins its arguments with spaces into one line that the remote user's login shell parses,
so every value that comes from the topology or the command line (workdir, paths, the node's
argv) goes through :func:`shlex.quote` here, and the only unquoted words are the operators and
commands written below. A workdir of ``/x || echo INJECTED #`` is a directory name, never a
command. The target follows ``--``, so a target that starts with ``-`` is a host name, not an
ssh option.

Pure: nothing here runs anything (``transfer`` and ``nodes`` do).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from sft_actors.security import SECRET_SUFFIX

#: Written into a node's ssh session, each line is one SIGTERM to the node (see
#: :func:`node_line`); closing the session's stdin is a SIGHUP.
STOP_LINE = b"\n"


@dataclass(frozen=True, kw_only=True, slots=True)
class Ssh:
    """How to reach the hosts: the ``ssh`` program and an optional config file (``ssh -F``),
    where ports, identities and host aliases live (the topology's ``ssh`` is ``user@host``)."""

    program: str = "ssh"
    config: str | None = None

    def argv(self, target: str, line: str) -> list[str]:
        """``ssh … -T -- TARGET LINE``: no pseudo-terminal, so stdin and stdout carry bytes
        untouched (tar streams, the stop lines of :func:`node_line`); no password prompt."""
        argv = [self.program]
        if self.config is not None:
            argv += ["-F", self.config]
        argv += ["-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-T", "--", target, line]
        return argv


def remote_dir(path: str) -> str:
    """``path`` as the remote shell should see it: ssh starts in the home directory, so
    ``~/x`` is ``x`` and ``~`` is ``.``; anything else is taken literally (``~user`` is not
    expanded: it is quoted like every other value)."""
    if path == "~":
        return "."
    if path.startswith("~/"):
        return path[2:].lstrip("/") or "."
    return path


def _and(*commands: Sequence[str]) -> str:
    """Commands joined with ``&&``, every word quoted."""
    return " && ".join(shlex.join(c) for c in commands)


def node_line(workdir: str, argv: Sequence[str]) -> str:
    """``sh -c SCRIPT``: :func:`node_script` run by ``sh`` whatever the login shell is."""
    return shlex.join(["sh", "-c", node_script(workdir, argv)])


def node_script(workdir: str, argv: Sequence[str]) -> str:
    """Run ``argv`` in ``workdir`` and relay stops to it (POSIX sh: dash, bash, busybox).

    The node runs in the background with stdin from /dev/null; the shell reads its own stdin
    (the ssh session's): every line read is one SIGTERM to the node (the first begins its
    polite stop, a second forces it), and end of input — the launcher closed it, or the
    connection dropped — is a SIGHUP. The shell exits with the node's exit code (2 when
    ``workdir`` is missing). A stop sent before the node started waits in the pipe, so none
    is lost. (Not SIGINT: a background job of a non-interactive shell ignores it.)
    """
    program, *args = argv
    if program.startswith("-"):  # would read as an option: make it a path
        program = f"./{program}"
    node = shlex.join([program, *args])
    return (
        f"cd -- {shlex.quote(remote_dir(workdir))} || exit 2; exec 3<&0; "
        f"{node} </dev/null 3<&- & node=$!; "
        '{ while read -r _ <&3; do kill -TERM "$node"; done; kill -HUP "$node"; } 2>/dev/null & '
        'relay=$!; wait "$node"; code=$?; kill "$relay" 2>/dev/null; exit "$code"'
    )


def unpack_line(workdir: str) -> str:
    """Create ``workdir`` and unpack the tar stream on stdin into it (the checkout)."""
    w = remote_dir(workdir)
    return _and(["mkdir", "-p", "--", w], ["tar", "-x", "-f", "-", "-C", w, "--no-same-owner"])


def topology_line(workdir: str) -> str:
    """Unpack the tar stream on stdin (the topology file) in ``workdir``, which must exist."""
    return _and(["cd", "--", remote_dir(workdir)], ["tar", "-x", "-f", "-", "--no-same-owner"])


def keys_line(workdir: str, key_dir: str) -> str:
    """Unpack the tar stream on stdin (key files) into ``key_dir`` under ``workdir``, created
    0700 under ``umask 077``: a secret key is never readable by others, not even while it is
    written (its tar entry is 0600)."""
    k = remote_dir(key_dir)
    return _and(
        ["cd", "--", remote_dir(workdir)],
        ["umask", "077"],
        ["mkdir", "-p", "--", k],
        ["chmod", "700", "--", k],
        ["tar", "-x", "-f", "-", "-C", k, "--no-same-owner"],
    )


def pack_line(workdir: str, run_dir: str) -> str:
    """Write ``run_dir`` (relative to ``workdir``) as a tar stream on stdout, without any
    secret key file."""
    return _and(
        ["cd", "--", remote_dir(workdir)],
        ["tar", "-c", "-f", "-", f"--exclude=*{SECRET_SUFFIX}", "-C", remote_dir(run_dir), "."],
    )


__all__ = [
    "STOP_LINE",
    "Ssh",
    "keys_line",
    "node_line",
    "node_script",
    "pack_line",
    "remote_dir",
    "topology_line",
    "unpack_line",
]
