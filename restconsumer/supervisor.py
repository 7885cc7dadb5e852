"""Job lifecycle on this instance: which jobs run, started, changed and stopped as Redis says."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, gatherResults
from twisted.logger import Logger

from restconsumer.model import InvalidJob, Job, load
from restconsumer.runner import JobRunner, Shared
from restconsumer.store import JobRecord, JobStore, StoreUnavailable

__all__ = ["Supervisor"]

log = Logger()
_LOOK_UP = object()


class Supervisor(Service):
    """Keeps one :class:`JobRunner` per stored job, in step with the store.

    Changes for one job are applied one at a time (a per-job lock), so an update racing a
    delete always ends as the store says.
    """

    def __init__(self, store: JobStore, shared: Shared, *,
                 runner_factory: Callable[[Job, Shared], JobRunner] = JobRunner) -> None:
        self._store = store
        self._shared = shared
        self._runner_factory = runner_factory
        self.runners: dict[str, JobRunner] = {}
        self._locks: dict[str, DeferredLock] = {}
        self._stopping: set[Deferred[None]] = set()
        #: Told of every runner once it has stopped (its last counts are reported).
        self.on_stopped: Callable[[JobRunner], None] | None = None

    def stopService(self) -> Deferred[Any]:
        """Stop every job: requests under way end, finished offsets are committed."""
        super().stopService()
        runners, self.runners = list(self.runners.values()), {}
        stopping = [self._stop(r) for r in runners] + list(self._stopping)
        return gatherResults(stopping, consumeErrors=True)

    def _stop(self, runner: JobRunner) -> Deferred[None]:
        def stopped(result: Any) -> Any:
            if self.on_stopped is not None:
                self.on_stopped(runner)
            return result

        d = runner.stop().addBoth(stopped)
        # Kept until done, so that stopping the service waits for stops under way.
        self._stopping.add(d)
        d.addBoth(lambda result: (self._stopping.discard(d), result)[1])
        return d

    async def reconcile(self) -> None:
        """Bring the running jobs in line with every job in the store."""
        if not self.running:
            return
        try:
            stored = await self._store.ids()
        except StoreUnavailable as e:
            log.warn("reconcile skipped: {reason}", reason=str(e))
            return
        for job_id in sorted(set(self.runners) | stored):
            # Each job is read afresh under its lock: a change applied meanwhile is not
            # undone by an older snapshot, and one bad job does not hold up the others.
            try:
                await self.sync(job_id)
            except Exception:
                log.failure("job {job_id}: reconcile failed", job_id=job_id)

    def changed(self, job_id: str) -> None:
        """A change to ``job_id`` was announced: look it up and act on it."""
        Deferred.fromCoroutine(self.sync(job_id)).addErrback(
            lambda f: log.failure("job {job_id}: applying a change failed", f, job_id=job_id))

    async def sync(self, job_id: str, record: Any = _LOOK_UP) -> None:
        """Make the runner of ``job_id`` match its stored record (None: not stored)."""
        lock = self._locks.setdefault(job_id, DeferredLock())
        await lock.acquire()
        try:
            if not self.running:
                return
            if record is _LOOK_UP:
                try:
                    record = await self._store.record(job_id)
                except StoreUnavailable as e:
                    log.warn("job {job_id}: change not applied yet: {reason}", job_id=job_id,
                             reason=str(e))
                    return
            if record is not None and not record.runnable:
                record = None
            stored = record.job if isinstance(record, JobRecord) else None
            runner = self.runners.get(job_id)
            if runner is not None and stored is not None and stored.get("hash") == runner.job.hash:
                return
            await self._apply(job_id, self._desired(job_id, stored))
        finally:
            lock.release()
            if not lock.locked and not lock.waiting:
                self._locks.pop(job_id, None)

    @staticmethod
    def _desired(job_id: str, stored: dict[str, Any] | None) -> Job | None:
        if stored is None:
            return None
        try:
            return load(stored)
        except InvalidJob as e:
            log.error("job {job_id}: the stored definition is invalid, not running it: {reason}",
                      job_id=job_id, reason=str(e))
            return None

    async def _apply(self, job_id: str, job: Job | None) -> None:
        runner = self.runners.get(job_id)
        if runner is not None:
            if job is not None and runner.job.hash == job.hash:
                return
            if job is not None and runner.can_take(job):
                try:
                    runner.update(job)
                except Exception:
                    log.failure("job {job_id}: the new definition cannot be used; the old one "
                                "runs on", job_id=job_id)
                return
            del self.runners[job_id]
            await self._stop(runner)
        if job is not None and self.running:
            try:
                runner = self._runner_factory(job, self._shared)
            except Exception:
                log.failure("job {job_id}: cannot be run", job_id=job_id)
                return
            self.runners[job_id] = runner
            runner.start()
