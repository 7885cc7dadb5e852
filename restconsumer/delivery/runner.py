"""One running job: the controller that wires the delivery core and keeps its lifecycle.

:class:`JobRunner` owns no rule of delivery itself; each belongs to one collaborator (see
the package's docstring). It builds them over the job's :class:`Settings` (swapped whole
on a change), hands the Kafka loop's batches, assignments and revocations to them, and
starts, updates and stops them. An unexpected exception while taking a batch in puts the
job in error on this instance: what is finished is committed, nothing more is fetched
past the hole, and ``on_error`` (the supervisor) restarts it.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, Message
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from restconsumer.base.types import TP
from restconsumer.delivery.attempt import Attempts
from restconsumer.delivery.breaker import Breaker
from restconsumer.delivery.budget import ByteBudget, prefetch_bytes
from restconsumer.delivery.circuit import Circuit
from restconsumer.delivery.concurrency import AdaptiveLimit
from restconsumer.delivery.deadletters import DeadLetters
from restconsumer.delivery.deliverer import Deliverer
from restconsumer.delivery.dispatch import Dispatcher
from restconsumer.delivery.intake import Intake, incoming_of
from restconsumer.delivery.ledger import Ledger
from restconsumer.delivery.metrics import Metrics
from restconsumer.delivery.outcomes import JobStats, Outcomes
from restconsumer.delivery.registry import SchemaRegistry
from restconsumer.delivery.sender import HTTPSender
from restconsumer.delivery.settings import Current, Settings
from restconsumer.delivery.units import Unit
from restconsumer.jobs.destinations import Destinations
from restconsumer.jobs.model import Job
from restconsumer.jobs.work import Prepared, prepare
from restconsumer.kafka.consumer import KafkaLoop, consumer_config

__all__ = ["JobRunner", "JobStats", "Shared"]

log = Logger()

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
    #: Owner → what its jobs may reach besides public addresses: every owner of the tokens
    #: file (SPEC §8); the jobs of an owner not in it are not limited.
    destinations: dict[str, Destinations] = field(default_factory=dict)

    def settings(self, job: Job) -> Settings:
        """The delivery settings of ``job``, its owner's limits included."""
        return Settings.of(job, self.destinations.get(job.owner))


