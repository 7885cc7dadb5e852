"""What starts next (SPEC §11): order groups, ``max_in_flight`` (a number, or the limit the
job finds itself), batches, the circuit's say.

:class:`Dispatcher` queues a job's records by order group in its
:class:`~restconsumer.delivery.ordering.Scheduler` — or, in a batched job, gathers them into
one batch per partition (:class:`Batches`) — and starts every unit the scheduler and the
circuit let start, through the :class:`~restconsumer.delivery.deliverer.Deliverer`. It
knows every unit under way, per partition, so that a revocation can wait for the requests
on the wire and cancel the rest. It owns one rule:

    a unit it started is under way until its delivery has ended; then, and only then, its
    order group may go on — so records of one group never overtake each other.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from restconsumer.base.types import TP
from restconsumer.delivery.batching import Batcher
from restconsumer.delivery.breaker import Breaker
from restconsumer.delivery.concurrency import AdaptiveLimit
from restconsumer.delivery.ordering import Scheduler
from restconsumer.delivery.settings import Current
from restconsumer.delivery.units import Message, Unit
from restconsumer.jobs.work import RecordWork

__all__ = ["Batches", "Dispatcher"]


class Batches:
    """A batched job's records waiting for their batch, one pending batch per partition;
    a batch is ready when full, or when its ``max_wait`` has passed."""

    def __init__(self, clock: IReactorTime, current: Current,
                 ready: Callable[[TP, list[tuple[Message, RecordWork]]], None]) -> None:
        settings = current.settings.batch
        assert settings is not None
        self._clock = clock
        self._max_wait = settings.max_wait
        self._batcher: Batcher[tuple[Message, RecordWork]] = Batcher(settings.max_messages,
                                                                    settings.max_bytes)
        self._ready = ready
        self._timers: dict[TP, IDelayedCall] = {}

    def add(self, tp: TP, message: Message, record: RecordWork) -> None:
        """Add a record after the others of its partition."""
        request = record.request
        assert request is not None
        for items in self._batcher.add(tp, (message, record), len(request.body or b"")):
            self._ready(tp, items)
        if self._batcher.pending(tp):
            if tp not in self._timers:
                self._timers[tp] = self._clock.callLater(self._max_wait, self._flush, tp)
        else:
            self._cancel(tp)

    def _flush(self, tp: TP) -> None:
        self._timers.pop(tp, None)
        items = self._batcher.take(tp)
        if items:
            self._ready(tp, items)

    def _cancel(self, tp: TP) -> None:
        timer = self._timers.pop(tp, None)
        if timer is not None and timer.active():
            timer.cancel()

    def drop(self, tp: TP) -> None:
        """Forget what waits for ``tp``'s batch (released with its partition)."""
        self._cancel(tp)
        self._batcher.take(tp)

    def flush_all(self) -> None:
        """Every pending batch is ready now, full or not (the job stops: SPEC §6's drain)."""
        for tp in list(self._timers):
            self._cancel(tp)
            self._flush(tp)


