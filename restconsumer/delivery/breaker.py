"""The job's circuit on the clock (SPEC §5 "Outage, not poison"): parking and probing.

:class:`~restconsumer.delivery.circuit.Circuit` decides, as plain data, whether the endpoint
looks down. :class:`Breaker` does what an open circuit needs in time: records that would
try while it is open *park*; every ``max_wait`` (or a ``Retry-After``'s wait, if longer) the
oldest parked record goes as the *probe*; the first success closes the circuit and every
parked record goes on. It owns one rule:

    while the circuit is open, a probe is armed (its timer set) or under way,
    until the circuit closes.

So no answer, exception or cancellation can leave parked records waiting for ever: a probe
answered 4xx (the endpoint is up and judging: the circuit closes), refused by the allowlist,
failing TLS, cancelled by a revocation or ending in any other way re-arms the timer.

A throttled answer (429, 503 with ``Retry-After``) never opens the circuit: the endpoint is
up and asks to slow down, which the job's concurrency limit and holds take care of.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from restconsumer.delivery.circuit import Circuit
from restconsumer.delivery.retry import Verdict

__all__ = ["Breaker"]

U = TypeVar("U", bound=Hashable)


class Breaker(Generic[U]):
    """Parks records while the job's circuit is open and probes with the oldest of them.

    ``interval()`` gives the probe's period (the job's ``max_wait``); ``order(unit)`` the
    fetch order (the oldest parked unit probes); ``opened``/``closed`` are told when the
    circuit changes; ``start_one()`` asks for one new record to be started as the probe
    when none is parked.
    """

    def __init__(self, clock: IReactorTime, interval: Callable[[], float], order: Callable[[U], int],
                 *, opened: Callable[[], None], closed: Callable[[], None],
                 start_one: Callable[[], None], circuit: Circuit | None = None) -> None:
        self._clock = clock
        self._interval = interval
        self._order = order
        self._opened = opened
        self._closed = closed
        self._start_one = start_one
        self.circuit = circuit if circuit is not None else Circuit()
        self._parked: dict[U, Deferred[None]] = {}
        self._timer: IDelayedCall | None = None
        #: The unit trying while the circuit is open (the probe under way), if any.
        self._probing: U | None = None
        #: One new unit may start as the probe (none was parked when the timer fired).
        self._may_start_one = False
        #: A Retry-After asked for more than ``interval()`` before the next probe.
        self._hold: float | None = None
        self._stopped = False

    # -- what the rest of the core asks --------------------------------------------------

    @property
    def is_open(self) -> bool:
        """Whether the circuit is open."""
        return self.circuit.is_open

    @property
    def good(self) -> int:
        """Good answers the job has had (see Circuit.good)."""
        return self.circuit.good

    def may_start(self) -> bool:
        """Whether a new unit may start: always while closed; while open, only the one
        new unit a probe asked for."""
        if not self.circuit.is_open:
            return True
        if self._may_start_one:
            self._may_start_one = False
            return True
        return False

    def started(self, unit: U) -> None:
        """``unit`` has started; while the circuit is open it is the probe."""
        if self.circuit.is_open and self._probing is None:
            self._probing = unit

    def park(self, unit: U) -> Deferred[None]:
        """Fires when ``unit`` may try (it probes, or the circuit closed); cancel to leave."""
        if not self.circuit.is_open or self._probing is unit:
            self._probing = unit if self.circuit.is_open else None
            return succeed(None)

        def cancel(_: Deferred[None]) -> None:
            self.forget(unit)

        d: Deferred[None] = Deferred(cancel)
        self._parked[unit] = d
        self._arm()
        return d

    def verdict(self, unit: U, verdict: Verdict) -> None:
        """The verdict of one attempt of ``unit``."""
        circuit = self.circuit
        if verdict.delivered:
            if circuit.succeeded():
                self._close()
            return
        if not verdict.retryable or verdict.throttled:
            # A throttled attempt (SPEC §5) is back-pressure, never a step towards opening:
            # the endpoint is up and answering, as with a 4xx.
            if verdict.answered:
                circuit.answered()
                if circuit.is_open:
                    # The endpoint is up and judging (a 4xx): the outage is over.
                    circuit.succeeded()
                    self._close()
                    return
        else:
            if verdict.retry_after is not None:
                self._hold = verdict.retry_after
            if circuit.failed(unit, verdict.reason, self._clock.seconds()):
                self._open()
                return
        if self._probing is unit:
            self._probing = None
        self._arm()

    def open(self, reason: str) -> None:
        """Open the circuit (a record's retries are used up with no good answer since)."""
        if self.circuit.open(reason, self._clock.seconds()):
            self._open()

    def forget(self, unit: U) -> None:
        """``unit`` has ended or left (delivered, dead-lettered, cancelled): it neither
        waits nor probes any more."""
        # A parked unit leaves by its owner cancelling its wait: nothing to fire.
        self._parked.pop(unit, None)
        if self._probing is unit:
            self._probing = None
        self._arm()

    def stop(self) -> None:
        """The job stops: no more probes."""
        self._stopped = True
        self._cancel_timer()

    def armed(self) -> bool:
        """Whether a probe is armed or under way (the rule: always so while open)."""
        return self._probing is not None or (self._timer is not None and self._timer.active())

    def probe_interval(self) -> float:
        """Seconds between two probes now."""
        wait = self._interval()
        return max(wait, self._hold) if self._hold is not None else wait

    # -- inside --------------------------------------------------------------------------

    def _open(self) -> None:
        self._probing = None
        self._opened()
        self._arm()

    def _close(self) -> None:
        self._cancel_timer()
        self._hold = None
        self._probing = None
        self._may_start_one = False
        parked, self._parked = self._parked, {}
        for d in parked.values():
            d.callback(None)
        self._closed()

    def _arm(self) -> None:
        if self._stopped or not self.circuit.is_open or self._probing is not None:
            return
        if self._timer is None or not self._timer.active():
            self._timer = self._clock.callLater(self.probe_interval(), self._probe)

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _probe(self) -> None:
        self._timer = None
        if self._stopped or not self.circuit.is_open:
            return
        self._hold = None
        if self._probing is None and self._parked:
            oldest = min(self._parked, key=self._order)
            self._probing = oldest
            self._parked.pop(oldest).callback(None)
            return
        if self._probing is None:
            # Nothing waits (revoked meanwhile): one new record may start, and probes.
            self._may_start_one = True
            self._start_one()
        self._arm()

    def describe(self) -> dict[str, Any]:
        """For tests and logs: what waits and whether a probe is armed."""
        return {"open": self.circuit.is_open, "parked": len(self._parked),
                "probing": self._probing is not None, "armed": self.armed()}
