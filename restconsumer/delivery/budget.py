"""The process's byte budget for messages fetched but not finished (SPEC §5 "Bounded memory").

Plain data, no Twisted, used on the reactor thread. Each job *reserves* what its
librdkafka consumer may pre-fetch and *charges* what it holds (decoded messages, dead
letters awaiting Kafka's acknowledgement). A job is over when the process is over its
limit or the job holds more than half of it; it may take more again below 90 % of both,
so that partitions are not paused and resumed on every message.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["ByteBudget", "prefetch_bytes"]

#: librdkafka's own floor for a useful pre-fetch queue.
MIN_PREFETCH = 256 * 1024
MAX_PREFETCH = 8 * 1024 * 1024


def prefetch_bytes(limit: int, jobs: int) -> int:
    """What one job's consumer may pre-fetch, for a process budget and its running jobs."""
    return max(MIN_PREFETCH, min(MAX_PREFETCH, limit // 16 // max(1, jobs)))


class ByteBudget:
    """Bytes held per job against one process-wide limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._by_job: dict[str, int] = {}
        self._reserved: dict[str, int] = {}
        self._waiting: dict[str, Callable[[], None]] = {}

    def reserve(self, job: str, size: int) -> None:
        """``job``'s consumer may pre-fetch ``size`` bytes."""
        self.unreserve(job)
        self._reserved[job] = size
        self._add(job, size)

    def unreserve(self, job: str) -> None:
        """``job``'s consumer is gone."""
        size = self._reserved.pop(job, 0)
        if size:
            self._add(job, -size)

    def charge(self, job: str, size: int) -> None:
        """``job`` now holds ``size`` bytes more."""
        self._add(job, size)

    def release(self, job: str, size: int) -> None:
        """``job`` let go of ``size`` bytes."""
        self._add(job, -size)

    def held_by(self, job: str) -> int:
        """What ``job`` holds, its reservation included."""
        return self._by_job.get(job, 0)

    def over(self, job: str) -> bool:
        """Whether ``job`` must take no more (a partition holding nothing still may)."""
        return self.held > self.limit or self.held_by(job) > self.limit // 2

    def room(self, job: str) -> bool:
        """Whether ``job`` may take more again (below 90 % of both limits)."""
        return self.held <= self.limit * 0.9 and self.held_by(job) <= self.limit * 0.45

    def wait(self, job: str, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, the next time ``job`` has room (the job has paused)."""
        self._waiting[job] = callback

    def forget(self, job: str) -> int:
        """``job`` has stopped: no more callbacks, its reservation gone; what it still holds
        (0 when every charge was released, as it must be) is returned and kept counted."""
        self._waiting.pop(job, None)
        self.unreserve(job)
        left = self._by_job.get(job, 0)
        if left == 0:
            self._by_job.pop(job, None)
        return left

    def _add(self, job: str, size: int) -> None:
        self.held += size
        self._by_job[job] = self._by_job.get(job, 0) + size
        if size < 0 and self._waiting:
            for name in [n for n in self._waiting if self.room(n)]:
                callback = self._waiting.pop(name)
                callback()
