"""Replays of a job's dead letters (SPEC §9), through the job's own way (SPEC §5 "One way
to deliver").

A replay reads the job's dead-letter topic from where the previous replay stopped (its
group ``restconsumer.{id}.replay`` remembers) up to the end offsets taken when it starts,
skips the letters of other jobs, and sends each of this job's letters as the job sends:
the job resolved as the supervisor resolves it (secret references, decrypted secrets),
decoded with the registry's schemas, mapped by the job's builder, and delivered by the
same :class:`~restconsumer.delivery.deliverer.Deliverer` over the same
:class:`~restconsumer.delivery.attempt.Attempts` (OAuth2, signing, ``ratelimit``,
``success_status``). A letter of one record of a message (an Avro container) sends that
record only; a batched job's letter goes as a batch of one with that record's own
idempotency key. When the job runs in this process, the replay shares its circuit, token
cache and pace. A result goes to the job's ``result_topic``; one that fails again becomes
a new dead letter that keeps its original source coordinates.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from restconsumer.base.types import TP
from restconsumer.delivery.attempt import Attempts
from restconsumer.delivery.breaker import Breaker
from restconsumer.delivery.deadletters import DeadLetterReader, dead_letter_headers
from restconsumer.delivery.deliverer import Deliverer
from restconsumer.delivery.ledger import Ticket
from restconsumer.delivery.outcomes import Producing, result_value
from restconsumer.delivery.retry import Unavailable
from restconsumer.delivery.runner import JobRunner, Shared
from restconsumer.delivery.settings import Current
from restconsumer.delivery.units import Message, Unit
from restconsumer.jobs.model import Job
from restconsumer.jobs.work import Incoming, Prepared, RecordWork, prepare

__all__ = ["MARK_TTL", "ReplayRunning", "Replays"]

log = Logger()

#: Seconds a replay's mark in Redis lasts without being kept (an instance that died
#: mid-replay holds no one up longer).
MARK_TTL = 60


class ReplayRunning(Exception):
    """A replay of this job's dead letters is under way already."""


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


class _ReplayEnds:
    """How a replayed record ends: counted in the replay's progress; a result or a new
    dead letter produced, and waited for before the replay's place moves on."""

    def __init__(self, clock: IReactorTime, current: Current, producing: Producing,
                 progress: dict[str, Any]) -> None:
        self._clock = clock
        self._current = current
        self._producing = producing
        self._progress = progress
        self.pending: list[Deferred[None]] = []

    def _produce(self, incoming: Incoming, topic: str, value: bytes | None,
                 headers: list[tuple[str, bytes]]) -> None:
        self.pending.append(Deferred.fromCoroutine(
            self._producing.produce(incoming, topic, value, headers, lambda: True)))

    def _result(self, message: Message, record: RecordWork | None, outcome: str, status: int | None,
                began: float | None, body: bytes, reason: str | None = None) -> None:
        settings = self._current.settings
        if settings.result_topic is None:
            return
        incoming = message.prepared.incoming
        duration = 0.0 if began is None else max(0.0, self._clock.seconds() - began)
        value = result_value(settings.job.id, incoming, record.index if record is not None else 0,
                             outcome, status, duration, body, reason)
        self._produce(incoming, settings.result_topic, value, [])

    def delivered(self, message: Message, record: RecordWork, status: int | None, began: float,
                  body: bytes, retried: int, *, settle: bool = True) -> None:
        """A replayed record was delivered."""
        self._progress["delivered"] += 1
        self._result(message, record, "delivered", status, began, body)

    def dead_letter(self, message: Message, reason: str, record: RecordWork | None, *,
                    status: int | None = None, attempts: int = 0, began: float | None = None,
                    body: bytes = b"", retried: int = 0, failed: bool = False) -> None:
        """A replayed record failed again: a new dead letter, its source unchanged."""
        settings = self._current.settings
        incoming = message.prepared.incoming
        self._progress["dead_lettered"] += 1
        self._result(message, record, "dead_lettered", status, began, body, f"replayed: {reason}")
        headers = dead_letter_headers(settings.job.id, incoming, f"replayed: {reason}",
                                      record=record.index if record is not None else None,
                                      status=status, attempts=attempts)
        self._produce(incoming, settings.job.dead_letter_topic, incoming.value, headers)

    def settle(self, partitions: set[TP]) -> None:
        """Nothing to commit: the replay's place moves per chunk."""

    def filtered(self) -> None:
        """A replayed record the job's filter now leaves out."""
        self._progress["filtered"] = self._progress.get("filtered", 0) + 1


