"""A job's Kafka consumer, on a thread of its own for its whole life (SPEC §1, §5).

The thread stays in its own loop: it polls with a bounded timeout, prepares what it
fetched (decode and datamap, through the handler's ``prepare``) and hands the batch to
the reactor — one hop per batch, none while idle. What the reactor has for it (offsets to
commit, partitions to pause or resume, stop) waits in a mailbox that the loop reads
between polls; confluent-kafka has no way to wake a poll, so the poll timeout is short
while a partition is paused (it may have to resume soon), a tenth of a second while work
goes on (offsets to commit come in), a second when idle, and five seconds once nothing
has happened for half a minute (200 idle jobs then wake their threads 40 times a second,
not 200); lag is measured every second while busy, every ten when idle.

Rebalance callbacks run on this thread, inside ``consume()``. A revocation asks the
reactor to let go of the partitions (requests under way end or are cancelled) and to
tell the offsets to commit, then commits them here before the partitions go; a lost
assignment commits nothing.

A commit never gets skipped while its partition is assigned: one refused (the group's
coordinator moving to another broker, ``NOT_COORDINATOR``, ``COORDINATOR_LOAD_IN_PROGRESS``,
``REQUEST_TIMED_OUT``…) is made again at the next turn, with the partition's latest offset;
a revoked partition's commit is made again for a while before the partition goes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from restconsumer.base.process import end_process
from restconsumer.base.types import TP

__all__ = ["PASSING_COMMIT_ERRORS", "KafkaLoop", "LoopHandler", "consumer_config", "passing_commit_error"]

log = Logger()


class _DaemonThread(threading.Thread):
    """A thread that never keeps the process alive (a ThreadPool's ``threadFactory``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.daemon = True


class LoopHandler(Protocol):
    """What a :class:`KafkaLoop` asks of its job."""

    def prepare(self, message: Message) -> Any:
        """On the Kafka thread: a fetched message made ready for delivery (never raises)."""

    def assigned(self, partitions: list[TP]) -> None:
        """On the reactor: these partitions are ours now."""

    def revoked(self, partitions: list[TP], lost: bool) -> Deferred[dict[TP, int]]:
        """On the reactor: let go of these partitions; fires with the offsets to commit once
        nothing of them is under way any more (``lost``: another consumer has them already)."""

    def arrived(self, batch: list[Any]) -> None:
        """On the reactor: a batch of prepared messages."""

    def cannot_start(self, reason: str) -> None:
        """On the reactor: librdkafka refused to create the consumer (a setting it does not
        take): the loop has ended; trying again would not help."""


#: What the classic group protocol takes and KIP-848's (``group.protocol=consumer``) refuses:
#: there the broker assigns and keeps the session (librdkafka 2.x: ``_INVALID_ARG``).
CLASSIC_ONLY = ("partition.assignment.strategy", "session.timeout.ms", "heartbeat.interval.ms")


def consumer_config(base: dict[str, Any], job_id: str) -> dict[str, Any]:
    """A job's consumer settings: sensible defaults, then the operator's, then what must hold.

    Rebalances are cooperative (``cooperative-sticky``): a member joining or leaving moves
    only the partitions that change hands; the others go on delivering throughout. With
    ``group.protocol=consumer`` (KIP-848, brokers 4.0+) the broker does so itself, and the
    classic protocol's settings are left out.
    """
    defaults: dict[str, Any] = {
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": 10000,
        # Each step of a rebalance waits for the members' next heartbeat: at 3 s, a
        # partition handed over in a rolling restart waited ~3 s (bench/rolling.py: max
        # 3.1 s); at 500 ms, 1.06 s. 200 idle jobs cost the same either way (bench/idle.py:
        # 13.2 % vs 13.1 % of a core, same machine, same hour). Fetches stay long-polled for
        # librdkafka's 500 ms: longer (2 s was tried) saved nothing measurable while idle,
        # and a partition resumed after its window was full could wait that long for its
        # next fetch, stalling a backlog for 1-1.5 s at each resume (batch mode: 22,000 ->
        # 40,000+ records/s).
        "heartbeat.interval.ms": 500,
        "fetch.wait.max.ms": 500,
    }
    if str(base.get("group.protocol", "classic")).lower() == "consumer":
        for name in CLASSIC_ONLY:
            defaults.pop(name)
    return {
        **defaults,
        **base,
        "group.id": f"restconsumer.{job_id}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": False,
    }


def _refused_settings(e: Exception) -> bool:
    error = e.args[0] if isinstance(e, KafkaException) and e.args and isinstance(e.args[0], KafkaError) \
        else None
    return error is not None and error.code() == KafkaError._INVALID_ARG


#: Commit errors that last only while a group's coordinator moves (its broker lost, a leader
#: being elected for its ``__consumer_offsets`` partition): asking again succeeds once it is back.
PASSING_COMMIT_ERRORS = frozenset({
    KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.REQUEST_TIMED_OUT, KafkaError.NETWORK_EXCEPTION,
    KafkaError.NOT_ENOUGH_REPLICAS, KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError._TIMED_OUT, KafkaError._TRANSPORT,
    KafkaError._WAIT_COORD, KafkaError._ALL_BROKERS_DOWN,
})


def passing_commit_error(error: KafkaError) -> bool:
    """Whether a commit refused with ``error`` may succeed if made again by this member."""
    return error.code() in PASSING_COMMIT_ERRORS


def _fatal(error: KafkaError) -> bool:
    # A fatal error reaches consume() as a message whose code is _FATAL (its fatal() may say no).
    return bool(error.fatal()) or error.code() == KafkaError._FATAL


class _Mailbox:
    """What the reactor has for the Kafka thread, under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.commits: dict[TP, int] = {}
        self.pause: set[TP] = set()
        self.resume: set[TP] = set()

    def take(self) -> tuple[dict[TP, int], set[TP], set[TP]]:
        with self.lock:
            taken = self.commits, self.pause, self.resume
            self.commits, self.pause, self.resume = {}, set(), set()
        return taken

    def forget(self, tps: list[TP]) -> None:
        with self.lock:
            for tp in tps:
                self.commits.pop(tp, None)
                self.pause.discard(tp)
                self.resume.discard(tp)


class KafkaLoop:
    """Polls a job's topics on the job's thread; commits, pauses and resumes as told."""

    def __init__(self, reactor: Any, name: str, config: dict[str, Any], topics: list[str],
                 handler: LoopHandler, *, consumer_factory: Callable[[dict[str, Any]], Any] = Consumer,
                 batch: int = 500, idle_poll: float = 1.0, busy_poll: float = 0.02,
                 commit_every: float = 0.1, quiet_poll: float = 5.0, quiet_after: float = 30.0,
                 answer_timeout: float = 120.0, close_timeout: float = 15.0,
                 revoke_commit_for: float = 10.0) -> None:
        self._reactor = reactor
        self.name = name
        self._config = config
        self.topics = topics
        self._handler = handler
        self._factory = consumer_factory
        self._batch = batch
        self._idle_poll = idle_poll
        self._busy_poll = busy_poll
        self._quiet_poll = quiet_poll
        self._quiet_after = quiet_after
        self._commit_every = commit_every
        self._answer_timeout = answer_timeout
        self._close_timeout = close_timeout
        self._revoke_commit_for = revoke_commit_for
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=f"kafka-{name}")
        # A daemon thread: one stuck in librdkafka's close never keeps the process alive.
        self._pool.threadFactory = _DaemonThread
        self._mail = _Mailbox()
        self._stop = threading.Event()
        # At most two batches on their way to the reactor: a busy reactor slows the thread.
        self._in_transit = threading.Semaphore(2)
        self._running: Deferred[None] | None = None
        self._closed: Deferred[None] | None = None
        self._consumer: Any = None
        # Thread-side state.
        self._assigned: set[TP] = set()
        self._paused: set[TP] = set()
        self._points: dict[TP, int] = {}
        self._committed: dict[TP, int] = {}
        self._base: dict[TP, int] = {}
        self._lag_at = 0.0
        self._busy = True
        self._active_at = time.monotonic()
        self._lag_stale = True
        self._last_warning = 0.0
        #: The assigned partitions (read from the reactor; replaced whole, never changed).
        self.assignment: list[TP] = []
        #: Messages not yet committed, per assigned partition (refreshed about every second).
        self.lag: dict[TP, int] = {}

    # -- reactor side --------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread: create the consumer, subscribe, poll until stopped."""
        self._pool.start()
        self._running = deferToThreadPool(self._reactor, self._pool, self._run)
        self._running.addErrback(lambda f: log.failure("job {name}: the Kafka loop failed", f,
                                                       name=self.name))

    def commit(self, offsets: dict[TP, int]) -> None:
        """Commit these offsets at the next turn of the loop."""
        if offsets:
            with self._mail.lock:
                self._mail.commits.update(offsets)

    def pause(self, tp: TP) -> None:
        """Stop fetching ``tp`` (polling goes on, so the group membership is kept)."""
        with self._mail.lock:
            self._mail.resume.discard(tp)
            self._mail.pause.add(tp)

    def resume(self, tp: TP) -> None:
        """Fetch ``tp`` again."""
        with self._mail.lock:
            self._mail.pause.discard(tp)
            self._mail.resume.add(tp)

    def taken(self) -> None:
        """The reactor has taken a batch: the thread may send the next one."""
        self._in_transit.release()

    def stop(self) -> Deferred[None]:
        """Stop polling and close the consumer (its revocation commits what is finished)."""
        if self._closed is not None:
            return self._closed
        self._stop.set()
        running = self._running if self._running is not None else succeed(None)
        closed: Deferred[bool] = Deferred()

        def close_once(_: object) -> None:
            if not closed.called:
                closed.callback(True)

        running.addBoth(close_once)

        def give_up(_: Any) -> bool:
            # librdkafka's close can wait without end for a coordinator that is gone: the
            # job lets go of its (daemon) thread instead of hanging the shutdown.
            log.warn("job {name}: the Kafka consumer did not close within {timeout} s "
                     "(is Kafka reachable?); leaving it behind", name=self.name,
                     timeout=self._close_timeout)
            return False

        closed.addTimeout(self._close_timeout, self._reactor)
        closed.addErrback(give_up)

        def stop_thread(done: bool) -> Deferred[Any] | None:
            if not done:
                return None  # its thread is still inside close(); joining it would hang
            pool = self._reactor.getThreadPool()
            return deferToThreadPool(self._reactor, pool, self._pool.stop).addBoth(lambda _: None)

        self._closed = closed.addCallback(stop_thread)
        return self._closed

    # -- the job's thread ----------------------------------------------------------------

    def _run(self) -> None:
        consumer = None
        while consumer is None and not self._stop.is_set():
            try:
                consumer = self._factory({**self._config, "on_commit": self._on_commit})
            except Exception as e:
                if _refused_settings(e):  # the same on every try: say so, once
                    log.error("job {name}: librdkafka cannot create its consumer: {error}",
                              name=self.name, error=str(e))
                    self._reactor.callFromThread(self._handler.cannot_start, str(e))
                    return
                log.warn("job {name}: cannot create its consumer: {error}; trying again in 2 s",
                         name=self.name, error=str(e))
                self._stop.wait(2.0)
                continue
            try:
                consumer.subscribe(self.topics, on_assign=self._on_assign,
                                   on_revoke=self._on_revoke, on_lost=self._on_lost)
            except Exception as e:
                log.warn("job {name}: cannot subscribe to {topics}: {error}; trying again in 2 s",
                         name=self.name, topics=", ".join(self.topics), error=str(e))
                if consumer is not None:
                    self._close(consumer)
                consumer = None
                self._stop.wait(2.0)
        if consumer is None:
            return
        self._consumer = consumer
        try:
            while not self._stop.is_set():
                self._turn(consumer)
        except KafkaException as e:
            error = e.args[0] if e.args and isinstance(e.args[0], KafkaError) else None
            if error is not None and _fatal(error):
                # e.g. fenced: another live member has this group.instance.id (static
                # membership); the older one must go, saying why (SPEC §6).
                log.critical("job {name}: Kafka ended this consumer: {error}; the process ends",
                             name=self.name, error=error.str())
                self._reactor.callFromThread(end_process, self._reactor, 1)
                return
            log.failure("job {name}: the Kafka loop failed", name=self.name)
            raise
        except Exception:
            log.failure("job {name}: the Kafka loop failed", name=self.name)
            raise
        finally:
            self._close(consumer)

    def _turn(self, consumer: Any) -> None:
        commits, pause, resume = self._mail.take()
        self._points.update((tp, o) for tp, o in commits.items() if tp in self._assigned)
        try:
            if to_pause := [tp for tp in pause if tp in self._assigned and tp not in self._paused]:
                consumer.pause([TopicPartition(t, p) for t, p in to_pause])
                self._paused.update(to_pause)
            if to_resume := [tp for tp in resume if tp in self._paused]:
                consumer.resume([TopicPartition(t, p) for t, p in to_resume])
                self._paused.difference_update(to_resume)
        except KafkaException as e:
            self._warn("pause/resume failed: {error}", error=str(e))
        self._commit(consumer)
        now = time.monotonic()
        # Every second while busy and once more just after (so a caught-up partition shows
        # lag 0 at once), every ten seconds when idle.
        if now - self._lag_at >= (1.0 if self._busy or self._lag_stale else 10.0):
            self._lag_stale = self._busy
            self._lag_at = now
            self._measure_lag(consumer)
        # Short while partitions are paused (one may resume) or work is going on (its offsets
        # come to be committed); long only when nothing happened the last turn.
        if self._paused:
            timeout = self._busy_poll
        elif self._busy:
            timeout = min(self._idle_poll, self._commit_every)
        elif now - self._active_at >= self._quiet_after:
            # Long quiet: a message or a rebalance still ends the wait at once; only what the
            # reactor asks (commits of late answers, a stop) waits a little longer.
            timeout = self._quiet_poll
        else:
            timeout = self._idle_poll
        # Wait for the first message only, then take what is already there: fetching never
        # waits to fill a batch.
        messages = consumer.consume(num_messages=1, timeout=timeout)
        self._busy = bool(messages) or bool(commits)
        if self._busy or pause or resume:
            self._active_at = time.monotonic()
        if messages and self._batch > 1:
            messages.extend(consumer.consume(num_messages=self._batch - 1, timeout=0))
        batch = []
        for message in messages:
            error = message.error()
            if error is None:
                batch.append(self._handler.prepare(message))
            elif _fatal(error):
                raise KafkaException(error)  # the consumer is done for (fenced...): see _run
            else:
                self._warn("Kafka reports: {error}", error=error.str())
        if batch:
            while not self._in_transit.acquire(timeout=0.5):
                if self._stop.is_set():
                    return
            self._reactor.callFromThread(self._deliver, batch)

    def _deliver(self, batch: list[Any]) -> None:
        try:
            self._handler.arrived(batch)
        except Exception:
            # The batch is not wholly in the ledger: fetching on would let the commit point
            # pass what it lost. The loop ends; its revocation commits what is finished.
            log.failure("job {name}: handling a batch failed; the job's consumer stops", name=self.name)
            self._stop.set()
        finally:
            self.taken()

    def _warn(self, text: str, **fields: Any) -> None:
        # Kafka's own errors can repeat many times a second: one line per 30 s.
        if time.monotonic() - self._last_warning > 30:
            self._last_warning = time.monotonic()
            log.warn("job {name}: " + text, name=self.name, **fields)

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        try:
            # Where each partition starts, for the lag until something is committed there.
            for tp in consumer.committed(partitions, timeout=5):
                if tp.offset >= 0:
                    self._base[(tp.topic, tp.partition)] = tp.offset
        except KafkaException as e:
            self._warn("cannot read committed offsets: {error}", error=str(e))
        self._assigned.update(tps)
        self._paused.difference_update(tps)
        try:
            # librdkafka may keep a partition paused across a rebalance; a new assignment
            # starts unpaused here and in the job, so it must in librdkafka too.
            consumer.resume(partitions)
        except KafkaException as e:
            self._warn("cannot resume assigned partitions: {error}", error=str(e))
        self.assignment = sorted(self._assigned)
        self._reactor.callFromThread(self._handler.assigned, tps)
        log.info("job {name}: assigned {partitions}", name=self.name,
                 partitions=", ".join(f"{t}[{p}]" for t, p in tps) or "nothing")

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self._let_go(consumer, partitions, lost=False)

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self._let_go(consumer, partitions, lost=True)

    def _let_go(self, consumer: Any, partitions: list[TopicPartition], lost: bool) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        if not tps:
            return
        answer: dict[TP, int] = {}
        settled = threading.Event()

        def ask() -> None:
            try:
                d = self._handler.revoked(tps, lost)
            except Exception:
                log.failure("job {name}: letting go of partitions failed", name=self.name)
                settled.set()
                return
            d.addCallback(answer.update)
            d.addErrback(lambda f: log.failure("job {name}: letting go of partitions failed", f,
                                               name=self.name))
            d.addBoth(lambda _: settled.set())

        self._reactor.callFromThread(ask)
        if not settled.wait(self._answer_timeout):
            # Without the job's word nothing is known to be finished: commit nothing.
            log.error("job {name}: no answer from the job about revoked partitions within {t} s; "
                      "committing nothing for them", name=self.name, t=self._answer_timeout)
            answer.clear()
        self._mail.forget(tps)
        if not lost:
            due = {tp: o for tp, o in answer.items() if o is not None and tp in self._assigned}
            if due:
                self._commit_revoked(consumer, due)
        for tp in tps:
            self._assigned.discard(tp)
            self._paused.discard(tp)
            self._points.pop(tp, None)
            self._committed.pop(tp, None)
            self._base.pop(tp, None)
        self.assignment = sorted(self._assigned)
        self.lag = {tp: n for tp, n in self.lag.items() if tp in self._assigned}
        log.info("job {name}: {how} {partitions}", name=self.name,
                 how="lost" if lost else "revoked", partitions=", ".join(f"{t}[{p}]" for t, p in tps))

    def _commit_revoked(self, consumer: Any, due: dict[TP, int]) -> None:
        """Commit the revoked partitions' offsets before they go (still ours until the callback
        returns): a commit refused while a coordinator moves (a broker lost, a new leader
        elected) is made again, for up to ``revoke_commit_for`` seconds; one the group refuses
        (a new generation, a partition gone) is not, since it cannot succeed."""
        deadline = time.monotonic() + self._revoke_commit_for
        wait = 0.1
        while True:
            error: KafkaError | None = None
            try:
                done = consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in due.items()],
                                       asynchronous=False)
            except KafkaException as e:
                error = e.args[0] if e.args and isinstance(e.args[0], KafkaError) else None
                if error is None:
                    log.warn("job {name}: committing revoked partitions failed: {error}",
                             name=self.name, error=str(e))
                    return
            else:
                failed = [p for p in done or [] if p.error is not None and (p.topic, p.partition) in due]
                if not failed:
                    return
                error = failed[0].error
                due = {(p.topic, p.partition): due[(p.topic, p.partition)] for p in failed}
            assert error is not None
            if not passing_commit_error(error) or time.monotonic() + wait > deadline:
                log.warn("job {name}: committing revoked partitions {partitions} failed: {error}",
                         name=self.name, partitions=", ".join(f"{t}[{p}]@{o}" for (t, p), o in due.items()),
                         error=error.str())
                return
            self._warn("committing revoked partitions failed ({error}); it is made again",
                       error=error.str())
            # On this job's Kafka thread, inside the revocation callback: the sleep holds only
            # this consumer, which may not return the partitions before their offsets are in.
            time.sleep(wait)
            wait = min(wait * 2, 1.0)

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        # Inside consume(), on this thread: a commit that failed is made again next turn.
        failed = [(p.topic, p.partition) for p in partitions if error is not None or p.error]
        for tp in failed:
            self._committed.pop(tp, None)
        if failed:
            self._warn("a commit failed ({error}); it is made again",
                       error=str(error) if error is not None else "partition error")

    def _commit(self, consumer: Any) -> None:
        due = {tp: o for tp, o in self._points.items() if self._committed.get(tp) != o}
        if not due:
            return
        try:
            consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in due.items()],
                            asynchronous=True)
        except KafkaException as e:
            self._warn("commit failed: {error}", error=str(e))
            return
        self._committed.update(due)

    def _measure_lag(self, consumer: Any) -> None:
        lag = {}
        for tp in list(self._assigned):
            try:
                low, high = consumer.get_watermark_offsets(TopicPartition(*tp), cached=True)
            except KafkaException:
                continue
            if high < 0:
                continue
            done = self._points.get(tp, self._base.get(tp))
            start = done if done is not None else max(low, 0)
            lag[tp] = max(0, high - start)
        self.lag = lag

    def _close(self, consumer: Any) -> None:
        try:
            # close() revokes the assignment first: the revocation makes the final commit.
            consumer.close()
        except Exception as e:
            log.warn("job {name}: closing the consumer failed: {error}", name=self.name, error=str(e))
        finally:
            self._consumer = None
