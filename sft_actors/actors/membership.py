"""Which devices take part in the next round: the coordinator's bookkeeping of an elastic run.

A device is in one of three states:

- ``active``: planned and in step with the run; it takes part in the next round;
- ``pending``: connected but not in step — it joined late, came back after being lost, or
  missed a round's deadline (a straggler). It is re-admitted between rounds (its plan, its
  last checkpointed state, the current averaged adapters) and is active from the next round;
- ``lost``: its link is gone (silent past ``heartbeat_timeout_s``, disconnected, or BYE).

A round closes with the devices that finished it; the quorum (``[run.train] min_devices``) is
the fewest active devices a round may start with. Transitions are logged by the coordinator;
this class only keeps the sets and the history (which device was lost in which round, why).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

DeviceStatus = Literal["active", "pending", "lost"]


@dataclass(kw_only=True, slots=True)
class Membership:
    devices: Sequence[str]  # every device of the topology, in topology order
    quorum: int
    status: dict[str, DeviceStatus] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for d in self.devices:
            self.status.setdefault(d, "lost")  # nobody has joined yet

    def _in(self, state: DeviceStatus) -> list[str]:
        return [d for d in self.devices if self.status[d] == state]

    @property
    def active(self) -> list[str]:
        """Devices that take part in the next round, in topology order."""
        return self._in("active")

    @property
    def pending(self) -> list[str]:
        return self._in("pending")

    @property
    def lost(self) -> list[str]:
        return self._in("lost")

    @property
    def has_quorum(self) -> bool:
        return len(self.active) >= self.quorum

    def joined(self, device: str) -> None:
        """``device`` connected (first time, restarted, or back after a pause): admit it."""
        self.status[device] = "pending"

    def link_lost(self, device: str) -> None:
        self.status[device] = "lost"

    def dropped(self, devices: Iterable[str]) -> None:
        """Devices that did not finish a round: still connected ones are re-admitted later."""
        for d in devices:
            if self.status[d] == "active":
                self.status[d] = "pending"

    def admitted(self, device: str) -> None:
        """``device`` received its plan and state: active from the next round (unless it was
        lost while being admitted)."""
        if self.status[device] == "pending":
            self.status[device] = "active"

    def resync_all(self) -> None:
        """After a rollback every connected device must be restored: all active → pending."""
        self.dropped(self.active)

    def describe(self) -> dict[str, list[str]]:
        return {"active": self.active, "pending": self.pending, "lost": self.lost}
