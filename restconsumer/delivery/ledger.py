"""The partition ledger: which fetched messages are unfinished, and what may be committed.

Plain data, no Twisted. The Kafka loop's rebalance callbacks and the job's delivery share
it (on the reactor thread): partitions are assigned and revoked, messages are *fetched*
and later *finished* (delivered or dead-lettered and acknowledged), in any order. The
offset that may be committed for a partition is its lowest unfinished offset, or the one
after the last fetched message when none is unfinished; it never passes an unfinished
message.

Every assignment of a partition gets a new epoch: a message fetched under an earlier
assignment carries its epoch in its :class:`Ticket`, and finishing it then changes
nothing (the partition was committed when it was revoked, and another consumer may have
it now).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from restconsumer.base.types import TP

__all__ = ["Ledger", "Ticket"]


@dataclass(slots=True)
class Ticket:
    """One fetched message: its partition, the assignment it was fetched under, its offset."""

    tp: TP
    epoch: int
    offset: int


@dataclass(slots=True)
class _Partition:
    epoch: int
    #: Fetched offsets, oldest first, up to the last one not yet known finished in order.
    fetched: deque[int] = field(default_factory=deque)
    #: Finished offsets still behind an unfinished one.
    finished: set[int] = field(default_factory=set)
    last: int | None = None


class Ledger:
    """Every assigned partition's fetched-but-unfinished messages."""

    def __init__(self) -> None:
        self._partitions: dict[TP, _Partition] = {}
        self._epochs = itertools.count(1)
        self._due: dict[TP, int] = {}

    def assign(self, tp: TP) -> int:
        """``tp`` is ours (again): a new epoch, nothing fetched yet."""
        epoch = next(self._epochs)
        self._partitions[tp] = _Partition(epoch)
        self._due.pop(tp, None)
        return epoch

    def revoke(self, tp: TP) -> int | None:
        """Forget ``tp``; the offset to commit for it (None when nothing was fetched)."""
        point = self.commit_point(tp)
        self._partitions.pop(tp, None)
        self._due.pop(tp, None)
        return point

    def assigned(self, tp: TP) -> bool:
        """Whether ``tp`` is assigned."""
        return tp in self._partitions

    def partitions(self) -> list[TP]:
        """The assigned partitions."""
        return list(self._partitions)

    def fetched(self, tp: TP, offset: int) -> Ticket | None:
        """A message arrived; its ticket, or None if it must be dropped.

        Dropped: a partition not assigned (revoked while the message was on its way), or an
        offset at or before one already fetched in this assignment (never delivered twice
        by one consumer). This relies on librdkafka (since 1.9) leaving out of a
        ``consume()`` batch the messages fetched under an assignment revoked during that
        call, so a new assignment's first message is never an older one's.
        """
        partition = self._partitions.get(tp)
        if partition is None or (partition.last is not None and offset <= partition.last):
            return None
        partition.last = offset
        partition.fetched.append(offset)
        return Ticket(tp, partition.epoch, offset)

    def finished(self, ticket: Ticket) -> bool:
        """The message of ``ticket`` is done; False if its assignment is over (ignored)."""
        partition = self._partitions.get(ticket.tp)
        if partition is None or partition.epoch != ticket.epoch:
            return False
        fetched = partition.fetched
        if not fetched or ticket.offset < fetched[0]:
            return True  # finished before
        if fetched[0] == ticket.offset:
            fetched.popleft()
            done = partition.finished
            while fetched and fetched[0] in done:
                done.discard(fetched.popleft())
            point = self.commit_point(ticket.tp)
            if point is not None:
                self._due[ticket.tp] = point
        else:
            partition.finished.add(ticket.offset)
        return True

    def current(self, ticket: Ticket) -> bool:
        """Whether ``ticket`` belongs to the partition's present assignment."""
        partition = self._partitions.get(ticket.tp)
        return partition is not None and partition.epoch == ticket.epoch

    def commit_point(self, tp: TP) -> int | None:
        """The offset that may be committed: the lowest unfinished, else the next to fetch."""
        partition = self._partitions.get(tp)
        if partition is None:
            return None
        if partition.fetched:
            return partition.fetched[0]
        return None if partition.last is None else partition.last + 1

    def take_due(self) -> dict[TP, int]:
        """Commit points that moved since the last call."""
        due, self._due = self._due, {}
        return due

    def unfinished(self, tp: TP) -> int:
        """How many messages of ``tp`` are fetched and not finished."""
        partition = self._partitions.get(tp)
        return 0 if partition is None else len(partition.fetched) - len(partition.finished)

    def window(self, tp: TP) -> int:
        """How far the last fetched message is past the lowest unfinished one (0 if none)."""
        partition = self._partitions.get(tp)
        if partition is None or not partition.fetched or partition.last is None:
            return 0
        return partition.last - partition.fetched[0] + 1
