"""The Kafka loop of one job: a confluent-kafka consumer living on a thread of its own.

Every poll, commit, pause and close happens on the job's one-thread pool, one hop per
batch. What the reactor wants done to the consumer (commit these offsets, pause or
resume those partitions) is queued under a lock and carried out at the next hop.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

__all__ = ["TP", "KafkaLoop", "LoopHandler", "consumer_config"]

TP = tuple[str, int]
log = Logger()


def _daemon_thread(*args: Any, **kwargs: Any) -> threading.Thread:
    thread = threading.Thread(*args, **kwargs)
    thread.daemon = True
    return thread


class LoopHandler(Protocol):
    """What a :class:`KafkaLoop` tells, on the reactor thread."""

    def messages(self, batch: list[Message], epochs: dict[TP, int]) -> None:
        """A batch of messages; ``epochs`` gives each partition's assignment epoch."""

    def revoked(self, partitions: list[TP]) -> Deferred[Any]:
        """These partitions are being taken away: stop them; fire once nothing of them is
        under way any more (their last offsets are committed after that)."""


def consumer_config(base: dict[str, Any], job_id: str) -> dict[str, Any]:
    """A job's consumer settings: sensible defaults, then the operator's, then what must hold."""
    return {
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "roundrobin",
        "session.timeout.ms": 10000,
        "heartbeat.interval.ms": 1000,
        **base,
        "group.id": f"restconsumer.{job_id}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": False,
    }


