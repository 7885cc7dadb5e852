"""The retry policy (SPEC §5): what may succeed later, how long to wait, when to give up.

:class:`RetryPolicy` is plain data; :func:`deliver` applies it to one request on a clock.
Cancelling the Deferred of :func:`deliver` abandons the request (its connection is
closed, or its wait ends): the record is then neither delivered nor dead-lettered.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionLost,
    DNSLookupError,
    TimeoutError,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.web.client import RequestNotSent, RequestTransmissionFailed, ResponseFailed

from restconsumer.base.types import Answer, DestinationRefused

__all__ = ["Gate", "Outcome", "RetryPolicy", "Unavailable", "Verdict", "deliver", "is_retryable_status",
           "is_throttled", "judge"]

_NETWORK_ERRORS = (ConnectError, ConnectingCancelledError, ConnectionLost, DNSLookupError,
                   TimeoutError, DeferredTimeout, ResponseFailed, RequestTransmissionFailed,
                   RequestNotSent)


class Unavailable(Exception):
    """What delivery depends on (an OAuth2 token endpoint, a schema registry) is down: an
    outage like a refused connection, never a reason to dead-letter."""


def is_throttled(answer: Answer) -> bool:
    """Whether an answer is back-pressure (SPEC §5): a 429, or a 503 with ``Retry-After``."""
    return answer.status == 429 or (answer.status == 503 and answer.retry_after is not None)


def is_retryable_status(status: int) -> bool:
    """Whether an HTTP status may succeed later: 408, 429 and 5xx."""
    return status in (408, 429) or status >= 500


#: The longest ``Retry-After`` honoured, whatever the policy.
MAX_RETRY_AFTER = 3600.0


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, capped; ``max_attempts`` 0 means no limit."""

    max_attempts: int = 8
    initial_wait: float = 1.0
    max_wait: float = 30.0
    #: Seconds a record may be throttled (429, 503 with ``Retry-After``) before it ends as
    #: "throttled"; throttled attempts are not counted in ``max_attempts``.
    max_throttled: float = 3600.0

    @classmethod
    def of(cls, settings: dict[str, float]) -> RetryPolicy:
        """The policy of a job's merged ``retry`` settings."""
        return cls(int(settings["max_attempts"]), float(settings["initial_wait"]),
                   float(settings["max_wait"]), float(settings.get("max_throttled", 3600.0)))

    def wait(self, attempt: int, retry_after: float | None, rand: Callable[[], float]) -> float:
        """Seconds before attempt ``attempt + 1``, after ``attempt`` failed ones."""
        ceiling = min(self.max_wait, self.initial_wait * (2 ** min(attempt - 1, 30)))
        # Within 20 % below the doubling schedule: instances do not retry in step, and
        # the default policy still spans its ~1.5 minutes of waits.
        wait = ceiling * (0.8 + 0.2 * rand())
        if retry_after is not None:
            wait = max(wait, self.honoured(retry_after))
        return wait

    def honoured(self, retry_after: float) -> float:
        """How much of a ``Retry-After`` is waited: up to ten times ``max_wait``, an hour at most."""
        return max(0.0, min(retry_after, self.max_wait * 10, MAX_RETRY_AFTER))

    def exhausted(self, attempts: int) -> bool:
        """Whether no attempt is left after ``attempts``."""
        return self.max_attempts != 0 and attempts >= self.max_attempts


@dataclass
class Outcome:
    """How one request ended: delivered, or to be dead-lettered with the reason."""

    delivered: bool
    attempts: int
    status: int | None
    reason: str
    retried: int = 0
    #: The start of the last answer's body (as much as the sender kept).
    body: bytes = b""
    #: It ended because its attempts were used up (not because it was refused).
    exhausted: bool = False


@dataclass(frozen=True)
class Verdict:
    """What one attempt tells: delivered, worth retrying, or final (dead letter)."""

    delivered: bool
    retryable: bool
    status: int | None
    reason: str
    retry_after: float | None = None
    #: Whether the endpoint itself answered (it is up), as opposed to a refusal of ours.
    answered: bool = False
    #: Back-pressure (SPEC §5): a 429, or a 503 with ``Retry-After`` — the endpoint is up
    #: and asks to slow down; neither the record's fault nor an outage.
    throttled: bool = False


