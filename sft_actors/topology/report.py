"""The one shape of a topology error: ``FILE: WHERE, key 'K': FIX``, on one line."""

from __future__ import annotations

import typing
from pathlib import Path

from sft_actors.errors import TopologyError


class Reporter:
    """Raises :class:`TopologyError` lines for one topology ``source`` (a path or ``<test>``)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def message(self, where: str, key: str | None, fix: str) -> str:
        """``FILE: WHERE, key 'K': FIX`` with any line break folded: the CLI prints one line."""
        at = f"{where}, key {key!r}" if key else where
        return " ".join(f"{self.source}: {at}: {fix}".splitlines())

    def fail(self, where: str, key: str | None, fix: str) -> typing.NoReturn:
        """Raise :class:`TopologyError` naming table ``where``, ``key`` and the ``fix``."""
        raise TopologyError(self.message(where, key, fix))


def read_error(path: Path, exc: OSError | UnicodeDecodeError) -> TopologyError:
    """One line for a topology file that cannot be read as text (missing, a folder, binary)."""
    if isinstance(exc, UnicodeDecodeError):
        return TopologyError(
            f"{path}: not a UTF-8 text file (byte {exc.start} is {exc.object[exc.start : exc.start + 1]!r}); "
            "a topology is a TOML text file: check the path"
        )
    why = exc.strerror or type(exc).__name__
    return TopologyError(f"{path}: cannot read the topology file ({why}); check the path")
