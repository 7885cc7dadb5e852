"""Which records may be sent now: order groups and the bound on requests under way.

Plain data, no Twisted. Every record belongs to an *order group* (its partition, its
partition and key, its partition and entity, or none at all): records of one group go
one at a time, in the order they were added; records of different groups, and records
without a group, go side by side, up to ``max_in_flight`` at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["Scheduler"]

U = TypeVar("U")
_NO_GROUP = object()


class Scheduler(Generic[U]):
    """Queues units by order group and hands out the ones that may start."""

    def __init__(self, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self._groups: dict[Hashable, deque[U]] = {}
        self._busy: set[Hashable] = set()
        #: Groups whose head may start, and ungrouped units, in the order they became ready.
        self._ready: deque[tuple[Hashable, U | None]] = deque()
        self.in_flight = 0

    def add(self, group: Hashable | None, unit: U) -> None:
        """Queue ``unit`` behind the earlier units of ``group`` (None: no group)."""
        if group is None:
            self._ready.append((_NO_GROUP, unit))
            return
        units = self._groups.get(group)
        if units is None:
            units = self._groups[group] = deque()
            if group not in self._busy:
                self._ready.append((group, None))
        units.append(unit)

    def take(self) -> tuple[Hashable | None, U] | None:
        """The next unit that may start, with its group; None if none may now."""
        while self._ready and self.in_flight < self.max_in_flight:
            group, unit = self._ready.popleft()
            if group is _NO_GROUP:
                assert unit is not None
                self.in_flight += 1
                return None, unit
            units = self._groups.get(group)
            if not units or group in self._busy:  # dropped meanwhile, or a stale duplicate entry
                continue
            head = units.popleft()
            if not units:
                del self._groups[group]
            self._busy.add(group)
            self.in_flight += 1
            return group, head
        return None

    def done(self, group: Hashable | None) -> None:
        """The unit taken for ``group`` has ended: the group's next unit may start."""
        self.in_flight -= 1
        if group is None:
            return
        self._busy.discard(group)
        if self._groups.get(group):
            self._ready.append((group, None))

    def drop(self, which: Callable[[U], bool]) -> list[U]:
        """Remove the queued units for which ``which`` is true; they are returned."""
        dropped: list[U] = []
        for group in list(self._groups):
            units = self._groups[group]
            kept = deque(u for u in units if not which(u))
            if len(kept) != len(units):
                dropped.extend(u for u in units if which(u))
                if kept:
                    self._groups[group] = kept
                else:
                    del self._groups[group]
        ready: deque[tuple[Hashable, U | None]] = deque()
        for group, unit in self._ready:
            if group is _NO_GROUP and unit is not None and which(unit):
                dropped.append(unit)
            else:
                ready.append((group, unit))
        self._ready = ready
        return dropped
