"""When a device refits its transform-coding basis: the ``[run.codec.refit]`` table.

As the device's LoRA adapters train, the activations at the cut drift away from the ones the
basis was fitted on and the coded frames lose accuracy. The device measures the relative
reconstruction error ‖x̂ − x‖ / ‖x‖ of its own coded activations every ``check_every``
micro-batches and refits from the last ``window`` micro-batches' activations when the error
exceeds ``threshold`` × the error measured right after the last fit. Only chains with a
``project`` stage refit.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Final

from sft_actors.errors import ConfigError

#: Largest ``window`` (micro-batches of cut activations kept on the host to refit from).
MAX_WINDOW: Final[int] = 1024


@dataclass(kw_only=True, frozen=True, slots=True)
class RefitSpec:
    """Refit policy of a projecting up chain.

    ``threshold``: refit when the measured relative error exceeds ``threshold`` × the error
    right after the last fit (a number > 1, or 0 to never refit). ``check_every``: measure the
    error every N micro-batches (measuring decodes the frame once more: about one decode of
    CPU time). ``window``: how many recent micro-batches' cut activations (B, T, C) the device
    keeps, detached on the host, to refit from (memory: ``window`` × B·T·C × 4 bytes).
    Raises :class:`ConfigError` for out-of-range values.
    """

    threshold: float = 1.25
    check_every: int = 4
    window: int = 8

    def __post_init__(self) -> None:
        if not (self.threshold == 0.0 or 1.0 < self.threshold <= 1000.0):
            raise ConfigError(
                f"codec.refit.threshold must be 0 (never refit) or in (1, 1000], got {self.threshold}"
            )
        if not 1 <= self.check_every <= 1_000_000:
            raise ConfigError(f"codec.refit.check_every must be in [1, 1000000], got {self.check_every}")
        if not 1 <= self.window <= MAX_WINDOW:
            raise ConfigError(f"codec.refit.window must be in [1, {MAX_WINDOW}], got {self.window}")

    @property
    def enabled(self) -> bool:
        return self.threshold > 0.0

    @classmethod
    def parse(cls, table: Any) -> RefitSpec:
        """From a TOML/msgpack table such as ``{threshold = 1.5, check_every = 8}``.

        Raises :class:`ConfigError` for a non-table, an unknown key (with a suggestion), a value
        of the wrong type, or a value out of range."""
        if not isinstance(table, Mapping):
            raise ConfigError(f"codec.refit must be a table of parameters, got {table!r}")
        known = [f.name for f in fields(cls)]
        kwargs: dict[str, Any] = {}
        for key, value in table.items():
            if not isinstance(key, str) or key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"unknown key codec.refit.{key}{hint}; known: {sorted(known)}")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"codec.refit.{key} must be a number, got {value!r}")
            if key == "threshold":
                kwargs[key] = float(value)
            elif isinstance(value, int):
                kwargs[key] = value
            else:
                raise ConfigError(f"codec.refit.{key} must be an integer, got {value!r}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The table :meth:`parse` reads back into an equal spec."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