def judge(answer: Answer | None, error: BaseException | None = None,
          success: frozenset[int] = frozenset()) -> Verdict:
    """The verdict of an answer, or of the error an attempt failed with; ``success`` holds
    the statuses besides 2xx that count as delivered (a job's ``success_status``).

    Never raises: an exception that is neither a network error nor a refusal of ours is
    a fault of this record's way (SPEC §5 "Nothing waits for ever"), judged final with its
    reason, so that the record is dead-lettered rather than left waiting.
    """
    if error is not None:
        if isinstance(error, DestinationRefused):
            return Verdict(False, False, None, str(error))
        if isinstance(error, Unavailable):
            return Verdict(False, True, None, str(error))
        if isinstance(error, _NETWORK_ERRORS):
            if _tls_failure(error):
                # A certificate that does not verify will not verify later either.
                return Verdict(False, False, None, f"TLS verification failed: {_describe(error)}")
            return Verdict(False, True, None, f"{type(error).__name__}: {_describe(error)}")
        if isinstance(error, CancelledError):
            # Not ours (the caller that cancels is asked first): a lower layer gave up.
            return Verdict(False, True, None, f"cancelled: {_describe(error)}")
        return Verdict(False, False, None, f"internal error: {type(error).__name__}: {error}")
    assert answer is not None
    status = answer.status
    if 200 <= status < 300 or status in success:
        return Verdict(True, False, status, "delivered", answered=True)
    reason = f"HTTP {status}: {answer.body[:200].decode('utf-8', 'replace')}".strip()
    if is_throttled(answer):
        return Verdict(False, True, status, reason, answer.retry_after, answered=True, throttled=True)
    if is_retryable_status(status):
        return Verdict(False, True, status, reason, answer.retry_after)
    return Verdict(False, False, status, reason, answered=True)


class Gate(Protocol):
    """A job's circuit as one record's retry loop sees it (see restconsumer.delivery.circuit)."""

    @property
    def good(self) -> int:
        """Good answers the job has had so far."""

    def is_open(self) -> bool:
        """Whether the circuit is open."""

    def park(self) -> Deferred[None]:
        """Wait while the circuit is open: fires when this record may try (probe or closed)."""

    def verdict(self, verdict: Verdict) -> None:
        """Told of every attempt's verdict."""

    def open(self, reason: str) -> None:
        """Open the circuit: this record's retries are used up, yet nothing worked since."""


