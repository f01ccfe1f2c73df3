"""Process-wide sharing of expensive, read-only objects between in-process actors.

Hundreds of simulated devices in one process must share one copy of the frozen base weights
(and of a tokenized dataset); each keeps only its own LoRA adapters. Values are built once per
key under a per-key lock, so concurrent actors that ask for the same model wait for one load.
Only immutable things belong here: frozen models, datasets, partitions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any


class SharedCache:
    def __init__(self) -> None:
        self._values: dict[Hashable, Any] = {}
        self._locks: dict[Hashable, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        with self._guard:
            if key in self._values:
                return self._values[key]
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            with self._guard:
                if key in self._values:
                    return self._values[key]
            value = make()
            with self._guard:
                self._values[key] = value
            return value

    def clear(self) -> None:
        with self._guard:
            self._values.clear()
            self._locks.clear()


#: The one cache of this process (per process by design: processes cannot share tensors).
SHARED = SharedCache()
