"""Delivering one unit (SPEC §5): attempts and retries until it ends, whatever happens.

:class:`Deliverer` takes a unit the dispatcher started — one record, one undecodable
message, or a batch — and makes its attempts through the job's
:class:`~restconsumer.delivery.attempt.Attempts`, judged by
:func:`~restconsumer.delivery.retry.judge`, retried by
:func:`~restconsumer.delivery.retry.deliver` under the job's circuit
(:class:`~restconsumer.delivery.breaker.Breaker`), and ends each of its records through its
:class:`Ends` (the job's outcomes, or a replay's). It owns one rule:

    every record of a unit it starts ends — delivered or dead-lettered — or is released
    because the unit was cancelled (its partition revoked, the job stopped); an exception
    from any step (build, sign, send, judge, a bug of ours) dead-letters the records it
    left open, with the reason.

The usual case (one record, the circuit closed) makes its first attempt without the
retry loop's coroutines: a record answered 2xx at once costs a chain of callbacks only.
A failure, a batch or an open circuit goes through the retry loop, from the first
attempt's result when there was one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from restconsumer.base.types import TP, Answer, Outgoing
from restconsumer.delivery.attempt import Attempts
from restconsumer.delivery.batching import batch_body
from restconsumer.delivery.breaker import Breaker
from restconsumer.delivery.metrics import Metrics
from restconsumer.delivery.retry import Outcome, Verdict, deliver, judge
from restconsumer.delivery.settings import Current, Settings
from restconsumer.delivery.units import Message, Unit
from restconsumer.jobs.work import RecordWork

__all__ = ["Deliverer", "Ends", "batch_request"]

log = Logger()


class Ends(Protocol):
    """How a unit's records end: the running job's outcomes, or a replay's."""

    def delivered(self, message: Message, record: RecordWork, status: int | None, began: float,
                  body: bytes, retried: int, *, settle: bool = True) -> None:
        """``record`` was delivered (``settle``: its commit may move now)."""

    def dead_letter(self, message: Message, reason: str, record: RecordWork | None, *,
                    status: int | None = None, attempts: int = 0, began: float | None = None,
                    body: bytes = b"", retried: int = 0, failed: bool = False) -> None:
        """``record`` (None: the whole message) cannot be delivered."""

    def settle(self, partitions: set[TP]) -> None:
        """Records of ``partitions`` ended without settling: commit what may be."""


def batch_request(settings: Settings, items: list[tuple[Message, RecordWork]],
                  own_key: bool = False) -> Outgoing:
    """The request of a batch: the records' bodies in one array (or NDJSON), its
    idempotency key and ``webhook-id`` made of the first and last offsets — or, with
    ``own_key`` (a replayed letter, a batch of one), its record's own."""
    batch = settings.batch
    assert batch is not None
    first = items[0][1].request
    assert first is not None
    body = batch_body([r.request.body or b"" for _, r in items if r.request is not None], batch.format)
    headers = settings.batch_headers
    if not (settings.idempotency or settings.signing_secret is not None):
        return Outgoing(first.method, first.url, headers, body)
    incoming = items[0][0].prepared.incoming
    place = f"{settings.job.id}:{incoming.topic}:{incoming.partition}:{incoming.offset}"
    # A replayed letter's key is the one its record's own request would have.
    key = f"{place}:{items[0][1].index}" if own_key else f"{place}-{items[-1][0].prepared.incoming.offset}"
    if not settings.idempotency:
        return Outgoing(first.method, first.url, headers, body, None, False, key)
    return Outgoing(first.method, first.url, {**headers, b"Idempotency-Key": [key.encode()]}, body,
                    None, True, key)


class _Gate:
    """The job's circuit as one unit's retry loop sees it."""

    __slots__ = ("_breaker", "_unit")

    def __init__(self, breaker: Breaker[Unit], unit: Unit) -> None:
        self._breaker = breaker
        self._unit = unit

    @property
    def good(self) -> int:
        return self._breaker.good

    def is_open(self) -> bool:
        return self._breaker.is_open

    def park(self) -> Deferred[None]:
        return self._breaker.park(self._unit)

    def verdict(self, verdict: Verdict) -> None:
        self._breaker.verdict(self._unit, verdict)

    def open(self, reason: str) -> None:
        self._breaker.open(reason)


