"""The retry policy (SPEC §5): what may succeed later, how long to wait, when to give up.

:class:`RetryPolicy` is plain data; :func:`deliver` applies it to one request on a clock.
Cancelling the Deferred of :func:`deliver` abandons the request (its connection is
closed, or its wait ends): the record is then neither delivered nor dead-lettered.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

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

from restconsumer.sender import Answer, DestinationRefused

__all__ = ["Outcome", "RetryPolicy", "deliver", "is_retryable_status"]

_NETWORK_ERRORS = (ConnectError, ConnectingCancelledError, ConnectionLost, DNSLookupError,
                   TimeoutError, DeferredTimeout, ResponseFailed, RequestTransmissionFailed,
                   RequestNotSent)


def is_retryable_status(status: int) -> bool:
    """Whether an HTTP status may succeed later: 408, 429 and 5xx."""
    return status in (408, 429) or status >= 500


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, capped; ``max_attempts`` 0 means no limit."""

    max_attempts: int = 8
    initial_wait: float = 1.0
    max_wait: float = 30.0

    @classmethod
    def of(cls, settings: dict[str, float]) -> RetryPolicy:
        """The policy of a job's merged ``retry`` settings."""
        return cls(int(settings["max_attempts"]), float(settings["initial_wait"]),
                   float(settings["max_wait"]))

    def wait(self, attempt: int, retry_after: float | None, rand: Callable[[], float]) -> float:
        """Seconds before attempt ``attempt + 1``, after ``attempt`` failed ones."""
        ceiling = min(self.max_wait, self.initial_wait * (2 ** min(attempt - 1, 30)))
        # Within 20 % below the doubling schedule: instances do not retry in step, and
        # the default policy still spans its ~1.5 minutes of waits.
        wait = ceiling * (0.8 + 0.2 * rand())
        if retry_after is not None:
            wait = max(wait, min(retry_after, max(self.max_wait, retry_after)))
        return wait

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
    waits: list[float] = field(default_factory=list)


async def deliver(send: Callable[[], Deferred[Answer]], policy: RetryPolicy, clock: IReactorTime,
                  *, on_retry: Callable[[int, str, float], None] | None = None,
                  cancelled: Callable[[], bool] = lambda: False,
                  rand: Callable[[], float] = random.random) -> Outcome:
    """Send until it succeeds (2xx), cannot succeed (other 4xx/3xx), or the attempts run out.

    ``on_retry(attempt, reason, wait)`` is told of each retry. Raises ``CancelledError``
    when the caller cancels (a request whose cancellation shows as a network error counts
    as cancelled when ``cancelled()`` says so).
    """
    attempts = 0
    waits: list[float] = []
    while True:
        attempts += 1
        status: int | None = None
        retry_after = None
        try:
            answer = await send()
        except DestinationRefused as e:
            return Outcome(False, attempts, None, str(e), attempts - 1, waits)
        except _NETWORK_ERRORS as e:
            if cancelled():
                raise CancelledError("abandoned") from e
            reason = f"{type(e).__name__}: {_describe(e)}"
        else:
            status = answer.status
            if 200 <= status < 300:
                return Outcome(True, attempts, status, "delivered", attempts - 1, waits)
            reason = f"HTTP {status}: {answer.body[:200].decode('utf-8', 'replace')}".strip()
            if not is_retryable_status(status):
                return Outcome(False, attempts, status, reason, attempts - 1, waits)
            retry_after = answer.retry_after
        if cancelled():
            raise CancelledError("abandoned")
        if policy.exhausted(attempts):
            return Outcome(False, attempts, status,
                           f"retries exhausted after {attempts} attempts; last: {reason}",
                           attempts - 1, waits)
        wait = policy.wait(attempts, retry_after, rand)
        waits.append(wait)
        if on_retry is not None:
            on_retry(attempts, reason, wait)
        await deferLater(clock, wait, lambda: None)


def _describe(e: BaseException) -> str:
    if isinstance(e, (ResponseFailed, RequestTransmissionFailed)):
        return "; ".join(str(r.value) for r in e.reasons) or "response failed"
    if isinstance(e, (CancelledError, DeferredTimeout)):
        return "timed out"
    return str(e) or type(e).__name__