class JobRunner:
    """Runs one job on this instance."""

    def __init__(self, job: Job, shared: Shared) -> None:
        self._shared = shared
        clock: IReactorTime = shared.clock or shared.reactor
        self._clock = clock
        self._budget = shared.budget
        self.current = current = Current(shared.settings(job))
        self.stats = stats = JobStats(started_at=clock.seconds())
        self.ledger = Ledger()
        #: Why the job broke on this instance (an exception taking a batch in), if it did.
        self.failure: str | None = None
        #: Told once when the job breaks (the supervisor restarts it).
        self.on_error: Callable[[JobRunner, str], None] | None = None
        self.breaker: Breaker[Unit] = Breaker(
            clock, lambda: current.settings.policy.max_wait, _seq, opened=self._opened,
            closed=self._closed, start_one=self._pump)
        #: ``max_in_flight: "auto"``: the job's concurrency, found from what the wire tells.
        self.concurrency = AdaptiveLimit(current.settings.max_in_flight)
        self.attempts = Attempts(clock, shared.sender, shared.metrics, current, shared.token_fetch,
                                 self.concurrency, on_answer=self._answer)
        self.outcomes = Outcomes(clock, current, self.ledger, shared.budget, shared.dead_letters,
                                 shared.metrics, stats, commit=self._commit, settled=self._settled)
        deliverer = Deliverer(clock, current, self.attempts, self.breaker, self.outcomes,
                              shared.metrics, note=self._note, broken=self._broken)
        self.dispatcher = Dispatcher(clock, current, self.breaker, deliverer.start, self.concurrency)
        self.intake = Intake(clock, current, self.ledger, self.outcomes, self.dispatcher, shared.budget,
                             stats, shared.metrics, None, held=lambda: self.held,
                             registry=shared.registry)
        self._summary = LoopingCall(self._summarize)
        self._summary.clock = clock
        self._summarized = (0, 0, 0)
        self._stopped: Deferred[None] | None = None
        self.loop = shared.loop_factory(
            shared.reactor, job.id, self._consumer_config(), job.topics, self,
            consumer_factory=shared.consumer_factory,
            # A stop waits for the revocation grace, but not for a close that Kafka being away
            # would make hang (SIGTERM ends within 20 s); a revocation that outlives it
            # releases nothing twice (Outcomes owns each message's bytes).
            **{"answer_timeout": shared.revoke_grace + 30.0,
               "close_timeout": max(15.0, shared.revoke_grace + 5.0),
               **shared.loop_options})
        self.intake.attach(self.loop)

    @property
    def job(self) -> Job:
        """The job's definition in force."""
        return self.current.settings.job

    @property
    def circuit(self) -> Circuit:
        """The job's circuit."""
        return self.breaker.circuit

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
        """Whether ``job`` can replace the running definition in place (same consumer, the
        records under way kept); if not, the job must be rebuilt."""
        return self.current.settings.takes_in_place(self._shared.settings(job))

    def update(self, job: Job) -> None:
        """Use a changed definition from now on (see :meth:`can_take`); raises, leaving the
        running one whole, if it cannot be used."""
        settings = self._shared.settings(job)
        if not self.current.settings.takes_in_place(settings):
            raise ValueError("this change needs the job rebuilt")
        log.info("job {job_id}: definition changed (hash {old} -> {new})", job_id=job.id,
                 old=self.job.hash[:12], new=job.hash[:12])
        self.current.settings = settings
        self._pump()

    def stop(self) -> Deferred[None]:
        """Stop: the consumer closes (its revocation ends or cancels what is under way and
        commits what is finished); fires once all is done."""
        if self._stopped is not None:
            return self._stopped
        self.intake.stop()
        self.dispatcher.stop()
        self.breaker.stop()
        self.attempts.stop()
        if self._summary.running:
            self._summary.stop()

        def closed(_: Any) -> None:
            # Whatever a consumer that would not close left behind is abandoned.
            self.dispatcher.cancel_all()
            self.outcomes.release_all()
            self._shared.running -= 1
            left = self._budget.forget(self.job.id)
            if left:
                log.error("job {job_id}: {left} bytes still counted after its stop", job_id=self.job.id,
                          left=left)
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

    # -- what the status and metrics read ------------------------------------------------

    @property
    def in_flight_limit(self) -> int:
        """The bound on requests under way now: the job's number, or the limit it found."""
        settings = self.current.settings
        return self.concurrency.limit if settings.adaptive else settings.max_in_flight

    @property
    def requests_on_the_wire(self) -> int:
        """Requests written and not yet answered (retry waits and pacing not counted)."""
        return self.concurrency.in_flight

    @property
    def held_bytes(self) -> int:
        """Bytes this job holds (its pre-fetch reservation included)."""
        return self._budget.held_by(self.job.id)

    @property
    def held(self) -> bool:
        """Whether the job is held: its endpoint's circuit is open, or the Schema Registry
        it waits for is down (SPEC §5: both are outages)."""
        schemas = self.intake.schemas
        return self.breaker.is_open or (schemas is not None and schemas.down is not None)

    def oldest_unfinished(self) -> dict[TP, float]:
        """Per partition: seconds its oldest unfinished message has waited."""
        return self.outcomes.oldest(self._clock.seconds())

    def circuit_status(self) -> dict[str, Any]:
        """``{"state", "since", "reason"}`` of the job's circuit on this instance (an
        unreachable Schema Registry holds it open too)."""
        c = self.breaker.circuit
        schemas = self.intake.schemas
        if c.is_open:
            since, reason = c.since, c.reason
        elif schemas is not None and schemas.down is not None:
            reason, since = schemas.down
        else:
            return {"state": "closed", "since": None, "reason": None}
        at = None if since is None else datetime.datetime.fromtimestamp(
            since, datetime.UTC).isoformat().replace("+00:00", "Z")
        return {"state": "open", "since": at, "reason": reason}

    # -- from the Kafka loop -------------------------------------------------------------

    def prepare(self, message: Message) -> Prepared:
        """On the Kafka thread: decode, map and build the requests of one message."""
        registry = self._shared.registry
        settings = self.current.settings  # one read: builder and order of one definition
        return prepare(settings.builder, incoming_of(message), settings.order,
                       registry.cache if registry is not None else None)

    def assigned(self, partitions: list[TP]) -> None:
        """These partitions are ours: a new assignment each."""
        for tp in partitions:
            self.ledger.assign(tp)
        self.intake.assigned(partitions)

    def arrived(self, batch: list[Prepared]) -> None:
        """Take a batch in; never raises (an exception breaks the job, see the module)."""
        if self.failure is not None:
            return
        try:
            self.intake.arrived(batch)
        except Exception as e:
            log.failure("job {job_id}: taking a batch in failed", job_id=self.job.id)
            self._broken(f"internal error taking messages in: {type(e).__name__}: {e}")

    def cannot_start(self, reason: str) -> None:
        """The job's Kafka consumer cannot be created: the job is in error, saying why."""
        self._broken(f"the Kafka consumer cannot be created: {reason}")

    def revoked(self, partitions: list[TP], lost: bool) -> Deferred[dict[TP, int]]:
        """Let go of ``partitions``: queued records are dropped, requests under way may end
        within the revocation grace (lost: none), then are cancelled; the offsets to commit."""
        self.intake.revoked(partitions)
        waiting: list[Deferred[Any]] = self.dispatcher.revoke(partitions, lost)
        waiting.extend(_observe(d) for d in self.outcomes.acks(partitions))

        def let_go(_: Any) -> dict[TP, int]:
            self.dispatcher.let_go(partitions)
            self.outcomes.cancel_acks(partitions)
            offsets = {}
            for tp in partitions:
                point = self.ledger.revoke(tp)
                if point is not None and not lost:
                    offsets[tp] = point
            self.outcomes.release(partitions)
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

    # -- wiring --------------------------------------------------------------------------

    def _pump(self) -> None:
        self.dispatcher.pump()

    def _answer(self) -> None:
        # A request off the wire: with "auto", its slot (and maybe a grown limit) may start
        # another unit before this one has ended.
        if self.current.settings.adaptive:
            self.dispatcher.pump()

    def _commit(self, offsets: dict[TP, int]) -> None:
        self.loop.commit(offsets)

    def _settled(self, partitions: set[TP]) -> None:
        self.intake.checked(partitions)

    def _note(self, reason: str) -> None:
        self.stats.error(reason, self._clock.seconds())

    def _opened(self) -> None:
        circuit = self.breaker.circuit
        log.warn("job {job_id}: circuit open, the endpoint looks down ({reason}); taking no new "
                 "messages, probing every {every:.1f} s", job_id=self.job.id,
                 reason=circuit.reason, every=self.breaker.probe_interval())
        self._note(f"circuit open: {circuit.reason}")
        self.intake.pause_all()

    def _closed(self) -> None:
        log.info("job {job_id}: circuit closed, the endpoint answers again", job_id=self.job.id)
        self.concurrency.restart()  # SPEC §11: the limit starts low again
        self.intake.room()
        self._pump()

    def _broken(self, reason: str) -> None:
        """The job cannot go on safely here: commit what is finished, fetch nothing more,
        and tell the supervisor."""
        if self.failure is not None:
            return
        self.failure = reason
        self._note(reason)
        self.intake.stop()
        self.intake.pause_all()
        self.outcomes.settle(set())
        if self.on_error is not None:
            self.on_error(self, reason)


def _seq(unit: Unit) -> int:
    return unit.seq


def _observe(d: Deferred[Any]) -> Deferred[None]:
    """A Deferred that fires when ``d`` does, leaving ``d``'s result alone."""
    seen: Deferred[None] = Deferred()

    def fire(result: Any) -> Any:
        if not seen.called:
            seen.callback(None)
        return result

    d.addBoth(fire)
    return seen