class Deliverer:
    """Delivers units until each of their records has ended (see the module's docstring)."""

    def __init__(self, clock: IReactorTime, current: Current, attempts: Attempts,
                 breaker: Breaker[Unit], ends: Ends, metrics: Metrics, *,
                 own_keys: bool = False, note: Callable[[str], None] | None = None,
                 broken: Callable[[str], None] | None = None) -> None:
        self._clock = clock
        self._current = current
        self._attempts = attempts
        self._breaker = breaker
        self._ends = ends
        self._metrics = metrics
        #: A replay: a batch of one keeps its record's own idempotency key.
        self._own_keys = own_keys
        #: Told of every retry's reason (the job's last error).
        self._note = note
        #: Told when ending a record failed (the outcomes, the ledger): the job is broken.
        self._broken = broken

    def start(self, unit: Unit) -> Deferred[None]:
        """Deliver ``unit``; fires once it has ended (cancel it to abandon it)."""
        try:
            d = self._start(unit)
        except Exception:
            d = Deferred.fromCoroutine(self._failed_at_once(Failure()))
        return d.addErrback(self._unexpected, unit)

    async def _failed_at_once(self, failure: Failure) -> None:
        failure.raiseException()

    def _unexpected(self, failure: Failure, unit: Unit) -> None:
        """Whatever a step raised: the unit's open records are dead-lettered with it; if
        none was open, it was raised while ending them: the job is broken."""
        if unit.cancelled:
            return None  # abandoned: its messages stay unfinished, and are not committed
        job_id = self._current.settings.job.id
        log.failure("job {job_id}: delivering a record failed", failure, job_id=job_id)
        reason = f"internal error: {failure.type.__name__}: {failure.getErrorMessage()}"
        ended = False
        for message, record in unit.items():
            if unit.end(message, record):
                ended = True
                self._ends.dead_letter(message, reason, record, failed=True)
        if not ended and self._broken is not None:
            self._broken(f"{reason} (while ending a record)")
        return None

    def _start(self, unit: Unit) -> Deferred[None]:
        record = unit.record
        if unit.batch is None and record is not None and record.request is not None \
                and record.error is None and not self._breaker.is_open:
            began = self._clock.seconds()
            try:
                attempt = self._attempts.send(record.request, unit)
            except Exception as e:  # raised before a Deferred existed (a URL Agent refuses...)
                return Deferred.fromCoroutine(self._run(unit, (None, e), began))
            return attempt.addCallbacks(self._first_answer, self._first_failed,
                                        callbackArgs=(unit, began), errbackArgs=(unit, began))
        return Deferred.fromCoroutine(self._run(unit))

    def _first_answer(self, answer: Answer, unit: Unit, began: float) -> Deferred[None] | None:
        verdict = judge(answer, None, self._current.settings.success)
        if not verdict.delivered:
            return Deferred.fromCoroutine(self._run(unit, (answer, None), began))
        self._breaker.verdict(unit, verdict)
        record = unit.record
        assert record is not None
        if unit.end(unit.message, record):
            self._ends.delivered(unit.message, record, verdict.status, began, answer.body, 0)
        return None

    def _first_failed(self, failure: Failure, unit: Unit, began: float) -> Deferred[None] | None:
        if unit.cancelled:
            return None  # abandoned: the message stays unfinished, and is not committed
        return Deferred.fromCoroutine(self._run(unit, (None, failure.value), began))

    async def _run(self, unit: Unit, first: tuple[Answer | None, BaseException | None] | None = None,
                   began: float | None = None) -> None:
        if unit.batch is not None:
            await self._run_batch(unit, unit.batch)
            return
        message, record = unit.message, unit.record
        if record is None:
            if unit.end(message, None):
                self._ends.dead_letter(message, message.prepared.error or "undecodable", None)
            return
        request = record.request
        if request is None or record.error is not None:
            if unit.end(message, record):
                self._ends.dead_letter(message, record.error or "no request", record)
            return
        if began is None:
            began = self._clock.seconds()
        outcome = await self._deliver(unit, request, first)
        if outcome is None or not unit.end(message, record):
            return  # abandoned
        if outcome.delivered:
            self._ends.delivered(message, record, outcome.status, began, outcome.body, outcome.retried)
            return
        self._ends.dead_letter(message, outcome.reason, record, status=outcome.status,
                               attempts=outcome.attempts, began=began, body=outcome.body,
                               retried=outcome.retried, failed=True)

    async def _deliver(self, unit: Unit, request: Outgoing,
                       first: tuple[Answer | None, BaseException | None] | None = None) -> Outcome | None:
        """The retry loop of one request; None if the unit was abandoned meanwhile."""
        settings = self._current.settings
        try:
            return await deliver(lambda: self._attempts.send(request, unit), settings.policy,
                                 self._clock,
                                 on_retry=lambda n, reason, wait: self._retrying(unit, n, reason, wait),
                                 cancelled=lambda: unit.cancelled, gate=_Gate(self._breaker, unit),
                                 success=settings.success, first=first)
        except CancelledError:
            if unit.cancelled:
                return None
            raise

    async def _run_batch(self, unit: Unit, items: list[tuple[Message, RecordWork]]) -> None:
        """Send a batch; a batch refused with a non-retryable 4xx is split in halves, sent
        one after the other, until the refused records are alone: only those are dead-lettered."""
        request = batch_request(self._current.settings, items, self._own_keys)
        began = self._clock.seconds()
        outcome = await self._deliver(unit, request)
        if outcome is None:
            return
        if outcome.delivered:
            retried = outcome.retried
            for message, record in items:
                if unit.end(message, record):
                    self._ends.delivered(message, record, outcome.status, began, outcome.body, retried,
                                         settle=False)
                    retried = 0
            self._ends.settle({unit.tp})
            return
        refused = outcome.status is not None and 400 <= outcome.status < 500 and not outcome.exhausted
        if refused and len(items) > 1:
            half = len(items) // 2
            await self._run_batch(unit, items[:half])
            if unit.cancelled:
                return  # revoked or stopped: the second half is not sent
            await self._run_batch(unit, items[half:])
            return
        retried = outcome.retried
        for message, record in items:
            if unit.end(message, record):
                self._ends.dead_letter(message, outcome.reason, record, status=outcome.status,
                                       attempts=outcome.attempts, began=began, body=outcome.body,
                                       retried=retried, failed=True)
                retried = 0

    def _retrying(self, unit: Unit, attempt: int, reason: str, wait: float) -> None:
        if unit.revoking:
            # Its partition goes as soon as this request has ended: no retry on it.
            unit.cancelled = True
        job_id = self._current.settings.job.id
        if self._note is not None:
            self._note(reason)
        self._metrics.retried(job_id)
        incoming = unit.message.prepared.incoming
        log.warn("job {job_id}: {topic}[{partition}]@{offset} entity {entity}: attempt {attempt} "
                 "failed ({reason}); retrying in {wait:.1f} s", job_id=job_id,
                 topic=incoming.topic, partition=incoming.partition, offset=incoming.offset,
                 entity=unit.record.entity if unit.record else None, attempt=attempt,
                 reason=reason, wait=wait)
