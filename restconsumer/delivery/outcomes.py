"""How records end (SPEC §5, §12): delivered, dead-lettered or filtered → ledger → commit.

:class:`Outcomes` holds every fetched message of a job until it is finished: its records
have ended and the dead letters and results it produced are acknowledged by Kafka. Then
the message leaves the :class:`~restconsumer.delivery.ledger.Ledger` and the byte budget,
and the partition's commit point moves. It owns one rule:

    a message's bytes are charged to the budget once when it is held, and released once:
    when it finishes, or when its partition (or the whole job) lets go of it.

So a revocation that runs on after a stop gave everything up releases nothing twice.

Dead letters and results are produced without holding up the partition: only the
message's offset waits for Kafka's acknowledgement (:class:`Producing`). A replay of dead
letters ends its records through the same :class:`Producing`, with its own counters.
"""

from __future__ import annotations

import base64
import json
import random
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from restconsumer.base.types import TP
from restconsumer.delivery.attempt import RESULT_BODY
from restconsumer.delivery.budget import ByteBudget
from restconsumer.delivery.deadletters import DeadLetters, dead_letter_headers
from restconsumer.delivery.ledger import Ledger
from restconsumer.delivery.metrics import Metrics
from restconsumer.delivery.settings import Current
from restconsumer.delivery.units import Message
from restconsumer.jobs.work import Incoming, RecordWork

__all__ = ["RATE_WINDOW", "JobStats", "Outcomes", "Producing", "result_value"]

log = Logger()

RATE_WINDOW = 10.0


@dataclass
class JobStats:
    """What a job has done since it started on this instance."""

    consumed: int = 0
    delivered: int = 0
    retried: int = 0
    dead_lettered: int = 0
    failed: int = 0
    #: Records the job's filter left out (SPEC §12).
    filtered: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    started_at: float = 0.0
    #: (time, delivered) about once a second, for the rate over the last RATE_WINDOW.
    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))

    def delivered_one(self, now: float) -> None:
        """Count one delivered record."""
        self.delivered += 1
        if not self.samples or now - self.samples[-1][0] >= 1.0:
            self.samples.append((now, self.delivered))

    def rate(self, now: float) -> float:
        """Records delivered per second over about the last ten seconds."""
        base = None
        for at, count in self.samples:
            if now - at <= RATE_WINDOW:
                base = (at, count)
                break
        if base is None:
            return 0.0
        elapsed = max(now - base[0], 1.0)
        return round((self.delivered - base[1]) / elapsed, 2)

    def error(self, reason: str, now: float) -> None:
        """Note the latest error."""
        self.last_error = reason
        self.last_error_at = now


def result_value(job_id: str, incoming: Incoming, index: int, outcome: str, status: int | None,
                 duration: float, body: bytes, reason: str | None = None) -> bytes:
    """A record's result (SPEC §12), as produced to the job's ``result_topic``."""
    result: dict[str, Any] = {
        "job": job_id,
        "source": {"topic": incoming.topic, "partition": incoming.partition,
                   "offset": incoming.offset, "record": index},
        "status": status, "duration_ms": round(duration * 1000, 3), "outcome": outcome,
        "response": _response(body[:RESULT_BODY]),
    }
    if reason is not None:
        result["reason"] = reason
    return json.dumps(result, separators=(",", ":"), ensure_ascii=False).encode()


class Producing:
    """Produces dead letters and results until Kafka has them."""

    def __init__(self, clock: IReactorTime, dead_letters: DeadLetters, job_id: str) -> None:
        self._clock = clock
        self._dead_letters = dead_letters
        self._job_id = job_id

    async def produce(self, incoming: Incoming, topic: str, value: bytes | None,
                      headers: list[tuple[str, bytes]], wanted: Callable[[], bool]) -> None:
        """Produce until Kafka acknowledges; gives up (CancelledError) once not ``wanted()``."""
        wait = 0.5
        while True:
            try:
                await self._dead_letters.send(topic, incoming.key, value, headers)
                return
            except CancelledError:
                raise
            except Exception as e:
                if not wanted():
                    raise CancelledError("its partition is gone") from e
                log.error("job {job_id}: cannot produce {topic}[{partition}]@{offset} to "
                          "{dlt}: {error}; trying again in {wait:.1f} s", job_id=self._job_id,
                          topic=incoming.topic, partition=incoming.partition,
                          offset=incoming.offset, dlt=topic, error=str(e), wait=wait)
                await deferLater(self._clock, wait * (0.5 + random.random()), lambda: None)
                wait = min(wait * 2, 30.0)


