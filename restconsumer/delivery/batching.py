"""Grouping a partition's records into batches (SPEC §11 "Batching").

Plain data, no Twisted. Records of one key (a partition) are added in order; a batch is
ready once it holds ``max_messages`` records or adding the next would pass ``max_bytes``
(a record larger than that alone is a batch of its own); the caller takes what is
pending when its ``max_wait`` runs out.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["Batcher", "batch_body"]

T = TypeVar("T")


@dataclass
class _Pending(Generic[T]):
    items: list[T] = field(default_factory=list)
    size: int = 0


class Batcher(Generic[T]):
    """Pending batches, one per key."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._pending: dict[Hashable, _Pending[T]] = {}

    def add(self, key: Hashable, item: T, size: int) -> list[list[T]]:
        """Add ``item`` after the others of ``key``; the batches that are now ready."""
        ready = []
        pending = self._pending.get(key)
        if pending is not None and pending.items and pending.size + size > self.max_bytes:
            ready.append(self._pending.pop(key).items)
            pending = None
        if pending is None:
            pending = self._pending[key] = _Pending()
        pending.items.append(item)
        pending.size += size
        if len(pending.items) >= self.max_messages or pending.size >= self.max_bytes:
            ready.append(self._pending.pop(key).items)
        return ready

    def take(self, key: Hashable) -> list[T]:
        """What is pending for ``key`` (its wait ran out), now a batch; [] if nothing."""
        pending = self._pending.pop(key, None)
        return pending.items if pending is not None else []

    def pending(self, key: Hashable) -> bool:
        """Whether records of ``key`` wait for their batch."""
        return key in self._pending


def batch_body(bodies: list[bytes], form: str) -> bytes:
    """The body of a batch: a JSON array of the records' bodies, or NDJSON."""
    if form == "ndjson":
        return b"".join(body + b"\n" for body in bodies)
    return b"[" + b",".join(bodies) + b"]"
