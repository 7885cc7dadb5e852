"""What jobs are doing: counters kept in Redis across instances, and each instance's report.

Every instance adds what its runners did to the job's counters in Redis about every
second, and reports the rate, lag and last error of its partitions. ``GET /job/{id}/status``
adds the answering instance's not yet reported counts, so it is exact for what that
instance did, and at most a second behind for the others.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from restconsumer.control.store import JobRecord, JobStore, StoreUnavailable
from restconsumer.control.supervisor import Supervisor
from restconsumer.delivery.runner import JobRunner

__all__ = ["COUNTERS", "StatusReporter", "job_status"]

log = Logger()

COUNTERS = ("consumed", "delivered", "retried", "dead_lettered", "failed", "filtered")
#: A report older than this comes from an instance that is gone or no longer runs the job.
FRESH = 15.0


def _instance_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _counts(runner: JobRunner) -> dict[str, int]:
    stats = runner.stats
    return {name: getattr(stats, name) for name in COUNTERS}


def _marks(runner: JobRunner) -> tuple[Any, ...]:
    """What a job's report is made of: the loop replaces its assignment and lag whole, so
    those are compared by identity, the rest by value."""
    stats, circuit = runner.stats, runner.circuit
    return (runner.loop.assignment, runner.loop.lag, stats.delivered, stats.consumed,
            stats.last_error_at, runner.held, circuit.reason, runner.held_bytes, runner.in_flight_limit)


def _unchanged(before: tuple[Any, ...], now: tuple[Any, ...]) -> bool:
    return before[0] is now[0] and before[1] is now[1] and before[2:] == now[2:]


class StatusReporter(Service):
    """Writes this instance's counters and reports to Redis, about every ``every`` seconds."""

    def __init__(self, store: JobStore, supervisor: Supervisor, clock: IReactorTime, *,
                 every: float = 1.0) -> None:
        self.instance = _instance_name()
        self._store = store
        self._supervisor = supervisor
        self._clock = clock
        self._every = every
        self._reported: dict[int, dict[str, int]] = {}
        self._written: dict[int, tuple[float, tuple[Any, ...]]] = {}
        self._timer = LoopingCall(self.flush)
        self._timer.clock = clock
        self._finals: set[Deferred[None]] = set()
        supervisor.on_stopped = self._runner_stopped

    def startService(self) -> None:
        """Start reporting."""
        super().startService()
        self._timer.start(self._every, now=False).addErrback(
            lambda f: log.failure("status reporting stopped", f))

    def stopService(self) -> Deferred[Any]:
        """Stop reporting, once the last reports of stopped jobs are written (or given up)."""
        super().stopService()
        if self._timer.running:
            self._timer.stop()
        return DeferredList(list(self._finals))

    def unreported(self, runner: JobRunner) -> dict[str, int]:
        """What ``runner`` did since its last report."""
        done = self._reported.get(id(runner), {})
        return {name: value - done.get(name, 0) for name, value in _counts(runner).items()}

    async def _report(self, runner: JobRunner, state: bool = True) -> tuple[dict[str, Any], Any] | None:
        """Add what ``runner`` did to the counters; with ``state``, its report and marks if it
        is due to be written (the caller writes every due report in one call)."""
        counts = _counts(runner)
        deltas = self.unreported(runner)
        if any(deltas.values()):
            # Marked reported first: a second flush meanwhile must not add them again.
            self._reported[id(runner)] = counts
            try:
                await self._store.add_stats(runner.job.id, deltas)
            except Exception:
                previous = {k: counts[k] - deltas[k] for k in counts}
                self._reported[id(runner)] = previous
                raise
        if not state:
            return None
        # An idle job's report changes little: written when it changes, else often enough
        # to stay fresh. Whether it changed is told from what it is made of, without
        # building it (200 idle jobs are looked at every second).
        marks = _marks(runner)
        last = self._written.get(id(runner))
        if last is not None and _unchanged(last[1], marks) and \
                self._clock.seconds() - last[0] < FRESH / 3:
            return None
        return self.local(runner), marks

    def local(self, runner: JobRunner) -> dict[str, Any]:
        """This instance's live report of one job."""
        now = self._clock.seconds()
        stats = runner.stats
        return {
            "at": now,
            "partitions": [f"{t}[{p}]" for t, p in runner.loop.assignment],
            "lag": {f"{t}[{p}]": n for (t, p), n in sorted(runner.loop.lag.items())},
            "oldest_unfinished_seconds": {f"{t}[{p}]": round(age, 3) for (t, p), age
                                          in sorted(runner.oldest_unfinished().items())},
            "restarts": self._supervisor.restarts.get(runner.job.id, 0),
            "rate": stats.rate(now),
            "bytes_held": runner.held_bytes,
            "in_flight_limit": runner.in_flight_limit,
            "in_flight": runner.requests_on_the_wire,
            "circuit": runner.circuit_status(),
            "last_error": None if stats.last_error is None else
            {"reason": stats.last_error, "at": stats.last_error_at},
        }

    async def flush(self) -> None:
        """Report every running job of this instance (errors are logged, never raised).

        The reports due are written in one call to Redis, not one per job."""
        due: dict[str, dict[str, Any]] = {}
        written: list[tuple[int, float, Any]] = []
        for runner in list(self._supervisor.runners.values()):
            try:
                report = await self._report(runner)
            except StoreUnavailable:
                return  # counted again at the next flush: nothing is lost
            except Exception:
                log.failure("job {job_id}: reporting its status failed", job_id=runner.job.id)
                continue
            if report is not None:
                due[runner.job.id] = report[0]
                written.append((id(runner), report[0]["at"], report[1]))
        # A job that cannot run here: other instances' status answers say why.
        for job_id in list(self._supervisor.errors):
            due[job_id] = self.failed(job_id)
        if not due:
            return
        try:
            await self._store.put_instance_states(self.instance, due)
        except StoreUnavailable:
            return
        except Exception:
            log.failure("reporting the jobs' status failed")
            return
        for key, at, marks in written:
            self._written[key] = (at, marks)

    def failed(self, job_id: str) -> dict[str, Any]:
        """This instance's report of a job it cannot run (see ``Supervisor.errors``)."""
        error = self._supervisor.errors[job_id]
        return {"at": self._clock.seconds(), "partitions": [], "error": error.as_dict(),
                "restarts": self._supervisor.restarts.get(job_id, 0)}

    def _runner_stopped(self, runner: JobRunner) -> None:
        # Its last counts still have to reach Redis; while shutting down, one try only.
        async def final() -> None:
            for _ in range(30 if self.running else 1):
                try:
                    await self._report(runner, state=False)
                    break
                except StoreUnavailable:
                    if not self.running:
                        log.warn("job {job_id}: last counts not reported: Redis is away",
                                 job_id=runner.job.id)
                        break
                    await deferLater(self._clock, 1.0, lambda: None)
            self._reported.pop(id(runner), None)
            self._written.pop(id(runner), None)

        d = Deferred.fromCoroutine(final()).addErrback(
            lambda f: log.failure("job {job_id}: final status report failed", f, job_id=runner.job.id))
        self._finals.add(d)
        d.addBoth(lambda _: self._finals.discard(d))