class KafkaLoop:
    """Polls a job's topics in batches and commits what the job has finished.

    Offsets reported through :meth:`finished` are committed at the next hop, on revocation
    and on close; a report for a partition revoked since (an old epoch) is ignored, so a
    stale offset is never committed.
    """

    def __init__(self, reactor: Any, name: str, config: dict[str, Any], topics: list[str],
                 handler: LoopHandler, *, batch: int = 1000, poll_timeout: float = 0.1,
                 revoke_grace: float = 10.0, close_timeout: float = 15.0) -> None:
        self._reactor = reactor
        self.name = name
        self._config = config
        self.topics = topics
        self._handler = handler
        self._batch = batch
        self._poll_timeout = poll_timeout
        self._revoke_grace = revoke_grace
        self._close_timeout = close_timeout
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=f"kafka-{name}")
        # A daemon thread: one stuck in librdkafka's close never keeps the process alive.
        self._pool.threadFactory = _daemon_thread
        self._consumer: Consumer | None = None
        self._lock = threading.Lock()
        self._finished: dict[TP, int] = {}
        self._committed: dict[TP, int] = {}
        self._epoch: dict[TP, int] = {}
        self._pause: set[TP] = set()
        self._resume: set[TP] = set()
        self._assigned: set[TP] = set()
        self._stopping = False
        self._hop: Deferred[Any] | None = None
        self._closed: Deferred[None] | None = None
        self._later: Any = None
        self._last_error = 0.0
        self._base: dict[TP, int] = {}
        self._lag_at = 0.0
        self.assignment: list[TP] = []
        #: Messages not yet finished, per assigned partition (refreshed about every second).
        self.lag: dict[TP, int] = {}

    # -- reactor side --------------------------------------------------------------------

    def start(self) -> None:
        """Create the consumer on its thread and start polling."""
        self._pool.start()
        self._hop = deferToThreadPool(self._reactor, self._pool, self._create)
        self._hop.addCallbacks(lambda _: self._next(), self._failed)

    def finished(self, tp: TP, epoch: int, next_offset: int) -> None:
        """Everything of ``tp`` before ``next_offset`` is done (delivered or dead-lettered)."""
        with self._lock:
            if self._epoch.get(tp, 0) == epoch:
                self._finished[tp] = next_offset

    def pause(self, tp: TP) -> None:
        """Stop fetching ``tp`` (polling goes on, so the group membership is kept)."""
        with self._lock:
            self._resume.discard(tp)
            self._pause.add(tp)

    def resume(self, tp: TP) -> None:
        """Fetch ``tp`` again."""
        with self._lock:
            self._pause.discard(tp)
            self._resume.add(tp)

    def stop(self) -> Deferred[None]:
        """Stop polling, commit what is finished and close the consumer; fires when closed."""
        if self._closed is not None:
            return self._closed
        self._stopping = True
        if self._later is not None and self._later.active():
            self._later.cancel()
        hop = self._hop if self._hop is not None else succeed(None)
        waiting: Deferred[Any] = Deferred()
        hop.addBoth(lambda r: (waiting.callback(None), r)[1])

        def close(_: Any) -> Deferred[bool]:
            # librdkafka's close can wait without end for a group coordinator that is gone:
            # past close_timeout the job lets go of its (daemon) thread instead of hanging.
            closing = deferToThreadPool(self._reactor, self._pool, self._close)
            closing.addErrback(lambda f: log.failure("job {name}: closing the consumer failed",
                                                     f, name=self.name))
            outcome: Deferred[bool] = Deferred()
            closing.addBoth(lambda _: outcome.called or outcome.callback(True))

            def give_up() -> None:
                if not outcome.called:
                    log.warn("job {name}: the Kafka consumer did not close within {timeout} s "
                             "(is Kafka reachable?); leaving it behind", name=self.name,
                             timeout=self._close_timeout)
                    outcome.callback(False)

            timer = self._reactor.callLater(self._close_timeout, give_up)
            outcome.addBoth(lambda r: (timer.active() and timer.cancel(), r)[1])
            return outcome

        def stop_thread(closed: bool) -> Deferred[Any] | None:
            if not closed:
                return None  # its thread is still inside close(); joining it would hang
            # Joining the thread is done off the reactor thread.
            pool = self._reactor.getThreadPool()
            return deferToThreadPool(self._reactor, pool, self._pool.stop).addBoth(lambda _: None)

        self._closed = waiting.addCallback(close).addCallback(stop_thread)
        return self._closed

    def _next(self) -> None:
        if self._stopping:
            return
        self._hop = deferToThreadPool(self._reactor, self._pool, self._poll)
        self._hop.addCallbacks(self._got, self._failed)

    def _got(self, result: tuple[list[Message], dict[TP, int]]) -> None:
        self._hop = None
        batch, epochs = result
        if batch and not self._stopping:
            try:
                self._handler.messages(batch, epochs)
            except Exception:
                log.failure("job {name}: handling a batch failed", name=self.name)
        self._next()

    def _failed(self, failure: Any) -> None:
        self._hop = None
        if self._stopping:
            return
        log.failure("job {name}: the Kafka loop failed; trying again in 1 s", failure, name=self.name)
        self._later = self._reactor.callLater(1.0, self._again)

    def _again(self) -> None:
        self._later = None
        if self._consumer is None:
            self._hop = deferToThreadPool(self._reactor, self._pool, self._create)
            self._hop.addCallbacks(lambda _: self._next(), self._failed)
        else:
            self._next()

    # -- consumer thread -----------------------------------------------------------------

    def _create(self) -> None:
        self._consumer = Consumer({**self._config, "on_commit": self._on_commit})
        self._consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                 on_lost=self._on_revoke)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        try:
            # Where each partition starts, for the lag until something is finished there.
            for tp in consumer.committed(partitions, timeout=5):
                if tp.offset >= 0:
                    self._base[(tp.topic, tp.partition)] = tp.offset
        except KafkaException as e:
            log.warn("job {name}: cannot read committed offsets: {error}", name=self.name, error=str(e))
        with self._lock:
            self._assigned.update(tps)
            self.assignment = sorted(self._assigned)
        log.info("job {name}: assigned {partitions}", name=self.name,
                 partitions=", ".join(f"{t}[{p}]" for t, p in tps) or "nothing")

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        if tps:
            # Let the requests under way end (a while at most) before committing, so the
            # next owner starts after them instead of sending them again alongside.
            settled = threading.Event()
            self._reactor.callFromThread(self._revoke, tps, settled)
            if not settled.wait(self._revoke_grace):
                log.warn("job {name}: requests still under way on revoked partitions after "
                         "{grace} s; they may be sent again by the next owner", name=self.name,
                         grace=self._revoke_grace)
        self._commit(only=set(tps), asynchronous=False, force=True)
        with self._lock:
            for tp in tps:
                self._epoch[tp] = self._epoch.get(tp, 0) + 1
                self._finished.pop(tp, None)
                self._committed.pop(tp, None)
                self._pause.discard(tp)
                self._resume.discard(tp)
                self._assigned.discard(tp)
                self._base.pop(tp, None)
            self.assignment = sorted(self._assigned)
            self.lag = {tp: n for tp, n in self.lag.items() if tp in self._assigned}

    def _revoke(self, tps: list[TP], settled: threading.Event) -> None:
        try:
            d = self._handler.revoked(tps)
        except Exception:
            log.failure("job {name}: letting go of partitions failed", name=self.name)
            settled.set()
            return
        d.addBoth(lambda _: settled.set())

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        # Runs on the consumer thread, inside consume(): an asynchronous commit that failed
        # is forgotten, so that the next hop makes it again.
        failed = [(p.topic, p.partition) for p in partitions if error is not None or p.error]
        if not failed:
            return
        with self._lock:
            for tp in failed:
                self._committed.pop(tp, None)
        if time.monotonic() - self._last_error > 30:
            self._last_error = time.monotonic()
            log.warn("job {name}: a commit failed ({error}); it is made again", name=self.name,
                     error=str(error) if error is not None else "partition error")

    def _commit(self, only: set[TP] | None = None, asynchronous: bool = True,
                force: bool = False) -> None:
        assert self._consumer is not None
        with self._lock:
            due = {tp: off for tp, off in self._finished.items()
                   if tp in self._assigned and (only is None or tp in only)
                   and (force or self._committed.get(tp) != off)}
        if not due:
            return
        offsets = [TopicPartition(t, p, off) for (t, p), off in due.items()]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=asynchronous)
        except KafkaException as e:
            if e.args and isinstance(e.args[0], KafkaError) and \
                    e.args[0].code() == KafkaError._NO_OFFSET:
                return
            log.warn("job {name}: commit failed: {error}", name=self.name, error=str(e))
            return
        with self._lock:
            self._committed.update(due)

    def _poll(self) -> tuple[list[Message], dict[TP, int]]:
        consumer = self._consumer
        assert consumer is not None
        with self._lock:
            pause = [TopicPartition(t, p) for t, p in self._pause if (t, p) in self._assigned]
            resume = [TopicPartition(t, p) for t, p in self._resume if (t, p) in self._assigned]
            self._pause.clear()
            self._resume.clear()
        try:
            if pause:
                consumer.pause(pause)
            if resume:
                consumer.resume(resume)
        except KafkaException as e:
            log.warn("job {name}: pause/resume failed: {error}", name=self.name, error=str(e))
        self._commit()
        if time.monotonic() - self._lag_at >= 1.0:
            self._lag_at = time.monotonic()
            self._measure_lag(consumer)
        batch = consumer.consume(num_messages=self._batch, timeout=self._poll_timeout)
        messages = []
        for message in batch:
            error = message.error()
            if error is None:
                messages.append(message)
            elif time.monotonic() - self._last_error > 30:
                self._last_error = time.monotonic()
                log.warn("job {name}: Kafka reports: {error}", name=self.name, error=error.str())
        with self._lock:
            epochs = {(m.topic(), m.partition()): 0 for m in messages}
            for tp in epochs:
                epochs[tp] = self._epoch.get(tp, 0)
        return messages, epochs

    def _measure_lag(self, consumer: Consumer) -> None:
        with self._lock:
            assigned = list(self._assigned)
            done = {tp: self._finished.get(tp, self._base.get(tp)) for tp in assigned}
        lag = {}
        for tp in assigned:
            try:
                low, high = consumer.get_watermark_offsets(TopicPartition(*tp), cached=True)
            except KafkaException:
                continue
            if high < 0:
                continue
            start = done[tp] if done[tp] is not None else max(low, 0)
            lag[tp] = max(0, high - start)
        self.lag = lag

    def _close(self) -> None:
        if self._consumer is None:
            return
        try:
            # close() revokes the assignment first: _on_revoke makes the final commit.
            self._consumer.close()
        finally:
            self._consumer = None