async def deliver(send: Callable[[], Deferred[Answer]], policy: RetryPolicy, clock: IReactorTime,
                  *, on_retry: Callable[[int, str, float], None] | None = None,
                  cancelled: Callable[[], bool] = lambda: False,
                  rand: Callable[[], float] = random.random, gate: Gate | None = None,
                  success: frozenset[int] = frozenset(),
                  first: tuple[Answer | None, BaseException | None] | None = None) -> Outcome:
    """Send until it succeeds (2xx or a status in ``success``), cannot succeed (other
    4xx/3xx), or the attempts run out.

    ``on_retry(attempt, reason, wait)`` is told of each retry. With a ``gate`` (the job's
    circuit), attempts made while it is open are not counted, and a record whose attempts
    are used up ends only if the job had a good answer since the record first failed;
    otherwise the circuit opens and the record waits with the rest. Raises
    ``CancelledError`` when the caller cancels (a request whose cancellation shows as a
    network error counts as cancelled when ``cancelled()`` says so).

    ``first`` is the (answer, error) of a first attempt the caller already made while the
    circuit was closed: the loop goes on from it, as if it had sent it itself.

    A throttled attempt (429, 503 with ``Retry-After``) is back-pressure: not counted, it
    waits its ``Retry-After`` (or the backoff) and tries again, until the record has been
    throttled for ``max_throttled`` seconds.
    """
    attempts = 0
    tries = 0
    throttles = 0
    throttled_since: float | None = None
    good_at_first_failure: int | None = None
    while True:
        if first is None:
            if gate is not None and gate.is_open():
                await gate.park()
            counted = gate is None or not gate.is_open()
            # Our own cancel passes through ``mine`` (and is noted); a CancelledError the
            # request fails with otherwise is a lower layer giving up: judged, retried.
            asked: list[bool] = []
            try:
                mine, asked = _ours(send())
                answer: Answer | None = await mine
                error: BaseException | None = None
            except Exception as e:
                answer, error = None, e
        else:
            (answer, error), first = first, None
            counted, asked = True, []
        tries += 1
        body = b""
        if answer is None:
            if cancelled() or asked:
                # Abandoned (a cancellation reaches the request under way first).
                raise CancelledError("abandoned") from error
            verdict = judge(None, error)
        else:
            verdict = judge(answer, None, success)
            body = answer.body
        if counted and not verdict.throttled:
            attempts += 1
        if gate is not None:
            gate.verdict(verdict)
        if verdict.delivered:
            return Outcome(True, attempts, verdict.status, "delivered", tries - 1, body)
        if not verdict.retryable:
            return Outcome(False, attempts, verdict.status, verdict.reason, tries - 1, body)
        if cancelled():
            raise CancelledError("abandoned")
        if verdict.throttled:
            now = clock.seconds()
            throttles += 1
            if throttled_since is None:
                throttled_since = now
            elif now - throttled_since >= policy.max_throttled:
                return Outcome(False, max(attempts, 1), verdict.status,
                               f"throttled for {now - throttled_since:.0f} s (retry.max_throttled "
                               f"{policy.max_throttled:g} s); last: {verdict.reason}", tries - 1, body)
            wait = policy.wait(throttles, verdict.retry_after, rand)
            if on_retry is not None:
                on_retry(attempts, verdict.reason, wait)
                if cancelled():
                    raise CancelledError("abandoned")
            await deferLater(clock, wait, lambda: None)
            continue
        if gate is not None and gate.is_open():
            continue  # not counted: the circuit's probe decides when to try again
        if good_at_first_failure is None:
            good_at_first_failure = gate.good if gate is not None else 0
        if policy.exhausted(attempts):
            if gate is None or gate.good > good_at_first_failure:
                return Outcome(False, attempts, verdict.status,
                               f"retries exhausted after {attempts} attempts; last: {verdict.reason}",
                               tries - 1, body, exhausted=True)
            gate.open(f"retries of one record used up with no good answer since; "
                      f"last: {verdict.reason}")
            continue
        wait = policy.wait(attempts, verdict.retry_after, rand)
        if on_retry is not None:
            on_retry(attempts, verdict.reason, wait)
            if cancelled():  # told, by being told of the retry, that it will not be wanted
                raise CancelledError("abandoned")
        await deferLater(clock, wait, lambda: None)


def _ours(sent: Deferred[Answer]) -> tuple[Deferred[Answer], list[bool]]:
    """``sent`` behind a Deferred of our own, and a list that holds True once it is cancelled."""
    asked: list[bool] = []

    def cancel(_: Deferred[Answer]) -> None:
        asked.append(True)
        sent.cancel()

    mine: Deferred[Answer] = Deferred(cancel)
    sent.chainDeferred(mine)
    return mine, asked


def _tls_failure(error: BaseException) -> bool:
    reasons = getattr(error, "reasons", None) or []
    return any(_is_ssl_error(getattr(r, "value", r)) for r in reasons) or _is_ssl_error(error)


def _is_ssl_error(error: Any) -> bool:
    return type(error).__module__.startswith("OpenSSL") or "certificate verify failed" in str(error)


def _describe(e: BaseException) -> str:
    if isinstance(e, (ResponseFailed, RequestTransmissionFailed)):
        return "; ".join(str(r.value) for r in e.reasons) or "response failed"
    if isinstance(e, (CancelledError, DeferredTimeout)):
        return "timed out"
    return str(e) or type(e).__name__
