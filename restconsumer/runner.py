"""One running job: its messages, partition by partition, through decode, mapping and delivery.

Messages of one partition are handled one after the other, in offset order; partitions
run side by side. A message is reported finished to the Kafka loop (and so committed)
only once every record of it was delivered or dead-lettered.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from restconsumer.consumer import TP, KafkaLoop, consumer_config
from restconsumer.decode import UndecodableMessage, decode
from restconsumer.delivery import Answer, DeadLetters, HTTPSender, RetryPolicy, deliver
from restconsumer.mapping import Outgoing, RequestBuilder, TemplateError
from restconsumer.model import DEFAULT_TIMEOUT, Job

__all__ = ["JobRunner", "JobStats"]

log = Logger()


@dataclass
class JobStats:
    """What a job has done since it started on this instance."""

    consumed: int = 0
    records: int = 0
    delivered: int = 0
    retried: int = 0
    dead_lettered: int = 0
    failed: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    started_at: float = 0.0
    delivered_times: deque[float] = field(default_factory=lambda: deque(maxlen=1000))


class _Partition:
    """The queue and worker of one assigned partition, for one assignment epoch."""

    def __init__(self, runner: JobRunner, tp: TP, epoch: int,
                 after: Deferred[None] | None = None) -> None:
        self.runner = runner
        self._after = after
        self.tp = tp
        self.epoch = epoch
        self.queue: deque[Message] = deque()
        self.dropped = False
        self.paused = False
        self.working: Deferred[None] | None = None
        self.sleep: Deferred[None] | None = None

    def add(self, message: Message) -> None:
        self.queue.append(message)
        if not self.paused and len(self.queue) >= self.runner.high_water:
            self.paused = True
            self.runner.loop.pause(self.tp)
        if self.working is None:
            self.working = Deferred.fromCoroutine(self._work())
            self.working.addErrback(lambda f: log.failure("job {job_id}: partition worker failed",
                                                          f, job_id=self.runner.job.id))

    def drop(self) -> None:
        """Forget what is queued and stop after the message under way (no retry waits)."""
        self.dropped = True
        self.queue.clear()
        if self.sleep is not None and not self.sleep.called:
            self.sleep.cancel()

    def sleeping(self, pause: Deferred[None] | None) -> None:
        self.sleep = pause

    async def nap(self, clock: IReactorTime, seconds: float) -> bool:
        """Wait ``seconds`` without blocking; False if the worker was dropped meanwhile."""
        pause = deferLater(clock, seconds, lambda: None)
        self.sleeping(pause)
        try:
            await pause
        except CancelledError:
            return False
        finally:
            self.sleeping(None)
        return True

    def done(self) -> Deferred[None]:
        """Fires once no message of this worker is under way any more."""
        waiter: Deferred[None] = Deferred()
        if self.working is None:
            waiter.callback(None)
        else:
            self.working.addBoth(lambda result: (waiter.callback(None), result)[1])
        return waiter

    async def _work(self) -> None:
        try:
            if self._after is not None:
                # The partition's previous worker (before a rebalance) may still have a
                # request under way: one partition never has two at once.
                after, self._after = self._after, None
                await after
            while self.queue and not self.dropped:
                message = self.queue.popleft()
                try:
                    finished = await self.runner.handle(message, self)
                except Exception as e:
                    # A bug must not skip the message: it is dead-lettered like a bad one.
                    log.failure("job {job_id}: handling {topic}[{partition}]@{offset} failed",
                                job_id=self.runner.job.id, topic=message.topic(),
                                partition=message.partition(), offset=message.offset())
                    finished = await self.runner.dead_letter(
                        message, self, f"internal error: {type(e).__name__}: {e}")
                if finished:
                    # Even once dropped: its epoch still holds until the revocation commits.
                    self.runner.loop.finished(self.tp, self.epoch, message.offset() + 1)
                if not finished or self.dropped:
                    break
                if self.paused and len(self.queue) <= self.runner.low_water:
                    self.paused = False
                    self.runner.loop.resume(self.tp)
        finally:
            self.working = None


class JobRunner:
    """Runs one job on this instance: a Kafka loop and a worker per assigned partition."""

    def __init__(self, job: Job, reactor: Any, kafka: dict[str, Any], sender: HTTPSender,
                 dead_letters: DeadLetters, *, clock: IReactorTime | None = None,
                 high_water: int = 2000, low_water: int = 500, stop_grace: float = 10.0) -> None:
        self._reactor = reactor
        self._clock = clock or reactor
        self._sender = sender
        self._dead_letters = dead_letters
        self.high_water = high_water
        self.low_water = low_water
        self._stop_grace = stop_grace
        self.stats = JobStats(started_at=self._clock.seconds())
        self._partitions: dict[TP, _Partition] = {}
        self._draining: dict[TP, Deferred[None]] = {}
        self._stopping = False
        self._next_slot = 0.0
        self._use(job)
        self.loop = KafkaLoop(reactor, job.id, consumer_config(kafka, job.id), job.topics, self)

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

    def start(self) -> None:
        """Start consuming."""
        log.info("job {job_id}: starting on {topics} (hash {hash})", job_id=self.job.id,
                 topics=", ".join(self.job.topics), hash=self.job.hash[:12])
        self.loop.start()

    def can_take(self, job: Job) -> bool:
        """Whether ``job`` can replace the running definition without a new consumer."""
        return job.topics == self.job.topics

    def update(self, job: Job) -> None:
        """Use a changed definition from the next record on (same topics, same consumer)."""
        log.info("job {job_id}: definition changed (hash {old} -> {new})", job_id=job.id,
                 old=self.job.hash[:12], new=job.hash[:12])
        self._use(job)

    def stop(self) -> Deferred[None]:
        """Stop: drop what is queued, let requests under way end, commit, close the consumer."""
        self._stopping = True
        working = []
        for partition in self._partitions.values():
            partition.drop()
            working.append(partition.done())
        working.extend(self._draining.values())
        self._partitions.clear()
        self._draining.clear()
        waited: Deferred[Any] = DeferredList(working) if working else succeed(None)
        if working:
            timer = self._clock.callLater(self._stop_grace, waited.cancel)
            waited.addBoth(lambda r: timer.cancel() if timer.active() else None)
        waited.addErrback(lambda _: None)
        d = waited.addCallback(lambda _: self.loop.stop())
        return d.addCallback(lambda _: log.info("job {job_id}: stopped", job_id=self.job.id))

    # -- from the Kafka loop -------------------------------------------------------------

    def messages(self, batch: list[Message], epochs: dict[TP, int]) -> None:
        """Queue each message on its partition's worker."""
        if self._stopping:
            return
        partitions = self._partitions
        for message in batch:
            tp = (message.topic(), message.partition())
            partition = partitions.get(tp)
            epoch = epochs[tp]
            if partition is None or partition.epoch != epoch:
                after = self._draining.pop(tp, None)
                if partition is not None:
                    partition.drop()
                    after = partition.done()
                partition = partitions[tp] = _Partition(self, tp, epoch, after)
            partition.add(message)

    def revoked(self, partitions: list[TP]) -> Deferred[Any]:
        """Let go of partitions given to another consumer; fires when none has a request
        under way."""
        waiting = []
        for tp in partitions:
            partition = self._partitions.pop(tp, None)
            if partition is not None:
                partition.drop()
                if partition.working is not None:
                    self._drain(tp, partition)
                    waiting.append(partition.done())
        return DeferredList(waiting) if waiting else succeed(None)

    def _drain(self, tp: TP, partition: _Partition) -> None:
        """Remember a revoked worker until its last request ends."""
        done = self._draining[tp] = partition.done()

        def forget(_: Any) -> None:
            if self._draining.get(tp) is done:
                del self._draining[tp]

        partition.done().addCallback(forget)

    # -- one message ---------------------------------------------------------------------

    def _meta(self, message: Message) -> dict[str, Any]:
        key = message.key()
        if key is not None:
            try:
                key = key.decode("utf-8")
            except UnicodeDecodeError:
                key = None
        kind, stamp = message.timestamp()
        return {"topic": message.topic(), "partition": message.partition(),
                "offset": message.offset(), "key": key,
                "timestamp": None if kind == TIMESTAMP_NOT_AVAILABLE else stamp}

    async def handle(self, message: Message, partition: _Partition) -> bool:
        """Deliver or dead-letter every record of ``message``; False if stopped half-way."""
        self.stats.consumed += 1
        try:
            records = decode(message.value())
        except UndecodableMessage as e:
            return await self.dead_letter(message, partition, str(e))
        meta = self._meta(message)
        for index, record in enumerate(records):
            if partition.dropped:
                return False
            builder = self.builder
            self.stats.records += 1
            try:
                values = builder.extract(builder.document(record.schema, record.msg, meta))
                request = builder.build(values)
            except TemplateError as e:
                if not await self.dead_letter(message, partition, str(e), record=index,
                                               entity=self._entity(record.msg)):
                    return False
                continue
            outcome = await deliver(
                lambda r=request: self._attempt(r, partition),
                self.policy, self._clock,
                on_retry=lambda attempt, reason, wait, r=request: self._retrying(
                    message, r.entity_id, attempt, reason, wait),
                cancelled=lambda: partition.dropped,
                sleeping=partition.sleeping,
            )
            self.stats.retried += outcome.retried
            if outcome.delivered:
                self.stats.delivered += 1
                self.stats.delivered_times.append(self._clock.seconds())
                continue
            if partition.dropped:
                return False
            self.stats.failed += 1
            if not await self.dead_letter(message, partition, outcome.reason, record=index,
                                           status=outcome.status, attempts=outcome.attempts,
                                           entity=request.entity_id):
                return False
        return True

    def _attempt(self, request: Outgoing, partition: _Partition) -> Deferred[Answer]:
        if self._ratelimit <= 0:
            return self._sender.send(request, self._timeout, self._redirects, self._ca_cert)

        async def in_turn() -> Answer:
            # Every attempt, retries too, keeps the job's pace.
            if not await self._wait_turn(partition):
                raise CancelledError("the job stopped while waiting for its turn")
            return await self._sender.send(request, self._timeout, self._redirects, self._ca_cert)

        return Deferred.fromCoroutine(in_turn())

    async def _wait_turn(self, partition: _Partition) -> bool:
        now = self._clock.seconds()
        slot = max(now, self._next_slot)
        self._next_slot = slot + self._ratelimit
        return slot <= now or await partition.nap(self._clock, slot - now)

    @staticmethod
    def _entity(msg: Any) -> Any:
        return msg.get("id") if isinstance(msg, dict) else None

    def _retrying(self, message: Message, entity: Any, attempt: int, reason: str, wait: float) -> None:
        self._note_error(reason)
        log.warn("job {job_id}: {topic}[{partition}]@{offset} entity {entity}: attempt {attempt} "
                 "failed ({reason}); retrying in {wait:.1f} s", job_id=self.job.id,
                 topic=message.topic(), partition=message.partition(), offset=message.offset(),
                 entity=entity, attempt=attempt, reason=reason, wait=wait)

    def _note_error(self, reason: str) -> None:
        self.stats.last_error = reason
        self.stats.last_error_at = self._clock.seconds()

    async def dead_letter(self, message: Message, partition: _Partition, reason: str, *,
                           record: int | None = None, status: int | None = None,
                           attempts: int = 0, entity: Any = None) -> bool:
        """Produce ``message`` to the dead-letter topic, trying until Kafka has it or we stop."""
        job = self.job
        self._note_error(reason)
        log.error("job {job_id}: {topic}[{partition}]@{offset} entity {entity}: dead-lettered: "
                  "{reason}", job_id=job.id, topic=message.topic(), partition=message.partition(),
                  offset=message.offset(), entity=entity, reason=reason)
        headers = [
            ("restconsumer.job", job.id.encode()),
            ("restconsumer.topic", message.topic().encode()),
            ("restconsumer.partition", str(message.partition()).encode()),
            ("restconsumer.offset", str(message.offset()).encode()),
            ("restconsumer.attempts", str(attempts).encode()),
            ("restconsumer.status", b"" if status is None else str(status).encode()),
            ("restconsumer.reason", reason.encode("utf-8", "replace")),
        ]
        if record is not None:
            headers.append(("restconsumer.record", str(record).encode()))
        headers.extend((k, v if v is not None else b"") for k, v in message.headers() or [])
        wait = 0.5
        while True:
            try:
                await self._dead_letters.send(job.dead_letter_topic, message.key(), message.value(),
                                              headers)
            except Exception as e:
                if partition.dropped:
                    return False
                log.error("job {job_id}: cannot dead-letter {topic}[{partition}]@{offset} to "
                          "{dlt}: {error}; trying again in {wait:.1f} s", job_id=job.id,
                          topic=message.topic(), partition=message.partition(),
                          offset=message.offset(), dlt=job.dead_letter_topic, error=str(e), wait=wait)
                if not await partition.nap(self._clock, wait * (0.5 + random.random())):
                    return False
                wait = min(wait * 2, 30.0)
                continue
            self.stats.dead_lettered += 1
            return True
