"""One running job: Kafka batch → decode → map → send/retry → outcome → ledger → commit.

The job's :class:`~restconsumer.consumer.KafkaLoop` fetches, decodes and maps on the
job's thread and hands prepared batches here, on the reactor. Each message is entered in
the :class:`~restconsumer.ledger.Ledger` and charged to the process's
:class:`~restconsumer.budget.ByteBudget`; its records are queued in the
:class:`~restconsumer.ordering.Scheduler` by order group and sent as the order and
``max_in_flight`` allow. A record ends delivered or dead-lettered; a dead letter is
produced without holding up the partition, and only the message's offset waits for
Kafka's acknowledgement. Once every record of a message has ended (and its dead letters
are acknowledged), the message is finished in the ledger, and the commit point moves.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import itertools
import json
import random
from collections import deque
from collections.abc import Callable, Coroutine, Hashable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, Message
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from restconsumer.batching import Batcher, batch_body
from restconsumer.budget import ByteBudget, prefetch_bytes
from restconsumer.circuit import Circuit
from restconsumer.consumer import KafkaLoop, consumer_config
from restconsumer.deadletters import DeadLetters, dead_letter_headers
from restconsumer.ledger import TP, Ledger, Ticket
from restconsumer.mapping import Outgoing, RequestBuilder
from restconsumer.metrics import Metrics
from restconsumer.model import DEFAULT_BATCH, DEFAULT_MAX_IN_FLIGHT, DEFAULT_TIMEOUT, Job
from restconsumer.oauth2 import TokenSource
from restconsumer.ordering import Scheduler
from restconsumer.registry import SchemaRegistry
from restconsumer.retry import RetryPolicy, Unavailable, Verdict, deliver, judge
from restconsumer.sender import Answer, DestinationRefused, HTTPSender
from restconsumer.signing import Signer
from restconsumer.work import Incoming, Prepared, RecordWork, order_key, prepare

__all__ = ["JobRunner", "JobStats", "Shared"]

#: The most of an answer's body a result (SPEC §12) holds.
RESULT_BODY = 64 * 1024

log = Logger()

#: A partition pauses when its last fetched message is this far past its lowest unfinished
#: one, so that a crash re-sends a bounded window (SPEC §5).
MAX_WINDOW = 10_000
#: ... and resumes once the window is down to this: librdkafka drops what it pre-fetched
#: for a paused partition, so pausing and resuming at every finished message would fetch
#: the same messages again and again.
RESUME_WINDOW = MAX_WINDOW // 2
RATE_WINDOW = 10.0
#: Seconds between two summary lines of a job that has work.
SUMMARY_EVERY = 30.0


@dataclass
class Shared:
    """What every job of the process shares, and the settings of their delivery."""

    reactor: Any
    kafka: dict[str, Any]
    sender: HTTPSender
    dead_letters: DeadLetters
    budget: ByteBudget
    clock: IReactorTime | None = None
    revoke_grace: float = 10.0
    consumer_factory: Callable[[dict[str, Any]], Any] = Consumer
    #: Makes each job's Kafka loop (tests: a loop of their own).
    loop_factory: Callable[..., KafkaLoop] = KafkaLoop
    #: Keyword arguments for each job's KafkaLoop (poll timings, batch size).
    loop_options: dict[str, Any] = field(default_factory=dict)
    #: How many jobs run in this process (for each one's share of the pre-fetch budget).
    running: int = 0
    metrics: Metrics = field(default_factory=Metrics)
    #: How OAuth2 tokens are fetched (None: with treq; tests: a fake token endpoint).
    token_fetch: Any = None
    #: The Schema Registry of ``--schema-registry`` (SPEC §12), if one is configured.
    registry: SchemaRegistry | None = None


@dataclass
class JobStats:
    """What a job has done since it started on this instance."""

    consumed: int = 0
    records: int = 0
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


@dataclass(eq=False, slots=True)
class _Message:
    """A fetched message on its way: its ticket, size, and what of it is still open."""

    prepared: Prepared
    ticket: Ticket
    size: int
    open_records: int
    open_acks: int = 0


@dataclass(eq=False, slots=True)
class _Unit:
    """One record to deliver (or to dead-letter), and its place in the scheduler."""

    message: _Message
    record: RecordWork | None
    #: Fetch order across the job: the oldest unfinished record probes an open circuit.
    seq: int = 0
    #: A batch's records, in order (batched jobs only).
    batch: list[tuple[_Message, RecordWork]] | None = None
    group: Hashable | None = None
    task: Deferred[None] | None = None
    sending: bool = False
    cancelled: bool = False
    #: Its partition is being revoked and waits for its request to end: it must not
    #: then wait to retry.
    revoking: bool = False
    ended: list[Deferred[None]] = field(default_factory=list)

    @property
    def tp(self) -> TP:
        return self.message.ticket.tp


def _incoming(message: Message) -> Incoming:
    kind, stamp = message.timestamp()
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    assert topic is not None and partition is not None and offset is not None  # a fetched message
    raw = message.headers() or []
    pairs = list(raw.items()) if isinstance(raw, dict) else raw
    headers: list[tuple[str, bytes | None]] = [
        (k, v.encode() if isinstance(v, str) else v) for k, v in pairs]
    return Incoming(topic, partition, offset, message.key(), message.value(), headers,
                    None if kind == TIMESTAMP_NOT_AVAILABLE else stamp)


class JobRunner:
    """Runs one job on this instance."""

    def __init__(self, job: Job, shared: Shared) -> None:
        self._shared = shared
        self._reactor = shared.reactor
        self._clock: IReactorTime = shared.clock or shared.reactor
        self._sender = shared.sender
        self._dead_letters = shared.dead_letters
        self._budget = shared.budget
        self._metrics = shared.metrics
        self.stats = JobStats(started_at=self._clock.seconds())
        self.ledger = Ledger()
        self._use(job)
        self._scheduler: Scheduler[_Unit] = Scheduler(self._max_in_flight)
        self._active: dict[TP, set[_Unit]] = {}
        self._acks: dict[TP, set[Deferred[None]]] = {}
        self._held: dict[TP, dict[int, _Message]] = {}
        self._paused: set[TP] = set()
        self._pumping = False
        self._pump_again = False
        self._seq = itertools.count()
        self.circuit = Circuit()
        self._parked: dict[_Unit, Deferred[None]] = {}
        self._probe_timer: Any = None
        self._probe_wait: float | None = None
        self._probe_start = False
        self._flush_timers: dict[TP, Any] = {}
        self._summary = LoopingCall(self._summarize)
        self._summary.clock = self._clock
        self._summarized = (0, 0, 0)
        self._stopping = False
        self._pacer = _Pacer(self._clock)
        self._stopped: Deferred[None] | None = None
        # Batches held back while a message of theirs (or of one before) waits for a schema.
        self._schema_queue: deque[list[Prepared]] = deque()
        self._schema_task: Deferred[None] | None = None
        #: (reason, since) while the Schema Registry is down and the job waits for it.
        self._registry_down: tuple[str, float] | None = None
        self._entering_queued = False
        self.loop = shared.loop_factory(self._reactor, job.id, self._consumer_config(), job.topics, self,
                              consumer_factory=shared.consumer_factory,
                              # A stop waits for the revocation grace, but not for a
                              # close that Kafka being away would make hang.
                              **{"answer_timeout": shared.revoke_grace + 30.0,
                                 "close_timeout": max(15.0, shared.revoke_grace + 5.0),
                                 **shared.loop_options})

    def _consumer_config(self) -> dict[str, Any]:
        shared = self._shared
        self._prefetch = prefetch_bytes(self._budget.limit, shared.running + 1)
        config = consumer_config(shared.kafka, self.job.id)
        # librdkafka's pre-fetch queue is part of the byte budget, unless the operator says
        # otherwise with --kafka-option.
        config.setdefault("queued.max.messages.kbytes", max(1, self._prefetch // 1024))
        config.setdefault("fetch.max.bytes", max(self._prefetch, 1024 * 1024))
        start = self.job.definition.get("start_from")
        if start is not None:
            # Where a new group starts (SPEC §12); a group with commits goes on from them.
            config["auto.offset.reset"] = start
        return config

    def _use(self, job: Job) -> None:
        # Everything is built before anything is replaced: a definition that cannot be
        # used leaves the running one whole.
        builder = RequestBuilder(job)
        policy = RetryPolicy.of(job.retry)
        d = job.definition
        self.job, self.builder, self.policy = job, builder, policy
        self._timeout = float(d.get("timeout", DEFAULT_TIMEOUT))
        self._redirects = bool(d.get("follow_redirects", False))
        self._ca_cert = d.get("ca_cert")
        self._ratelimit = float(d.get("ratelimit", 0))
        self._success = frozenset(d.get("success_status", ()))
        self._idempotency = bool(d.get("idempotency_key"))
        self._signer = Signer(d["signing"]["secret"]) if "signing" in d else None
        self._result_topic: str | None = d.get("result_topic")
        self._oauth = TokenSource(self._clock, d["oauth2"], self._shared.token_fetch,
                                  self._timeout) if "oauth2" in d else None
        self._max_in_flight = int(d.get("max_in_flight", DEFAULT_MAX_IN_FLIGHT))
        self._ordering = d.get("ordering", "partition")
        self._order = order_key(self._ordering)
        batch = {**DEFAULT_BATCH, **d["batch"]} if "batch" in d else None
        self._batch = batch
        if batch is not None:
            self._batcher: Batcher[tuple[_Message, RecordWork]] = Batcher(
                int(batch["max_messages"]), int(batch["max_bytes"]))
            headers = builder.headers
            if batch["format"] == "ndjson":
                headers = {**headers, b"Content-Type": [b"application/x-ndjson"]}
            self._batch_headers = headers

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start consuming."""
        log.info("job {job_id}: starting on {topics} (hash {hash})", job_id=self.job.id,
                 topics=", ".join(self.job.topics), hash=self.job.hash[:12])
        self._shared.running += 1
        self._budget.reserve(self.job.id, self._prefetch)
        self.loop.start()
        self._summary.start(SUMMARY_EVERY, now=False)

    def can_take(self, job: Job) -> bool:
        """Whether ``job`` can replace the running definition without a new consumer."""
        return job.topics == self.job.topics and \
            job.definition.get("ordering", "partition") == self.job.definition.get("ordering", "partition")

    def update(self, job: Job) -> None:
        """Use a changed definition from the next fetched message on (same consumer)."""
        log.info("job {job_id}: definition changed (hash {old} -> {new})", job_id=job.id,
                 old=self.job.hash[:12], new=job.hash[:12])
        self._use(job)
        self._scheduler.max_in_flight = self._max_in_flight
        self._pump()

    def stop(self) -> Deferred[None]:
        """Stop: the consumer closes (its revocation ends or cancels what is under way and
        commits what is finished); fires once all is done."""
        if self._stopped is not None:
            return self._stopped
        self._stopping = True
        self._stop_schema_waiting()
        if self._summary.running:
            self._summary.stop()
        for tp in list(self._flush_timers):
            self._drop_batch(tp)

        def closed(_: Any) -> None:
            # Whatever a consumer that would not close left behind is abandoned.
            for units in list(self._active.values()):
                for unit in list(units):
                    self._cancel(unit)
            self._shared.running -= 1
            self._budget.forget(self.job.id)
            log.info("job {job_id}: stopped", job_id=self.job.id)

        self._stopped = self.loop.stop().addBoth(closed)
        return self._stopped

    def _summarize(self) -> None:
        """One line about what the job did since the last one, while it has work."""
        stats = self.stats
        now = (stats.delivered, stats.retried, stats.dead_lettered)
        lag = sum(self.loop.lag.values())
        if now == self._summarized and not lag:
            return
        before, self._summarized = self._summarized, now
        log.info("job {job_id}: delivered {delivered} (+{new}), retried {retried}, dead-lettered "
                 "{dead_lettered}, {rate} records/s, lag {lag}{circuit}", job_id=self.job.id,
                 delivered=now[0], new=now[0] - before[0], retried=now[1], dead_lettered=now[2],
                 rate=stats.rate(self._clock.seconds()), lag=lag,
                 circuit=", circuit open" if self.held else "")

    @property
    def held_bytes(self) -> int:
        """Bytes this job holds (its pre-fetch reservation included)."""
        return self._budget.held_by(self.job.id)

    # -- from the Kafka loop -------------------------------------------------------------

    def prepare(self, message: Message) -> Prepared:
        """On the Kafka thread: decode, map and build the requests of one message."""
        registry = self._shared.registry
        return prepare(self.builder, _incoming(message), self._order,
                       registry.cache if registry is not None else None)

    def assigned(self, partitions: list[TP]) -> None:
        """These partitions are ours: a new assignment each."""
        for tp in partitions:
            self.ledger.assign(tp)
            self._paused.discard(tp)

    def arrived(self, batch: list[Prepared]) -> None:
        """Enter each message in the ledger and queue its records."""
        if self._stopping or self._waits_for_schema(batch):
            return
        touched: set[TP] = set()
        # Run for every message of every batch: what is looked up once is kept at hand, and
        # the bytes are charged to the budget once (before anything can be released).
        fetched, held, stats, scheduler = self.ledger.fetched, self._held, self.stats, self._scheduler
        batched, by_partition = self._batch is not None, self._ordering == "partition"
        charge = 0
        for prepared in batch:
            incoming = prepared.incoming
            tp = (incoming.topic, incoming.partition)
            ticket = fetched(tp, incoming.offset)
            if ticket is None:
                continue  # its partition is no longer ours (or it came twice)
            touched.add(tp)
            stats.consumed += 1
            message = _Message(prepared, ticket, prepared.size, 0)
            partition = held.get(tp)
            if partition is None:
                partition = held[tp] = {}
            partition[incoming.offset] = message
            charge += prepared.size
            if prepared.error is not None:
                message.open_records = 1
                scheduler.add(tp, _Unit(message, None, next(self._seq)))
                continue
            records = prepared.records
            stats.records += len(records)
            message.open_records = len(records)
            if not records:
                self._budget.charge(self.job.id, charge)  # charged before it is released
                charge = 0
                self._finish(message)
                continue
            for record in records:
                if record.filtered:
                    if charge:  # it may finish here and now: charged before it is released
                        self._budget.charge(self.job.id, charge)
                        charge = 0
                    stats.filtered += 1
                    self._metrics.filtered(self.job.id)
                    self._record_ended(message)
                    continue
                if batched and record.request is not None:
                    self._batch_add(tp, message, record)
                    continue
                group: Hashable | None = tp
                if not by_partition:
                    group = None if record.order is None else (tp, record.order)
                scheduler.add(group, _Unit(message, record, next(self._seq)))
        if charge:
            self._budget.charge(self.job.id, charge)
        self._pump()
        for tp in touched:
            self._check(tp)

    def revoked(self, partitions: list[TP], lost: bool) -> Deferred[dict[TP, int]]:
        """Let go of ``partitions``: queued records are dropped, requests under way may end
        within the revocation grace (lost: none), then are cancelled; the offsets to commit."""
        gone = set(partitions)
        self._drop_schema_waiting(gone)
        self._scheduler.drop(lambda unit: unit.tp in gone)
        for tp in partitions:
            self._drop_batch(tp)
        waiting: list[Deferred[Any]] = []
        for tp in partitions:
            for unit in list(self._active.get(tp, ())):
                if lost or not unit.sending:
                    self._cancel(unit)  # a wait to retry, or another consumer has it already
                else:
                    unit.revoking = True
                    waiting.append(self._ended(unit))
            waiting.extend(_observe(d) for d in self._acks.get(tp, ()))

        def let_go(_: Any) -> dict[TP, int]:
            for tp in partitions:
                for unit in list(self._active.get(tp, ())):
                    self._cancel(unit)
                for produce in list(self._acks.get(tp, ())):
                    produce.cancel()
            offsets = {}
            for tp in partitions:
                point = self.ledger.revoke(tp)
                if point is not None and not lost:
                    offsets[tp] = point
                for message in self._held.pop(tp, {}).values():
                    self._budget.release(self.job.id, message.size)
                self._active.pop(tp, None)
                self._acks.pop(tp, None)
                self._paused.discard(tp)
            return offsets

        if not waiting:
            return succeed(let_go(None))
        def late(result: Any, grace: float) -> Any:
            log.warn("job {job_id}: requests still under way on revoked partitions after {grace} s: "
                     "cancelled", job_id=self.job.id, grace=grace)
            return result

        settled: Deferred[Any] = DeferredList(waiting, consumeErrors=True)
        settled.addTimeout(self._shared.revoke_grace, self._clock, onTimeoutCancel=late)
        return settled.addCallback(let_go)

    # -- messages waiting for the Schema Registry ----------------------------------------

    def _waits_for_schema(self, batch: list[Prepared]) -> bool:
        """Hold ``batch`` back, in arrival order, if a message of it or of a batch before it
        waits for a schema; True if it was held back. Its bytes are charged meanwhile."""
        if self._entering_queued or (not self._schema_queue
                                     and all(p.schema_id is None for p in batch)):
            return False
        self._budget.charge(self.job.id, sum(p.size for p in batch))
        self._schema_queue.append(batch)
        self._start_schema_task()
        if self._schema_queue and self._budget.over(self.job.id):
            # A long registry outage pauses fetching rather than growing the queue.
            self._pause_all()
            self._budget.wait(self.job.id, self._room)
        return True

    def _start_schema_task(self) -> None:
        if self._schema_task is not None:
            return
        task = Deferred.fromCoroutine(self._await_schemas())
        task.addErrback(self._schema_failed)
        if not task.called:  # it may end at once (the schemas were fetched meanwhile)
            self._schema_task = task
            task.addBoth(self._schema_task_ended, task)

    async def _await_schemas(self) -> None:
        """Fetch the schemas the held-back messages wait for, decode those messages again off
        the reactor, and enter the batches in order. A registry that is down opens the job's
        circuit and is asked again after the job's retry wait, for as long as it takes."""
        registry = self._shared.registry
        assert registry is not None
        failures = 0
        while not self._stopping:
            self._enter_ready()
            waiting = [p for batch in self._schema_queue for p in batch if p.schema_id is not None]
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
                    wait = self.policy.wait(failures, None, random.random)
                    log.warn("job {job_id}: no schema from the schema registry ({reason}); asking "
                             "again in {wait:.1f} s", job_id=self.job.id, reason=str(e), wait=wait)
                    self._note_error(f"schema registry: {e}")
                    self._registry_away(f"schema registry: {e}")
                    await deferLater(self._clock, wait, lambda: None)
                    continue
                failures = 0
                self._registry_answered()
                continue
            again = await registry.in_thread(_prepare_again, self.builder, waiting, self._order,
                                             registry.cache)
            self._replace_waiting({id(old): new for old, new in zip(waiting, again, strict=True)})
        self._registry_answered()

    def _registry_away(self, reason: str) -> None:
        """The registry is down: the job is held (its partitions paused, its status showing
        an open circuit with the reason) until it answers. Kept apart from the endpoint's
        circuit: the registry answering again says nothing of the endpoint, nor the reverse."""
        first = self._registry_down is None
        self._registry_down = (reason, self._registry_down[1] if self._registry_down else
                               self._clock.seconds())
        if first:
            self._pause_all()

    def _registry_answered(self) -> None:
        """The registry answers (or nothing waits for it): the job goes on."""
        if self._registry_down is None:
            return
        self._registry_down = None
        log.info("job {job_id}: the schema registry answers again", job_id=self.job.id)
        for tp in list(self._paused):
            self._check(tp)

    def _enter_ready(self) -> None:
        """Enter the held-back batches at the head of the queue that no longer wait."""
        queue = self._schema_queue
        while queue and all(p.schema_id is None for p in queue[0]):
            batch = queue.popleft()
            self._budget.release(self.job.id, sum(p.size for p in batch))
            self._entering_queued = True
            try:
                self.arrived(batch)
            finally:
                self._entering_queued = False

    def _replace_waiting(self, again: dict[int, Prepared]) -> None:
        """Put the messages decoded again in the place of those that waited (the ones not
        dropped by a revocation meanwhile)."""
        for batch in self._schema_queue:
            for index, old in enumerate(batch):
                new = again.get(id(old))
                if new is not None:
                    batch[index] = new
                    if new.size > old.size:
                        self._budget.charge(self.job.id, new.size - old.size)
                    elif new.size < old.size:
                        self._budget.release(self.job.id, old.size - new.size)

    def _drop_schema_waiting(self, gone: set[TP]) -> None:
        """Drop the held-back messages of revoked partitions, and their bytes."""
        kept: deque[list[Prepared]] = deque()
        for batch in self._schema_queue:
            mine = [p for p in batch if p.incoming.tp not in gone]
            dropped = sum(p.size for p in batch if p.incoming.tp in gone)
            if dropped:
                self._budget.release(self.job.id, dropped)
            if mine:
                kept.append(mine)
        self._schema_queue = kept

    def _stop_schema_waiting(self) -> None:
        task, self._schema_task = self._schema_task, None
        if task is not None:
            task.cancel()
        for batch in self._schema_queue:
            self._budget.release(self.job.id, sum(p.size for p in batch))
        self._schema_queue.clear()

    def _schema_failed(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            log.failure("job {job_id}: waiting for the schema registry failed", failure,
                        job_id=self.job.id)

    def _schema_task_ended(self, _: Any, task: Deferred[None]) -> None:
        if self._schema_task is task:
            self._schema_task = None
            if self._schema_queue and not self._stopping:
                # Held back again after the task had decided to end (or it failed): go on.
                self._start_schema_task()

    # -- sending -------------------------------------------------------------------------

    def _pump(self) -> None:
        """Start every unit the scheduler lets start."""
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            again = True
            while again:
                self._pump_again = False
                while not self._stopping and self._may_start() and \
                        (taken := self._scheduler.take()) is not None:
                    group, unit = taken
                    unit.group = group
                    self._active.setdefault(unit.tp, set()).add(unit)
                    task = self._start(unit)
                    unit.task = task
                    task.addErrback(lambda f: log.failure("job {job_id}: delivering a record failed",
                                                          f, job_id=self.job.id))
                    task.addBoth(self._ended_with, unit)
                again = self._pump_again
        finally:
            self._pumping = False

    def _may_start(self) -> bool:
        if not self.circuit.is_open:
            return True
        # An open circuit takes no new records, save one to probe with when none waits.
        if self._probe_start:
            self._probe_start = False
            return True
        return False

    def _unit_ended(self, unit: _Unit) -> None:
        self._scheduler.done(unit.group)
        active = self._active.get(unit.tp)
        if active is not None:
            active.discard(unit)
        ended, unit.ended = unit.ended, []
        for d in ended:
            if not d.called:  # a revocation may have stopped waiting for it
                d.callback(None)
        self._pump()

    def _ended_with(self, result: Any, unit: _Unit) -> None:
        self._unit_ended(unit)

    @staticmethod
    def _ended(unit: _Unit) -> Deferred[None]:
        """Fires when ``unit`` (active now) has ended."""
        d: Deferred[None] = Deferred()
        unit.ended.append(d)
        return d

    def _cancel(self, unit: _Unit) -> None:
        unit.cancelled = True
        if unit.task is not None:
            # Also when it has fired but waits on the rest of the retry loop (chained).
            unit.task.cancel()

    def _start(self, unit: _Unit) -> Deferred[None]:
        """Deliver ``unit``; fires once it has ended (cancel it to abandon it).

        The usual case (one record, the circuit closed) makes its first attempt without
        the retry loop's coroutines: a record answered 2xx at once costs a chain of
        callbacks only. Anything else (a failure, a batch, an open circuit) goes through
        :meth:`_run`, from the first attempt's result when there was one.
        """
        record = unit.record
        if unit.batch is None and record is not None and record.request is not None \
                and record.error is None and not self.circuit.is_open:
            began = self._clock.seconds()
            try:
                attempt = self._attempt(unit, record.request)
            except Exception as e:  # raised before a Deferred existed (a URL Agent refuses...)
                return Deferred.fromCoroutine(self._run(unit, (None, e), began))
            return attempt.addCallbacks(self._first_answer, self._first_failed,
                                        callbackArgs=(unit, began), errbackArgs=(unit, began))
        return Deferred.fromCoroutine(self._run(unit))

    def _first_answer(self, answer: Answer, unit: _Unit, began: float) -> Deferred[None] | None:
        verdict = judge(answer, None, self._success)
        if not verdict.delivered:
            return Deferred.fromCoroutine(self._run(unit, (answer, None), began))
        self._verdict(unit, verdict)
        record = unit.record
        assert record is not None
        self._delivered(unit.message, record, verdict.status, began, answer.body, 0)
        return None

    def _first_failed(self, failure: Failure, unit: _Unit, began: float) -> Deferred[None] | None:
        if unit.cancelled:
            return None  # abandoned: the message stays unfinished, and is not committed
        return Deferred.fromCoroutine(self._run(unit, (None, failure.value), began))

    def _delivered(self, message: _Message, record: RecordWork, status: int | None, began: float,
                   body: bytes, retried: int) -> None:
        self.stats.retried += retried
        self.stats.delivered_one(self._clock.seconds())
        self._metrics.delivered(self.job.id)
        self._result(message, record.index, "delivered", status, began, body)
        self._record_ended(message)

    async def _run(self, unit: _Unit, first: tuple[Answer | None, BaseException | None] | None = None,
                   began: float | None = None) -> None:
        if unit.batch is not None:
            await self._run_batch(unit, unit.batch)
            return
        message, record = unit.message, unit.record
        if record is None:
            self._dead_letter(message, message.prepared.error or "undecodable", None)
            return
        if record.request is None or record.error is not None:
            self._dead_letter(message, record.error or "no request", record)
            return
        if began is None:
            began = self._clock.seconds()
        try:
            outcome = await deliver(lambda: self._attempt(unit, record.request), self.policy,
                                    self._clock,
                                    on_retry=lambda n, reason, wait: self._retrying(unit, n, reason, wait),
                                    cancelled=lambda: unit.cancelled, gate=_Gate(self, unit),
                                    success=self._success, first=first)
        except CancelledError:
            return  # abandoned: the message stays unfinished, and is not committed
        if outcome.delivered:
            self._delivered(message, record, outcome.status, began, outcome.body, outcome.retried)
            return
        self.stats.retried += outcome.retried
        self.stats.failed += 1
        self._dead_letter(message, outcome.reason, record, status=outcome.status,
                          attempts=outcome.attempts, began=began, body=outcome.body)

    def _attempt(self, unit: _Unit, request: Outgoing | None) -> Deferred[Answer]:
        assert request is not None

        def send(_: Any = None) -> Deferred[Answer]:
            # Signed at each attempt: a retry carries a fresh timestamp, its id unchanged.
            signed = request if self._signer is None else self._signer.sign(request, self._clock.seconds())
            if self._oauth is None:
                return one(signed)
            return Deferred.fromCoroutine(self._with_token(one, signed))

        def one(sent_request: Outgoing) -> Deferred[Answer]:
            unit.sending = True
            began = self._clock.seconds()
            if self._result_topic is None:
                d = self._sender.send(sent_request, self._timeout, self._redirects, self._ca_cert)
            else:  # the result holds up to 64 KiB of the answer's body
                d = self._sender.send(sent_request, self._timeout, self._redirects, self._ca_cert,
                                      keep=RESULT_BODY)

            def sent(result: Any) -> Any:
                unit.sending = False
                if isinstance(result, Answer):
                    status: int | None = result.status
                elif unit.cancelled or result.check(DestinationRefused):
                    return result  # nothing was answered: abandoned, or never sent
                else:
                    status = None
                self._metrics.answered(self.job.id, status, self._clock.seconds() - began)
                return result

            return d.addBoth(sent)

        if self._ratelimit <= 0:
            return send()
        # Every attempt, retries too, keeps the job's pace.
        self._pacer.every = self._ratelimit
        return self._pacer.turn().addCallback(send)

    # -- batches -------------------------------------------------------------------------

    def _batch_add(self, tp: TP, message: _Message, record: RecordWork) -> None:
        request = record.request
        assert request is not None and self._batch is not None
        for items in self._batcher.add(tp, (message, record), len(request.body or b"")):
            self._batch_ready(tp, items)
        if self._batcher.pending(tp):
            if tp not in self._flush_timers:
                self._flush_timers[tp] = self._clock.callLater(self._batch["max_wait"], self._flush, tp)
        else:
            self._cancel_flush(tp)

    def _flush(self, tp: TP) -> None:
        self._flush_timers.pop(tp, None)
        items = self._batcher.take(tp)
        if items:
            self._batch_ready(tp, items)
            self._pump()

    def _batch_ready(self, tp: TP, items: list[tuple[_Message, RecordWork]]) -> None:
        # One batch per partition under way at a time: the partition is the order group.
        self._scheduler.add(tp, _Unit(items[0][0], items[0][1], next(self._seq), batch=items))

    def _cancel_flush(self, tp: TP) -> None:
        timer = self._flush_timers.pop(tp, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _drop_batch(self, tp: TP) -> None:
        self._cancel_flush(tp)
        if self._batch is not None:
            self._batcher.take(tp)

    def _batch_request(self, items: list[tuple[_Message, RecordWork]]) -> Outgoing:
        assert self._batch is not None
        first = items[0][1].request
        assert first is not None
        body = batch_body([r.request.body or b"" for _, r in items if r.request is not None],
                          self._batch["format"])
        if self._idempotency or self._signer is not None:
            incoming = items[0][0].prepared.incoming
            last = items[-1][0].prepared.incoming.offset
            key = f"{self.job.id}:{incoming.topic}:{incoming.partition}:{incoming.offset}-{last}"
            if not self._idempotency:
                return Outgoing(first.method, first.url, self._batch_headers, body, None, False, key)
            headers = {**self._batch_headers, b"Idempotency-Key": [key.encode()]}
            return Outgoing(first.method, first.url, headers, body, None, True, key)
        return Outgoing(first.method, first.url, self._batch_headers, body)

    async def _run_batch(self, unit: _Unit, items: list[tuple[_Message, RecordWork]]) -> None:
        """Send a batch; a batch refused with a non-retryable 4xx is split in halves, sent
        one after the other, until the refused records are alone: only those are dead-lettered."""
        request = self._batch_request(items)
        began = self._clock.seconds()
        try:
            outcome = await deliver(lambda: self._attempt(unit, request), self.policy, self._clock,
                                    on_retry=lambda n, reason, wait: self._retrying(unit, n, reason, wait),
                                    cancelled=lambda: unit.cancelled, gate=_Gate(self, unit),
                                    success=self._success)
        except CancelledError:
            return
        self.stats.retried += outcome.retried
        if outcome.delivered:
            now = self._clock.seconds()
            self._metrics.delivered(self.job.id, len(items))
            for message, record in items:
                self.stats.delivered_one(now)
                self._result(message, record.index, "delivered", outcome.status, began, outcome.body)
                self._record_ended(message, settle=False)
            self._settle({unit.tp})
            return
        refused = outcome.status is not None and 400 <= outcome.status < 500 and \
            "retries exhausted" not in outcome.reason
        if refused and len(items) > 1:
            half = len(items) // 2
            await self._run_batch(unit, items[:half])
            if unit.cancelled:
                return  # revoked or stopped: the second half is not sent
            await self._run_batch(unit, items[half:])
            return
        for message, record in items:
            self.stats.failed += 1
            self._dead_letter(message, outcome.reason, record, status=outcome.status,
                              attempts=outcome.attempts, began=began, body=outcome.body)

    async def _with_token(self, one: Callable[[Outgoing], Deferred[Answer]],
                          request: Outgoing) -> Answer:
        """Send with the job's OAuth2 token; on a 401, once more with a new token."""
        assert self._oauth is not None
        token = await self._oauth.token()
        answer = await one(_authorized(request, token))
        if answer.status == 401:
            self._oauth.rejected(token)
            token = await self._oauth.token()
            answer = await one(_authorized(request, token))
        return answer

    def _retrying(self, unit: _Unit, attempt: int, reason: str, wait: float) -> None:
        if unit.revoking:
            # Its partition goes as soon as this request has ended: no retry on it.
            unit.cancelled = True
        self._note_error(reason)
        self._metrics.retried(self.job.id)
        incoming = unit.message.prepared.incoming
        log.warn("job {job_id}: {topic}[{partition}]@{offset} entity {entity}: attempt {attempt} "
                 "failed ({reason}); retrying in {wait:.1f} s", job_id=self.job.id,
                 topic=incoming.topic, partition=incoming.partition, offset=incoming.offset,
                 entity=unit.record.entity if unit.record else None, attempt=attempt,
                 reason=reason, wait=wait)

    def _note_error(self, reason: str) -> None:
        self.stats.last_error = reason
        self.stats.last_error_at = self._clock.seconds()

    # -- outcomes ------------------------------------------------------------------------

    def _record_ended(self, message: _Message, settle: bool = True) -> None:
        message.open_records -= 1
        if message.open_records == 0 and message.open_acks == 0:
            self._finish(message, settle)

    def _dead_letter(self, message: _Message, reason: str, record: RecordWork | None, *,
                     status: int | None = None, attempts: int = 0, began: float | None = None,
                     body: bytes = b"") -> None:
        """Produce the dead letter; the record has ended, the message waits for the ack."""
        incoming = message.prepared.incoming
        self._result(message, record.index if record is not None else 0, "dead_lettered", status,
                     began, body, reason)
        self._note_error(reason)
        log.error("job {job_id}: {topic}[{partition}]@{offset} entity {entity}: dead-lettered: "
                  "{reason}", job_id=self.job.id, topic=incoming.topic, partition=incoming.partition,
                  offset=incoming.offset, entity=record.entity if record else None, reason=reason)
        headers = dead_letter_headers(self.job.id, incoming, reason,
                                      record=record.index if record is not None else None,
                                      status=status, attempts=attempts)
        self._awaiting_ack(message, self._produce(message, headers), self._dead_letter_acked)
        self._record_ended(message)

    def _dead_letter_acked(self) -> None:
        self.stats.dead_lettered += 1
        self._metrics.dead_lettered(self.job.id)

    def _result(self, message: _Message, index: int, outcome: str, status: int | None,
                began: float | None, body: bytes, reason: str | None = None) -> None:
        """Produce the record's result to the job's ``result_topic`` (SPEC §12), if it has
        one: the message's offset waits for Kafka's acknowledgement, as for a dead letter."""
        if self._result_topic is None:
            return
        incoming = message.prepared.incoming
        duration = 0.0 if began is None else max(0.0, self._clock.seconds() - began)
        result: dict[str, Any] = {
            "job": self.job.id,
            "source": {"topic": incoming.topic, "partition": incoming.partition,
                       "offset": incoming.offset, "record": index},
            "status": status, "duration_ms": round(duration * 1000, 3), "outcome": outcome,
            "response": _response(body[:RESULT_BODY]),
        }
        if reason is not None:
            result["reason"] = reason
        value = json.dumps(result, separators=(",", ":"), ensure_ascii=False).encode()
        # Held until Kafka has it: part of the message's bytes (released when it finishes).
        message.size += len(value)
        self._budget.charge(self.job.id, len(value))
        self._awaiting_ack(message, self._produce(message, [], self._result_topic, value))

    def _awaiting_ack(self, message: _Message, producing: Coroutine[Any, Any, None],
                      counted: Callable[[], None] | None = None) -> None:
        """The message's offset waits for Kafka to acknowledge what ``producing`` produces (a
        dead letter or a result); once it has, ``counted`` is called and the message may finish."""
        message.open_acks += 1
        d = Deferred.fromCoroutine(producing)
        acks = self._acks.setdefault(message.ticket.tp, set())
        acks.add(d)

        def acked(_: Any) -> None:
            acks.discard(d)
            if not self.ledger.current(message.ticket):
                return
            if counted is not None:
                counted()
            message.open_acks -= 1
            if message.open_records == 0 and message.open_acks == 0:
                self._finish(message)

        d.addCallbacks(acked, _forget, errbackArgs=(acks, d))

    async def _produce(self, message: _Message, headers: list[tuple[str, bytes]],
                       topic: str | None = None, value: bytes | None = None) -> None:
        """Produce until Kafka has it (the dead letter, or ``value`` to ``topic``); gives up
        only when its partition is no longer ours."""
        incoming = message.prepared.incoming
        if topic is None:
            topic, value = self.job.dead_letter_topic, incoming.value
        wait = 0.5
        while True:
            try:
                await self._dead_letters.send(topic, incoming.key, value, headers)
                return
            except CancelledError:
                raise
            except Exception as e:
                if self._stopping or not self.ledger.current(message.ticket):
                    raise CancelledError("its partition is gone") from e
                log.error("job {job_id}: cannot produce {topic}[{partition}]@{offset} to "
                          "{dlt}: {error}; trying again in {wait:.1f} s", job_id=self.job.id,
                          topic=incoming.topic, partition=incoming.partition,
                          offset=incoming.offset, dlt=topic, error=str(e), wait=wait)
                await deferLater(self._clock, wait * (0.5 + random.random()), lambda: None)
                wait = min(wait * 2, 30.0)

    def _finish(self, message: _Message, settle: bool = True) -> None:
        """The message is done: out of the ledger and the budget; with ``settle``, its
        commit point goes to the Kafka loop and its partition is checked (a batch settles
        once for all its messages)."""
        ticket = message.ticket
        held = self._held.get(ticket.tp)
        if held is None or held.get(ticket.offset) is not message:
            return  # revoked meanwhile: released and committed then
        del held[ticket.offset]
        self._budget.release(self.job.id, message.size)
        self.ledger.finished(ticket)
        if settle:
            self._settle({ticket.tp})

    def _settle(self, partitions: set[TP]) -> None:
        due = self.ledger.take_due()
        if due:
            self.loop.commit(due)
        for tp in partitions:
            self._check(tp)

    # -- the circuit ---------------------------------------------------------------------

    @property
    def held(self) -> bool:
        """Whether the job is held: its endpoint's circuit is open, or the Schema Registry
        it waits for is down (SPEC §5: both are outages)."""
        return self.circuit.is_open or self._registry_down is not None

    def circuit_status(self) -> dict[str, Any]:
        """``{"state", "since", "reason"}`` of the job's circuit on this instance (an
        unreachable Schema Registry holds it open too)."""
        c = self.circuit
        if c.is_open:
            since, reason = c.since, c.reason
        elif self._registry_down is not None:
            reason, since = self._registry_down
        else:
            return {"state": "closed", "since": None, "reason": None}
        at = None if since is None else datetime.datetime.fromtimestamp(
            since, datetime.UTC).isoformat().replace("+00:00", "Z")
        return {"state": "open", "since": at, "reason": reason}

    def _verdict(self, unit: _Unit, verdict: Verdict) -> None:
        if verdict.delivered:
            if self.circuit.succeeded():
                self._closed()
        elif not verdict.retryable:
            if verdict.answered:
                self.circuit.answered()
        else:
            if verdict.retry_after is not None:
                self._probe_wait = self.policy.honoured(verdict.retry_after)
            if self.circuit.failed(unit.seq, verdict.reason, self._clock.seconds()):
                self._opened()

    def _open(self, reason: str) -> None:
        if self.circuit.open(reason, self._clock.seconds()):
            self._opened()

    def _opened(self) -> None:
        log.warn("job {job_id}: circuit open, the endpoint looks down ({reason}); taking no new "
                 "messages, probing every {every:.1f} s", job_id=self.job.id,
                 reason=self.circuit.reason, every=self._probe_interval())
        self._note_error(f"circuit open: {self.circuit.reason}")
        self._pause_all()
        self._schedule_probe()

    def _closed(self) -> None:
        log.info("job {job_id}: circuit closed, the endpoint answers again", job_id=self.job.id)
        if self._probe_timer is not None and self._probe_timer.active():
            self._probe_timer.cancel()
        self._probe_timer = None
        self._probe_wait = None
        parked, self._parked = self._parked, {}
        for d in parked.values():
            d.callback(None)
        for tp in list(self._paused):
            self._check(tp)
        self._pump()

    def _probe_interval(self) -> float:
        wait = self.policy.max_wait
        return max(wait, self._probe_wait) if self._probe_wait is not None else wait

    def _schedule_probe(self) -> None:
        if self._probe_timer is None or not self._probe_timer.active():
            self._probe_timer = self._clock.callLater(self._probe_interval(), self._probe)

    def _probe(self) -> None:
        self._probe_timer = None
        if not self.circuit.is_open or self._stopping:
            return
        self._probe_wait = None
        if not self._parked:
            # Nothing waits (revoked meanwhile): start the next record; it will wait its turn.
            self._probe_start = True
            self._pump()
            self._schedule_probe()
            return
        oldest = min(self._parked, key=lambda u: u.seq)
        self._parked.pop(oldest).callback(None)

    def _park(self, unit: _Unit) -> Deferred[None]:
        def cancel(_: Deferred[None]) -> None:
            self._parked.pop(unit, None)

        d: Deferred[None] = Deferred(cancel)
        self._parked[unit] = d
        self._schedule_probe()
        return d

    # -- pausing -------------------------------------------------------------------------

    def _check(self, tp: TP) -> None:
        """Pause ``tp`` over the budget or past the window; resume it when there is room."""
        if not self.ledger.assigned(tp):
            return
        ledger = self.ledger
        window = ledger.window(tp)
        full = window > MAX_WINDOW
        if tp in self._paused:
            if window > RESUME_WINDOW or self.held:
                return
            # Messages waiting for their schema are held too, though not in the ledger yet.
            if (ledger.unfinished(tp) == 0 and not self._schema_queue) or self._budget.room(self.job.id):
                self._paused.discard(tp)
                self.loop.resume(tp)
            return
        if full or (ledger.unfinished(tp) > 0 and self._budget.over(self.job.id)):
            self._paused.add(tp)
            self.loop.pause(tp)
            if not full:
                self._budget.wait(self.job.id, self._room)

    def _pause_all(self) -> None:
        """Pause every assigned partition (the job is held)."""
        for tp in self.ledger.partitions():
            if tp not in self._paused:
                self._paused.add(tp)
                self.loop.pause(tp)

    def _room(self) -> None:
        for tp in list(self._paused):
            self._check(tp)


class _Pacer:
    """Lets one waiter go at a time, at least ``every`` seconds after the last one went —
    measured when it really went, so a late wake-up never shortens the next gap."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.every = 0.0
        self._waiting: deque[Deferred[None]] = deque()
        self._last = float("-inf")
        self._timer: Any = None

    def turn(self) -> Deferred[None]:
        """Fires when it is this caller's turn; cancelling it gives the turn up."""
        d: Deferred[None] = Deferred(lambda d: self._waiting.remove(d) if d in self._waiting else None)
        self._waiting.append(d)
        self._schedule()
        return d

    def _schedule(self) -> None:
        if not self._waiting or (self._timer is not None and self._timer.active()):
            return
        delay = self._last + self.every - self._clock.seconds()
        if delay <= 0:
            self._release()
        else:
            self._timer = self._clock.callLater(delay, self._release)

    def _release(self) -> None:
        self._timer = None
        if self._waiting:
            self._last = self._clock.seconds()
            self._waiting.popleft().callback(None)
        self._schedule()


class _Gate:
    """The job's circuit as one record's retry loop sees it."""

    def __init__(self, runner: JobRunner, unit: _Unit) -> None:
        self._runner = runner
        self._unit = unit

    @property
    def good(self) -> int:
        return self._runner.circuit.good

    def is_open(self) -> bool:
        return self._runner.circuit.is_open

    def park(self) -> Deferred[None]:
        return self._runner._park(self._unit)

    def verdict(self, verdict: Verdict) -> None:
        self._runner._verdict(self._unit, verdict)

    def open(self, reason: str) -> None:
        self._runner._open(reason)


def _prepare_again(builder: RequestBuilder, waiting: list[Prepared], order: Any,
                   schemas: Any) -> list[Prepared]:
    """Off the reactor: decode and map again the messages that waited for their schema."""
    return [prepare(builder, p.incoming, order, schemas) for p in waiting]


def _forget(_: Any, waiting: set[Deferred[None]], d: Deferred[None]) -> None:
    """An ack that will not come (cancelled): stop waiting for it."""
    waiting.discard(d)


def _observe(d: Deferred[Any]) -> Deferred[None]:
    """A Deferred that fires when ``d`` does, leaving ``d``'s result alone."""
    seen: Deferred[None] = Deferred()
    def fire(result: Any) -> Any:
        if not seen.called:
            seen.callback(None)
        return result

    d.addBoth(fire)
    return seen


def _response(body: bytes) -> dict[str, str]:
    """An answer's body as a result shows it: UTF-8 text as it is, anything else base64."""
    try:
        return {"body": body.decode("utf-8"), "encoding": "text"}
    except UnicodeDecodeError:
        return {"body": base64.b64encode(body).decode("ascii"), "encoding": "base64"}


def _authorized(request: Outgoing, token: str) -> Outgoing:
    headers = {**request.headers, b"Authorization": [b"Bearer " + token.encode("latin-1", "replace")]}
    return dataclasses.replace(request, headers=headers, own_headers=True)
