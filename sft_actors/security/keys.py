"""CURVE key pairs, one per actor, in the ZeroMQ certificate format (``zmq.auth``).

A key directory holds ``<actor>.key`` (the public key) and ``<actor>.key_secret`` (public and
secret key, mode 0600) for every actor of a topology. Every node reads every actor's public
key (to know who may connect, and whom it dials); a node needs only the secret keys of the
actors it runs, so a launcher ships each host its own. Keys are Curve25519 (CurveZMQ, RFC 26),
40-character Z85 text; files are read and written by :mod:`zmq.auth.certs`.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import zmq.auth

from sft_actors.errors import KeyFileError
from sft_actors.topology import Topology

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
_Z85_KEY_CHARS = 40


def key_paths(directory: str | Path, actor: str) -> tuple[Path, Path]:
    """(public, secret) key file of ``actor`` in ``directory``."""
    d = Path(directory)
    return d / f"{actor}{PUBLIC_SUFFIX}", d / f"{actor}{SECRET_SUFFIX}"


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The keys one process holds: every actor's public key, its own actors' secret keys.

    Keys are Z85 ``bytes`` (40 characters), as ``zmq.CURVE_*KEY`` socket options take them.
    """

    directory: Path
    publics: Mapping[str, bytes]
    secrets: Mapping[str, bytes]

    def public(self, actor: str) -> bytes:
        try:
            return self.publics[actor]
        except KeyError:
            raise KeyFileError(f"no public key for {actor!r} in {self.directory}") from None

    def secret(self, actor: str) -> bytes:
        """``actor``'s secret key; :class:`KeyFileError` if this process was not given it."""
        try:
            return self.secrets[actor]
        except KeyError:
            _, path = key_paths(self.directory, actor)
            raise KeyFileError(f"no secret key for {actor!r}: {path} was not loaded") from None

    def actor_for(self, public: bytes) -> str | None:
        """The actor whose public key is ``public`` (Z85), or None for a stranger."""
        return self._by_public.get(public)

    @property
    def _by_public(self) -> dict[bytes, str]:
        return {key: name for name, key in self.publics.items()}


def load_keyring(topology: Topology, own: Iterable[str], directory: str | Path | None = None) -> KeyRing:
    """Read every actor's public key and the secret keys of ``own`` actors.

    ``directory`` defaults to ``[run.security] keys``. Raises :class:`KeyFileError` naming the
    file and the fix when a key is missing or malformed, when a secret key file can be read by
    group or others (chmod 600), when a secret file's public half differs from ``<actor>.key``,
    or when two actors share a public key (their identities could not be told apart).
    """
    d = Path(directory if directory is not None else topology.run.security.keys)
    fix = f"run: sft keys generate {topology.source} --out {d}"
    if not d.is_dir():
        raise KeyFileError(f"key directory {d} does not exist (cwd {Path.cwd()}); {fix}")
    # Whoever may write the public keys decides who is let in as which actor.
    check_not_writable_by_others(d)
    publics: dict[str, bytes] = {}
    owners: dict[bytes, str] = {}
    for actor in topology.actors:
        path, _ = key_paths(d, actor.name)
        check_not_writable_by_others(path)
        public, _ = _read(path, fix)
        if public in owners:
            raise KeyFileError(
                f"{path} holds the same public key as {owners[public]!r}; every actor needs its own "
                f"key pair ({fix})"
            )
        owners[public] = actor.name
        publics[actor.name] = public
    secrets: dict[str, bytes] = {}
    for name in own:
        _, path = key_paths(d, name)
        check_secret_mode(path)
        public, secret = _read(path, fix)
        if secret is None:
            raise KeyFileError(f"{path} holds no secret-key; {fix}")
        if public != publics[name]:
            raise KeyFileError(f"{path} does not belong to {path.with_suffix(PUBLIC_SUFFIX)}; {fix}")
        secrets[name] = secret
    return KeyRing(directory=d, publics=publics, secrets=secrets)


def check_secret_mode(path: Path) -> None:
    """:class:`KeyFileError` unless ``path`` exists and only its owner may read it."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise KeyFileError(
            f"cannot read secret key {path}: {exc.strerror}; copy it from where it was generated"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"secret key {path} is readable by others (mode {stat.S_IMODE(mode):o}); run: chmod 600 {path}"
        )


def check_not_writable_by_others(path: Path) -> None:
    """:class:`KeyFileError` if group or others may write ``path`` (they could swap a public key)."""
    with contextlib.suppress(OSError):  # a missing file is reported where it is read
        mode = path.stat().st_mode
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise KeyFileError(
                f"{path} is writable by others (mode {stat.S_IMODE(mode):o}): anyone who can write it "
                f"chooses who joins as which actor; run: chmod go-w {path}"
            )


def _read(path: Path, fix: str) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise KeyFileError(f"missing key file {path}; {fix}")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{path} is not a ZeroMQ certificate ({exc}); {fix}") from None
    for what, key in (("public-key", public), ("secret-key", secret)):
        if key is not None and len(key) != _Z85_KEY_CHARS:
            raise KeyFileError(f"{path}: {what} is not a 40-character Z85 key; {fix}")
    return public, secret


def generate_keys(topology: Topology, out: str | Path, *, force: bool = False) -> list[Path]:
    """Write a fresh key pair for every actor of ``topology`` into ``out`` (created 0700).

    Secret files are created 0600 (the umask is tightened while they are written, so they are
    never readable by others). Raises :class:`KeyFileError` if a pair already exists and
    ``force`` is false: replacing keys locks out every host that still has the old ones.
    Returns the files written.
    """
    d = Path(out)
    existing = [p for a in topology.actors for p in key_paths(d, a.name) if p.exists()]
    if existing and not force:
        raise KeyFileError(
            f"{existing[0]} already exists; pass --force to replace every key in {d} "
            "(hosts holding the old keys will be refused)"
        )
    written: list[Path] = []
    with _private_umask():
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        for actor in topology.actors:
            for path in key_paths(d, actor.name):
                path.unlink(missing_ok=True)
            public, secret = zmq.auth.create_certificates(d, actor.name)
            os.chmod(public, 0o644)
            os.chmod(secret, 0o600)
            written += [Path(public), Path(secret)]
    return written


@contextlib.contextmanager
def _private_umask() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


__all__ = [
    "PUBLIC_SUFFIX",
    "SECRET_SUFFIX",
    "KeyRing",
    "check_secret_mode",
    "generate_keys",
    "key_paths",
    "load_keyring",
]