async def job_status(job_id: str, record: JobRecord, store: JobStore, supervisor: Supervisor,
                     reporter: StatusReporter, clock: IReactorTime) -> dict[str, Any]:
    """The status of one job as ``GET /job/{id}/status`` shows it."""
    totals, reports = await store.stats(job_id)
    counters = {name: int(totals.get(name, 0)) for name in COUNTERS}
    runner = supervisor.runners.get(job_id)
    now = clock.seconds()
    if runner is not None:
        for name, delta in reporter.unreported(runner).items():
            counters[name] += delta
        reports[reporter.instance] = reporter.local(runner)
    elif job_id in supervisor.errors:
        reports[reporter.instance] = reporter.failed(job_id)
    # A job that cannot run (a secret reference not resolved, a topic not allowed...): the
    # error state, with the reason of the latest instance to say so.
    failing = [r["error"] for r in reports.values() if isinstance(r, dict)
               and isinstance(r.get("error"), dict) and now - float(r.get("at", 0)) <= FRESH]
    error = max(failing, key=lambda e: str(e.get("at") or ""), default=None)
    fresh = {name: r for name, r in reports.items()
             if isinstance(r, dict) and now - float(r.get("at", 0)) <= FRESH and r.get("partitions")}
    lag: dict[str, int] = {}
    oldest: dict[str, float] = {}
    for report in fresh.values():
        lag.update(report.get("lag") or {})
        oldest.update(report.get("oldest_unfinished_seconds") or {})
    restarts = sum(int(r.get("restarts", 0)) for r in reports.values()
                   if isinstance(r, dict) and now - float(r.get("at", 0)) <= FRESH)
    errors = [r["last_error"] for r in reports.values()
              if isinstance(r, dict) and isinstance(r.get("last_error"), dict)]
    last_error = max(errors, key=lambda e: e.get("at") or 0, default=None)
    circuits = [r["circuit"] for r in fresh.values() if isinstance(r.get("circuit"), dict)]
    opened = [c for c in circuits if c.get("state") == "open"]
    circuit = min(opened, key=lambda c: c.get("since") or "") if opened else \
        {"state": "closed", "since": None, "reason": None}
    if record.stopped:
        state = "stopped"
    elif record.moving_offsets:
        state = "moving offsets"
    elif error is not None:
        state = "error"
    else:
        state = "running" if fresh else "starting"
    return {
        "id": job_id,
        "state": state,
        "counters": counters,
        "lag": dict(sorted(lag.items())),
        "total_lag": sum(lag.values()),
        "oldest_unfinished_seconds": dict(sorted(oldest.items())),
        "restarts": restarts,
        "rate": round(sum(float(r.get("rate", 0)) for r in fresh.values()), 2),
        "bytes_held": sum(int(r.get("bytes_held", 0)) for r in fresh.values()),
        # Each instance finds its own limit (SPEC §11): the job's is their sum.
        "in_flight_limit": sum(int(r.get("in_flight_limit", 0)) for r in fresh.values()),
        "in_flight": sum(int(r.get("in_flight", 0)) for r in fresh.values()),
        "last_error": last_error,
        "error": error if state == "error" else None,
        "circuit": circuit,
        "instances": [{"instance": name, "partitions": r.get("partitions", []),
                       "rate": r.get("rate", 0), "in_flight_limit": r.get("in_flight_limit", 0),
                       "in_flight": r.get("in_flight", 0)} for name, r in sorted(fresh.items())],
    }