class Dispatcher:
    """Queues a job's units and starts those that may start (see the module's docstring)."""

    def __init__(self, clock: IReactorTime, current: Current, breaker: Breaker[Unit],
                 start: Callable[[Unit], Deferred[None]], concurrency: AdaptiveLimit | None = None) -> None:
        self._clock = clock
        #: With ``max_in_flight: "auto"``: the limit on requests on the wire, and its holds.
        self.concurrency = concurrency if concurrency is not None else AdaptiveLimit()
        self._wake: IDelayedCall | None = None
        self._current = current
        self._breaker = breaker
        self._start = start
        settings = current.settings
        self.scheduler: Scheduler[Unit] = Scheduler(settings.max_in_flight)
        self._by_partition = settings.ordering == "partition"
        self.batches = Batches(clock, current, self._batch_ready) if settings.batch is not None else None
        self._active: dict[TP, set[Unit]] = {}
        self._seq = itertools.count()
        self._pumping = False
        self._pump_again = False
        self.stopping = False

    # -- queueing ------------------------------------------------------------------------

    def record(self, tp: TP, message: Message, record: RecordWork) -> None:
        """Queue one record (not started yet: :meth:`pump` starts what may)."""
        if self.batches is not None and record.request is not None:
            self.batches.add(tp, message, record)
            return
        group: Hashable | None = tp
        if not self._by_partition:
            group = None if record.order is None else (tp, record.order)
        self.scheduler.add(group, Unit(message, record, next(self._seq)))

    def undecodable(self, tp: TP, message: Message) -> None:
        """Queue a message that cannot be decoded (it is dead-lettered in its turn)."""
        self.scheduler.add(tp, Unit(message, None, next(self._seq)))

    def _batch_ready(self, tp: TP, items: list[tuple[Message, RecordWork]]) -> None:
        # One batch per partition under way at a time: the partition is the order group.
        self.scheduler.add(tp, Unit(items[0][0], items[0][1], next(self._seq), batch=items))
        self.pump()

    # -- starting ------------------------------------------------------------------------

    def pump(self) -> None:
        """Start every unit the scheduler and the circuit let start."""
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        scheduler, breaker = self.scheduler, self._breaker
        scheduler.max_in_flight = self._bound()
        try:
            again = True
            while again:
                self._pump_again = False
                while not self.stopping and breaker.may_start() and \
                        (taken := scheduler.take()) is not None:
                    group, unit = taken
                    unit.group = group
                    active = self._active.get(unit.tp)
                    if active is None:
                        active = self._active[unit.tp] = set()
                    active.add(unit)
                    breaker.started(unit)
                    task = unit.task = self._start(unit)
                    task.addBoth(self._ended, unit)
                again = self._pump_again
                if again:
                    scheduler.max_in_flight = self._bound()
        finally:
            self._pumping = False

    def _bound(self) -> int:
        """How many units may be under way now. A number: that many. ``"auto"``: the
        controller's limit on requests *on the wire*, so units off it (waiting to retry,
        or for the ``ratelimit`` pace) come on top; none while a ``Retry-After`` holds or
        the pacing interval has not passed (a wake-up is set for when it has)."""
        settings = self._current.settings
        if not settings.adaptive:
            return settings.max_in_flight
        concurrency = self.concurrency
        concurrency.ceiling = settings.max_in_flight
        now = self._clock.seconds()
        if not concurrency.may_send(now):
            if self._wake is None or not self._wake.active():
                self._wake = self._clock.callLater(concurrency.next_send(now) - now, self.pump)
            return 0
        under_way = self.scheduler.in_flight
        bound = under_way - concurrency.in_flight + concurrency.limit
        if concurrency.pace > 0:
            # Paced: one more now at most; the next when its interval has passed.
            return min(bound, under_way + 1)
        return bound

    def _ended(self, _: Any, unit: Unit) -> None:
        unit.task = None
        self.scheduler.done(unit.group)
        active = self._active.get(unit.tp)
        if active is not None:
            active.discard(unit)
        self._breaker.forget(unit)
        ended, unit.ended = unit.ended, []
        for d in ended:
            if not d.called:  # a revocation may have stopped waiting for it
                d.callback(None)
        self.pump()

    @property
    def under_way(self) -> int:
        """Units started and not ended."""
        return self.scheduler.in_flight

    # -- letting go ----------------------------------------------------------------------

    def revoke(self, partitions: list[TP], lost: bool) -> list[Deferred[None]]:
        """Drop what waits of ``partitions``, cancel what is not on the wire (all, if
        ``lost``); the ends of the requests on the wire, which may finish."""
        gone = set(partitions)
        self.scheduler.drop(lambda unit: unit.tp in gone)
        waiting: list[Deferred[None]] = []
        for tp in partitions:
            if self.batches is not None:
                self.batches.drop(tp)
            for unit in list(self._active.get(tp, ())):
                if lost or not unit.sending:
                    self.cancel(unit)  # a wait to retry, or another consumer has it already
                else:
                    unit.revoking = True
                    d: Deferred[None] = Deferred()
                    unit.ended.append(d)
                    waiting.append(d)
        return waiting

    def let_go(self, partitions: list[TP]) -> None:
        """Cancel whatever of ``partitions`` is still under way."""
        for tp in partitions:
            for unit in list(self._active.get(tp, ())):
                self.cancel(unit)
            self._active.pop(tp, None)

    def cancel(self, unit: Unit) -> None:
        """Abandon ``unit``: it ends neither delivered nor dead-lettered."""
        unit.cancelled = True
        if unit.task is not None:
            # Also when it has fired but waits on the rest of the retry loop (chained).
            unit.task.cancel()

    def stop(self) -> None:
        """Send the half-full batches (those that may start now: one per partition), then
        start nothing more; what is left waiting is released with its partition."""
        if self.batches is not None:
            self.batches.flush_all()
        self.stopping = True
        if self._wake is not None and self._wake.active():
            self._wake.cancel()

    def cancel_all(self) -> None:
        """Abandon every unit under way (a consumer that would not close left them)."""
        self.let_go(list(self._active))
