"""Taking fetched messages in (SPEC §5 "Bounded memory", §12 Schema Registry).

:class:`Intake` enters each prepared message of a batch from the Kafka loop in the
:class:`~restconsumer.delivery.ledger.Ledger`, holds it in the job's
:class:`~restconsumer.delivery.outcomes.Outcomes` (its bytes charged to the budget) and
queues its records with the :class:`~restconsumer.delivery.dispatch.Dispatcher`. It decides
what the Kafka loop fetches: a partition pauses over the byte budget or past its window,
and resumes under it; every partition pauses while the job is held (an open circuit, a
Schema Registry that is down).

Messages whose schema is not fetched yet wait here (:class:`SchemaHold`), with every batch
after them, in arrival order, charged to the budget: the reactor fetches the schemas, the
waiting messages are decoded again off the reactor, then entered as usual.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from typing import Any

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from restconsumer.base.types import TP
from restconsumer.delivery.budget import ByteBudget
from restconsumer.delivery.dispatch import Dispatcher
from restconsumer.delivery.ledger import Ledger
from restconsumer.delivery.outcomes import JobStats, Outcomes
from restconsumer.delivery.registry import SchemaRegistry
from restconsumer.delivery.retry import Unavailable
from restconsumer.delivery.settings import Current
from restconsumer.delivery.units import Message as Held
from restconsumer.jobs.work import Incoming, Prepared, prepare

__all__ = ["MAX_WINDOW", "RESUME_WINDOW", "Intake", "SchemaHold", "incoming_of"]

log = Logger()

#: A partition pauses when its last fetched message is this far past its lowest unfinished
#: one, so that a crash re-sends a bounded window (SPEC §5).
MAX_WINDOW = 10_000
#: ... and resumes once the window is down to this: librdkafka drops what it pre-fetched
#: for a paused partition, so pausing and resuming at every finished message would fetch
#: the same messages again and again.
RESUME_WINDOW = MAX_WINDOW // 2


def incoming_of(message: Message) -> Incoming:
    """A fetched Kafka message as the core reads it."""
    kind, stamp = message.timestamp()
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    assert topic is not None and partition is not None and offset is not None  # a fetched message
    raw = message.headers() or []
    pairs = list(raw.items()) if isinstance(raw, dict) else raw
    headers: list[tuple[str, bytes | None]] = [
        (k, v.encode() if isinstance(v, str) else v) for k, v in pairs]
    return Incoming(topic, partition, offset, message.key(), message.value(), headers,
                    None if kind == TIMESTAMP_NOT_AVAILABLE else stamp)


class Intake:
    """Enters fetched messages and paces fetching (see the module's docstring)."""

    def __init__(self, clock: IReactorTime, current: Current, ledger: Ledger, outcomes: Outcomes,
                 dispatcher: Dispatcher, budget: ByteBudget, stats: JobStats, metrics: Any,
                 loop: Any, *, held: Callable[[], bool], registry: SchemaRegistry | None) -> None:
        self._clock = clock
        self._current = current
        self._ledger = ledger
        self._outcomes = outcomes
        self._dispatcher = dispatcher
        self._budget = budget
        self._stats = stats
        self._metrics = metrics
        self._loop = loop
        self._held = held
        self._job_id = current.settings.job.id
        self._paused: set[TP] = set()
        self.schemas = SchemaHold(clock, current, budget, registry, self, stats) \
            if registry is not None else None
        self.stopping = False

    def attach(self, loop: Any) -> None:
        """The Kafka loop to pause and resume (made after the intake)."""
        self._loop = loop

    # -- entering ------------------------------------------------------------------------

    def arrived(self, batch: list[Prepared]) -> None:
        """Enter each message of ``batch`` (or hold them all while schemas are awaited)."""
        if self.stopping:
            return
        if self.schemas is not None and self.schemas.holds(batch):
            return
        self.enter(batch)

    def enter(self, batch: list[Prepared]) -> None:
        """Enter each message in the ledger and queue its records."""
        touched: set[TP] = set()
        fetched, outcomes, stats, dispatcher = self._ledger.fetched, self._outcomes, self._stats, \
            self._dispatcher
        now = self._clock.seconds()
        messages: list[Held] = []
        for prepared in batch:
            incoming = prepared.incoming
            tp = (incoming.topic, incoming.partition)
            ticket = fetched(tp, incoming.offset)
            if ticket is None:
                continue  # its partition is no longer ours (or it came twice)
            touched.add(tp)
            messages.append(Held(prepared, ticket, prepared.size,
                                 1 if prepared.error is not None else len(prepared.records), 0, now))
        stats.consumed += len(messages)
        outcomes.hold(messages)
        for message in messages:
            prepared = message.prepared
            if prepared.error is not None:
                dispatcher.undecodable(message.ticket.tp, message)
                continue
            records = prepared.records
            if not records:
                outcomes.finish(message)
                continue
            for record in records:
                if record.filtered:
                    outcomes.filtered(message)
                else:
                    dispatcher.record(message.ticket.tp, message, record)
        dispatcher.pump()
        for tp in touched:
            self.check(tp)

    # -- pausing -------------------------------------------------------------------------

    def assigned(self, partitions: list[TP]) -> None:
        """A new assignment of ``partitions``: unpaused."""
        for tp in partitions:
            self._paused.discard(tp)

    def revoked(self, partitions: list[TP]) -> None:
        """``partitions`` are gone: forget what waits of them."""
        if self.schemas is not None:
            self.schemas.drop(set(partitions))
        for tp in partitions:
            self._paused.discard(tp)

    def check(self, tp: TP) -> None:
        """Pause ``tp`` over the budget or past the window; resume it when there is room."""
        ledger = self._ledger
        if not ledger.assigned(tp):
            return
        window = ledger.window(tp)
        full = window > MAX_WINDOW
        if tp in self._paused:
            if window > RESUME_WINDOW or self._held():
                return
            # Messages waiting for their schema are held too, though not in the ledger yet.
            waiting = self.schemas is not None and self.schemas.waiting
            if (ledger.unfinished(tp) == 0 and not waiting) or self._budget.room(self._job_id):
                self._paused.discard(tp)
                self._loop.resume(tp)
            return
        if full or (ledger.unfinished(tp) > 0 and self._budget.over(self._job_id)):
            self._paused.add(tp)
            self._loop.pause(tp)
            if not full:
                self._budget.wait(self._job_id, self.room)

    def checked(self, partitions: set[TP]) -> None:
        """Check ``partitions`` (messages of them finished)."""
        for tp in partitions:
            self.check(tp)

    def pause_all(self) -> None:
        """Pause every assigned partition (the job is held)."""
        for tp in self._ledger.partitions():
            if tp not in self._paused:
                self._paused.add(tp)
                self._loop.pause(tp)

    def room(self) -> None:
        """There may be room again: check every paused partition."""
        for tp in list(self._paused):
            self.check(tp)

    def stop(self) -> None:
        """Take nothing more in; what waits for schemas is let go."""
        self.stopping = True
        if self.schemas is not None:
            self.schemas.stop()


class SchemaHold:
    """Batches held back, in arrival order, while a message of theirs (or of one before)
    waits for its schema from the Schema Registry. A registry that is down holds the job
    (its partitions paused, its status showing an open circuit with the reason) and is
    asked again after the job's retry wait, for as long as it takes; it is kept apart from
    the endpoint's circuit: the registry answering again says nothing of the endpoint."""

    def __init__(self, clock: IReactorTime, current: Current, budget: ByteBudget,
                 registry: SchemaRegistry, intake: Intake, stats: JobStats) -> None:
        self._clock = clock
        self._current = current
        self._budget = budget
        self._registry = registry
        self._intake = intake
        self._stats = stats
        self._job_id = current.settings.job.id
        self._queue: deque[list[Prepared]] = deque()
        self._task: Deferred[None] | None = None
        #: (reason, since) while the registry is down and the job waits for it.
        self.down: tuple[str, float] | None = None
        self._stopped = False

    @property
    def waiting(self) -> bool:
        """Whether batches wait here."""
        return bool(self._queue)

    def holds(self, batch: list[Prepared]) -> bool:
        """Hold ``batch`` back if a message of it or of a batch before it waits for a
        schema; True if it was held back. Its bytes are charged meanwhile."""
        if not self._queue and all(p.schema_id is None for p in batch):
            return False
        self._budget.charge(self._job_id, sum(p.size for p in batch))
        self._queue.append(batch)
        self._start()
        if self._queue and self._budget.over(self._job_id):
            # A long registry outage pauses fetching rather than growing the queue.
            self._intake.pause_all()
            self._budget.wait(self._job_id, self._intake.room)
        return True

    def _start(self) -> None:
        if self._task is not None or self._stopped:
            return
        task = Deferred.fromCoroutine(self._await())
        task.addErrback(self._failed)
        if not task.called:  # it may end at once (the schemas were fetched meanwhile)
            self._task = task
            task.addBoth(self._ended, task)

    async def _await(self) -> None:
        registry = self._registry
        failures = 0
        while not self._stopped:
            self._enter_ready()
            waiting = [p for batch in self._queue for p in batch if p.schema_id is not None]
            if not waiting:
                break
            missing = sorted({i for p in waiting if (i := p.schema_id) is not None
                              and registry.cache.get(i) is None})
            if missing:
                try:
                    for ident in missing:
                        await registry.fetch(ident)
                except Unavailable as e:
                    failures += 1
                    wait = self._current.settings.policy.wait(failures, None, random.random)
                    log.warn("job {job_id}: no schema from the schema registry ({reason}); asking "
                             "again in {wait:.1f} s", job_id=self._job_id, reason=str(e), wait=wait)
                    self._stats.error(f"schema registry: {e}", self._clock.seconds())
                    self._away(f"schema registry: {e}")
                    await deferLater(self._clock, wait, lambda: None)
                    continue
                failures = 0
                self._answered()
                continue
            settings = self._current.settings
            again = await registry.in_thread(_prepare_again, settings.builder, waiting, settings.order,
                                             registry.cache)
            self._replace({id(old): new for old, new in zip(waiting, again, strict=True)})
        self._answered()

    def _away(self, reason: str) -> None:
        first = self.down is None
        self.down = (reason, self.down[1] if self.down else self._clock.seconds())
        if first:
            self._intake.pause_all()

    def _answered(self) -> None:
        if self.down is None:
            return
        self.down = None
        log.info("job {job_id}: the schema registry answers again", job_id=self._job_id)
        self._intake.room()

    def _enter_ready(self) -> None:
        """Enter the held-back batches at the head of the queue that no longer wait."""
        queue = self._queue
        while queue and all(p.schema_id is None for p in queue[0]):
            batch = queue.popleft()
            self._budget.release(self._job_id, sum(p.size for p in batch))
            self._intake.enter(batch)

    def _replace(self, again: dict[int, Prepared]) -> None:
        """Put the messages decoded again in the place of those that waited (the ones not
        dropped by a revocation meanwhile)."""
        for batch in self._queue:
            for index, old in enumerate(batch):
                new = again.get(id(old))
                if new is not None:
                    batch[index] = new
                    self._budget.charge(self._job_id, new.size - old.size)

    def drop(self, gone: set[TP]) -> None:
        """Drop the held-back messages of revoked partitions, and their bytes."""
        kept: deque[list[Prepared]] = deque()
        for batch in self._queue:
            mine = [p for p in batch if p.incoming.tp not in gone]
            dropped = sum(p.size for p in batch if p.incoming.tp in gone)
            if dropped:
                self._budget.release(self._job_id, dropped)
            if mine:
                kept.append(mine)
        self._queue = kept

    def stop(self) -> None:
        """Cancel the wait; everything held back is let go."""
        self._stopped = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        for batch in self._queue:
            self._budget.release(self._job_id, sum(p.size for p in batch))
        self._queue.clear()

    def _failed(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            log.failure("job {job_id}: waiting for the schema registry failed", failure,
                        job_id=self._job_id)

    def _ended(self, _: Any, task: Deferred[None]) -> None:
        if self._task is task:
            self._task = None
            if self._queue and not self._stopped:
                # Held back again after the task had decided to end (or it failed): go on.
                self._start()


def _prepare_again(builder: Any, waiting: list[Prepared], order: Any, schemas: Any) -> list[Prepared]:
    """Off the reactor: decode and map again the messages that waited for their schema."""
    return [prepare(builder, p.incoming, order, schemas) for p in waiting]