class Outcomes:
    """Ends a job's records and finishes its messages (see the module's docstring)."""

    def __init__(self, clock: IReactorTime, current: Current, ledger: Ledger, budget: ByteBudget,
                 dead_letters: DeadLetters, metrics: Metrics, stats: JobStats, *,
                 commit: Callable[[dict[TP, int]], None], settled: Callable[[set[TP]], None]) -> None:
        self._clock = clock
        self._current = current
        self._ledger = ledger
        self._budget = budget
        self._metrics = metrics
        self.stats = stats
        self._commit = commit
        self._settled = settled
        self._job_id = current.settings.job.id
        self.producing = Producing(clock, dead_letters, self._job_id)
        #: Every held message per partition, by offset (in fetch order).
        self._held: dict[TP, dict[int, Message]] = {}
        self._acks: dict[TP, set[Deferred[None]]] = {}

    # -- holding -------------------------------------------------------------------------

    def hold(self, messages: list[Message]) -> None:
        """Hold messages just entered in the ledger (their bytes charged now, in one go)."""
        # Charged first: a message is released only if it was held, and held only once charged.
        self._budget.charge(self._job_id, sum(message.size for message in messages))
        held = self._held
        for message in messages:
            tp = message.ticket.tp
            partition = held.get(tp)
            if partition is None:
                partition = held[tp] = {}
            partition[message.ticket.offset] = message

    def _grow(self, message: Message, size: int) -> None:
        """``message`` holds ``size`` bytes more (a result waiting for its ack)."""
        if self._is_held(message):
            message.size += size
            self._budget.charge(self._job_id, size)

    def _is_held(self, message: Message) -> bool:
        held = self._held.get(message.ticket.tp)
        return held is not None and held.get(message.ticket.offset) is message

    def release(self, partitions: list[TP]) -> None:
        """Let go of every message of ``partitions`` (revoked): their bytes released."""
        for tp in partitions:
            for message in self._held.pop(tp, {}).values():
                self._budget.release(self._job_id, message.size)
            self._acks.pop(tp, None)

    def release_all(self) -> None:
        """Let go of everything (the job stops)."""
        self.release(list(self._held))

    def oldest(self, now: float) -> dict[TP, float]:
        """Per partition holding any: how long its oldest unfinished message has waited."""
        ages = {}
        for tp, held in self._held.items():
            for message in held.values():
                ages[tp] = max(0.0, now - message.fetched_at)
                break
        return ages

    def acks(self, partitions: list[TP]) -> list[Deferred[None]]:
        """The acknowledgements ``partitions`` wait for."""
        return [d for tp in partitions for d in self._acks.get(tp, ())]

    def cancel_acks(self, partitions: list[TP]) -> None:
        """Stop waiting for the acknowledgements of ``partitions``."""
        for tp in partitions:
            for produce in list(self._acks.get(tp, ())):
                produce.cancel()

    # -- ends ----------------------------------------------------------------------------

    def delivered(self, message: Message, record: RecordWork, status: int | None, began: float,
                  body: bytes, retried: int, *, settle: bool = True) -> None:
        """``record`` was delivered."""
        now = self._clock.seconds()
        self.stats.retried += retried
        self.stats.delivered_one(now)
        self._metrics.delivered(self._job_id)
        self._result(message, record.index, "delivered", status, began, body)
        self.record_ended(message, settle)

    def filtered(self, message: Message) -> None:
        """A record the job's filter left out."""
        self.stats.filtered += 1
        self._metrics.filtered(self._job_id)
        self.record_ended(message)

    def dead_letter(self, message: Message, reason: str, record: RecordWork | None, *,
                    status: int | None = None, attempts: int = 0, began: float | None = None,
                    body: bytes = b"", retried: int = 0, failed: bool = False) -> None:
        """Produce the dead letter; the record has ended, the message waits for the ack."""
        settings = self._current.settings
        incoming = message.prepared.incoming
        self.stats.retried += retried
        if failed:
            self.stats.failed += 1
        self._result(message, record.index if record is not None else 0, "dead_lettered", status,
                     began, body, reason)
        self.stats.error(reason, self._clock.seconds())
        log.error("job {job_id}: {topic}[{partition}]@{offset} entity {entity}: dead-lettered: "
                  "{reason}", job_id=self._job_id, topic=incoming.topic, partition=incoming.partition,
                  offset=incoming.offset, entity=record.entity if record else None, reason=reason)
        headers = dead_letter_headers(self._job_id, incoming, reason,
                                      record=record.index if record is not None else None,
                                      status=status, attempts=attempts)
        self._awaiting_ack(message, self.producing.produce(
            incoming, settings.job.dead_letter_topic, incoming.value, headers,
            lambda: self._ledger.current(message.ticket)), self._dead_letter_acked)
        self.record_ended(message)

    def _dead_letter_acked(self) -> None:
        self.stats.dead_lettered += 1
        self._metrics.dead_lettered(self._job_id)

    def _result(self, message: Message, index: int, outcome: str, status: int | None,
                began: float | None, body: bytes, reason: str | None = None) -> None:
        """Produce the record's result to the job's ``result_topic``, if it has one: the
        message's offset waits for Kafka's acknowledgement, as for a dead letter."""
        topic = self._current.settings.result_topic
        if topic is None:
            return
        incoming = message.prepared.incoming
        duration = 0.0 if began is None else max(0.0, self._clock.seconds() - began)
        value = result_value(self._job_id, incoming, index, outcome, status, duration, body, reason)
        self._grow(message, len(value))  # held until Kafka has it
        self._awaiting_ack(message, self.producing.produce(
            incoming, topic, value, [], lambda: self._ledger.current(message.ticket)))

    def _awaiting_ack(self, message: Message, producing: Coroutine[Any, Any, None],
                      counted: Callable[[], None] | None = None) -> None:
        message.open_acks += 1
        d = Deferred.fromCoroutine(producing)
        acks = self._acks.setdefault(message.ticket.tp, set())
        acks.add(d)

        def acked(_: Any) -> None:
            acks.discard(d)
            if not self._ledger.current(message.ticket):
                return
            if counted is not None:
                counted()
            message.open_acks -= 1
            if message.open_records == 0 and message.open_acks == 0:
                self.finish(message)

        def gone(_: Any) -> None:
            acks.discard(d)  # an ack that will not come (cancelled): stop waiting for it

        d.addCallbacks(acked, gone)

    def record_ended(self, message: Message, settle: bool = True) -> None:
        """One record of ``message`` has ended."""
        message.open_records -= 1
        if message.open_records == 0 and message.open_acks == 0:
            self.finish(message, settle)

    def finish(self, message: Message, settle: bool = True) -> None:
        """The message is done: out of the ledger and the budget; with ``settle``, its
        commit point goes to the Kafka loop (a batch settles once for all its messages)."""
        ticket = message.ticket
        held = self._held.get(ticket.tp)
        if held is None or held.get(ticket.offset) is not message:
            return  # let go of meanwhile: released (and committed) then
        del held[ticket.offset]
        self._budget.release(self._job_id, message.size)
        self._ledger.finished(ticket)
        if settle:
            self.settle({ticket.tp})

    def settle(self, partitions: set[TP]) -> None:
        """Commit what may be, and tell that ``partitions`` moved."""
        due = self._ledger.take_due()
        if due:
            self._commit(due)
        self._settled(partitions)


def _response(body: bytes) -> dict[str, str]:
    """An answer's body as a result shows it: UTF-8 text as it is, anything else base64."""
    try:
        return {"body": body.decode("utf-8"), "encoding": "text"}
    except UnicodeDecodeError:
        return {"body": base64.b64encode(body).decode("ascii"), "encoding": "base64"}
