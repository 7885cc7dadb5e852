"""What the delivery core holds per fetched message and per unit of delivery.

Plain data, no Twisted. A :class:`Message` is one fetched Kafka message: its ledger ticket,
the bytes it holds in the budget, and how many of its records (and of the dead letters or
results it waits for Kafka to acknowledge) are still open. A :class:`Unit` is what is
delivered in one go: one record, one whole undecodable message (to dead-letter), or a
batch of records of one partition.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from restconsumer.base.types import TP
from restconsumer.delivery.ledger import Ticket
from restconsumer.jobs.work import Prepared, RecordWork

__all__ = ["Message", "Unit"]


@dataclass(eq=False, slots=True)
class Message:
    """A fetched message on its way: its ticket, size, and what of it is still open."""

    prepared: Prepared
    ticket: Ticket
    size: int
    open_records: int
    open_acks: int = 0
    #: When it was fetched (the age of a partition's oldest unfinished message).
    fetched_at: float = 0.0

    @property
    def tp(self) -> TP:
        """Its topic and partition."""
        return self.ticket.tp


@dataclass(eq=False, slots=True)
class Unit:
    """One record to deliver (or a message to dead-letter, or a batch), on its way."""

    message: Message
    record: RecordWork | None
    #: Fetch order across the job: the oldest unfinished unit probes an open circuit.
    seq: int = 0
    #: A batch's records, in order (batched jobs only).
    batch: list[tuple[Message, RecordWork]] | None = None
    group: Hashable | None = None
    #: The Deferred of its delivery while it runs (cancelling it abandons the unit).
    task: Any = None
    #: A request of it is on the wire.
    sending: bool = False
    #: Abandoned (its partition revoked, the job stopped): it ends neither delivered nor
    #: dead-lettered, and its message is never committed by this consumer.
    cancelled: bool = False
    #: Its partition is being revoked and waits for its request to end: it must not then
    #: wait to retry.
    revoking: bool = False
    #: Told when it has ended, whichever way.
    ended: list[Any] = field(default_factory=list)
    #: Its records that have ended (by id): none ends twice.
    done: set[int] = field(default_factory=set)

    @property
    def tp(self) -> TP:
        """Its topic and partition."""
        return self.message.ticket.tp

    def end(self, message: Message, record: RecordWork | None) -> bool:
        """Mark one of its records ended; False if it had ended already."""
        key = id(record) if record is not None else id(message)
        done = self.done
        if key in done:
            return False
        done.add(key)
        return True

    def items(self) -> list[tuple[Message, RecordWork | None]]:
        """Its records with their messages (a batch's, in order; else the one)."""
        if self.batch is not None:
            return list(self.batch)
        return [(self.message, self.record)]