class Replays:
    """Replays of jobs' dead letters through the job again (``POST /job/{id}/deadletters/replay``).

    ``runnable(stored)`` resolves a stored job as the supervisor does; ``runner_of(id)`` is
    the job's runner in this process, if it runs here.
    """

    def __init__(self, reader: DeadLetterReader, shared: Shared, *,
                 runnable: Callable[[dict[str, Any]], Job],
                 runner_of: Callable[[str], JobRunner | None] = lambda _: None,
                 chunk: int = 500, store: Any = None, owner: str = "",
                 mark_ttl: int = MARK_TTL) -> None:
        self._reader = reader
        self._shared = shared
        self._clock: IReactorTime = shared.clock or shared.reactor
        self._runnable = runnable
        self._runner_of = runner_of
        self._chunk = chunk
        #: Where a replay is marked as under way for every instance of the service (a
        #: JobStore with ``claim_replay``/``keep_replay``/``release_replay``), and as whom.
        self._store = store
        self._owner = owner
        self._mark_ttl = mark_ttl
        self._progress: dict[str, dict[str, Any]] = {}
        self._tasks: dict[str, Deferred[None]] = {}

    def progress(self, job_id: str) -> dict[str, Any] | None:
        """The latest replay of ``job_id`` on this instance, if any."""
        return self._progress.get(job_id)

    async def start(self, stored: dict[str, Any]) -> dict[int, tuple[int, int]]:
        """Start replaying the stored job's letters; the plan ``{partition: (from, to)}``.
        Raises :class:`ReplayRunning`, or why the job cannot run here."""
        job = self._runnable(stored)
        if job.id in self._tasks:
            raise ReplayRunning(f"a replay of job {job.id} is under way")
        self._tasks[job.id] = Deferred()  # held while the plan is read
        marked = False
        try:
            if self._store is not None:
                marked = await self._store.claim_replay(job.id, self._owner, self._mark_ttl)
                if not marked:
                    raise ReplayRunning(f"a replay of job {job.id} is under way on another instance")
            plan = await self._reader.replay_plan(job.id, job.dead_letter_topic)
        except BaseException:
            del self._tasks[job.id]
            if marked:
                await self._unmark(job.id)
            raise
        now = self._clock.seconds()
        self._progress[job.id] = {
            "state": "running", "started": _iso(now), "finished": None,
            "partitions": {str(p): [a, b] for p, (a, b) in plan.items()},
            "replayed": 0, "delivered": 0, "dead_lettered": 0, "error": None,
        }
        task = Deferred.fromCoroutine(self._run(job, plan))
        self._tasks[job.id] = task
        keeper = None
        if self._store is not None:
            # The mark outlives a crashed instance by at most its TTL.
            keeper = LoopingCall(self._keep, job.id)
            keeper.clock = self._clock
            keeper.start(self._mark_ttl / 3, now=False)

        def ended(result: Any) -> None:
            self._tasks.pop(job.id, None)
            if keeper is not None:
                keeper.stop()
                Deferred.fromCoroutine(self._unmark(job.id))
            progress = self._progress[job.id]
            progress["finished"] = _iso(self._clock.seconds())
            if isinstance(result, Failure):
                progress["state"] = "failed"
                progress["error"] = result.getErrorMessage()
                log.failure("job {job_id}: replay of dead letters failed", result, job_id=job.id)
            else:
                progress["state"] = "done"
                log.info("job {job_id}: replay done: {n} dead letters sent again, {d} delivered, "
                         "{f} dead-lettered again", job_id=job.id, n=progress["replayed"],
                         d=progress["delivered"], f=progress["dead_lettered"])

        task.addBoth(ended)
        return plan

    async def _keep(self, job_id: str) -> None:
        try:
            await self._store.keep_replay(job_id, self._owner, self._mark_ttl)
        except Exception as e:  # Redis away a moment: the mark lasts its TTL meanwhile
            log.warn("job {job_id}: cannot keep the replay's mark in Redis: {error}", job_id=job_id,
                     error=str(e))

    async def _unmark(self, job_id: str) -> None:
        try:
            await self._store.release_replay(job_id, self._owner)
        except Exception as e:  # it expires by itself
            log.warn("job {job_id}: cannot remove the replay's mark from Redis: {error}",
                     job_id=job_id, error=str(e))

    def _way(self, job: Job, progress: dict[str, Any]) -> tuple[Current, Deliverer, _ReplayEnds]:
        """The job's way to the wire: the running job's own when it runs here unchanged."""
        shared, clock = self._shared, self._clock
        runner = self._runner_of(job.id)
        if runner is not None and runner.job.hash == job.hash:
            current, attempts, breaker = runner.current, runner.attempts, runner.breaker
        else:
            current = Current(shared.settings(job))
            attempts = Attempts(clock, shared.sender, shared.metrics, current, shared.token_fetch)
            breaker = Breaker(clock, lambda: current.settings.policy.max_wait, _seq,
                              opened=_nothing, closed=_nothing, start_one=_nothing)
        ends = _ReplayEnds(clock, current, Producing(clock, shared.dead_letters, job.id), progress)
        deliverer = Deliverer(clock, current, attempts, breaker, ends, shared.metrics, own_keys=True)
        return current, deliverer, ends

    async def _run(self, job: Job, plan: dict[int, tuple[int, int]]) -> None:
        topic = job.dead_letter_topic
        progress = self._progress[job.id]
        current, deliverer, ends = self._way(job, progress)
        for partition, (start, end) in sorted(plan.items()):
            position = start
            while position < end:
                until = min(end, position + self._chunk)
                letters = await self._reader.letters(job.id, topic, partition, position, until)
                for _, incoming, record in letters:
                    if incoming is None:
                        continue  # another job's letter on a shared topic
                    progress["replayed"] += 1
                    prepared = await self._prepare(current, incoming)
                    await self._replay(current, deliverer, ends, prepared, record)
                if ends.pending:
                    pending, ends.pending = ends.pending, []
                    await gatherResults(pending, consumeErrors=True)
                await self._reader.done(job.id, topic, partition, until)
                position = until

    async def _prepare(self, current: Current, incoming: Incoming) -> Prepared:
        """Decode and map a letter as the job does, with the registry's schemas."""
        registry = self._shared.registry
        settings = current.settings
        prepared = prepare(settings.builder, incoming, settings.order,
                           registry.cache if registry is not None else None)
        failures = 0
        while prepared.schema_id is not None and registry is not None:
            try:
                await registry.fetch(prepared.schema_id)
            except Unavailable as e:
                failures += 1
                wait = settings.policy.wait(failures, None, random.random)
                log.warn("job {job_id}: replay: no schema from the schema registry ({reason}); "
                         "asking again in {wait:.1f} s", job_id=settings.job.id, reason=str(e),
                         wait=wait)
                await deferLater(self._clock, wait, lambda: None)
                continue
            prepared = prepare(settings.builder, incoming, settings.order, registry.cache)
        return prepared

    async def _replay(self, current: Current, deliverer: Deliverer, ends: _ReplayEnds,
                      prepared: Prepared, record: int | None) -> None:
        """Deliver the letter's records (only the one it is about, if it is one record's)."""
        incoming = prepared.incoming
        ticket = Ticket((incoming.topic, incoming.partition), 0, incoming.offset)
        records = prepared.records
        if record is not None and prepared.error is None:
            records = [r for r in records if r.index == record]
        message = Message(prepared, ticket, prepared.size, max(1, len(records)))
        if prepared.error is not None:
            await deliverer.start(Unit(message, None))  # dead-lettered again, with its reason
            return
        if not records:
            ends.dead_letter(message, f"record {record} is not in the message" if record is not None
                             else "the message has no records", None)
            return
        batched = current.settings.batch is not None
        for work in records:
            if work.filtered:
                ends.filtered()
                continue
            if batched and work.request is not None and work.error is None:
                unit = Unit(message, work, batch=[(message, work)])
            else:
                unit = Unit(message, work)
            await deliverer.start(unit)


def _seq(unit: Unit) -> int:
    return unit.seq


def _nothing() -> None:
    pass
