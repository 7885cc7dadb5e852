"""Job lifecycle on this instance: which jobs run, started, changed and stopped as Redis says."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, gatherResults
from twisted.logger import Logger

from restconsumer.control.store import JobRecord, JobStore, StoreUnavailable
from restconsumer.delivery.runner import JobRunner, Shared
from restconsumer.jobs.model import InvalidJob, Job, Policy, load
from restconsumer.jobs.secrets import UnresolvedSecrets, resolve, sealed_paths

__all__ = ["JobError", "Supervisor"]

log = Logger()
_LOOK_UP = object()
#: The longest wait before a job that broke is started again.
MAX_RESTART_WAIT = 60.0


@dataclass(frozen=True)
class JobError:
    """Why a stored job cannot run on this instance (its ``error`` state), since when."""

    reason: str
    at: str
    hash: str | None

    def as_dict(self) -> dict[str, str]:
        """As the status shows it."""
        return {"reason": self.reason, "at": self.at}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Supervisor(Service):
    """Keeps one :class:`JobRunner` per stored job, in step with the store.

    Changes for one job are applied one at a time (a per-job lock), so an update racing a
    delete always ends as the store says.

    A job is checked again when it starts here (SPEC §8): against the ``policy`` (its
    owner's topic limits, its secret references), its encrypted secrets opened, and its
    references resolved from ``environ`` and ``secrets_dir``. A job that fails is not run:
    it is in :attr:`errors`, which the status shows, and is tried again on every change and
    reconcile.
    """

    def __init__(self, store: JobStore, shared: Shared, *,
                 runner_factory: Callable[[Job, Shared], JobRunner] = JobRunner,
                 policy: Policy | None = None, environ: Mapping[str, str] | None = None,
                 secrets_dir: str | Path | None = None) -> None:
        self._store = store
        self._shared = shared
        self._runner_factory = runner_factory
        self._policy = policy if policy is not None else Policy()
        self._environ = environ if environ is not None else os.environ
        self._secrets_dir = secrets_dir
        #: Jobs stored but unable to run here, and why.
        self.errors: dict[str, JobError] = {}
        self.runners: dict[str, JobRunner] = {}
        self._locks: dict[str, DeferredLock] = {}
        self._stopping: set[Deferred[None]] = set()
        #: Told of every runner once it has stopped (its last counts are reported).
        self.on_stopped: Callable[[JobRunner], None] | None = None
        #: Restarts of jobs that broke on this instance (SPEC §5), by job.
        self.restarts: dict[str, int] = {}
        self._restarting: dict[str, Any] = {}

    def stopService(self) -> Deferred[Any]:
        """Stop every job: requests under way end, finished offsets are committed."""
        super().stopService()
        for timer in self._restarting.values():
            if timer.active():
                timer.cancel()
        self._restarting.clear()
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

        def forget(result: Any) -> Any:
            self._stopping.discard(d)
            return result

        d.addBoth(forget)
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
        for job_id in sorted(set(self.runners) | set(self.errors) | stored):
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
            if job_id in self._restarting:
                return  # it broke here and waits for its restart
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

    def _desired(self, job_id: str, stored: dict[str, Any] | None) -> Job | None:
        if stored is None:
            self.errors.pop(job_id, None)
            return None
        try:
            job = self.runnable(stored)
        except (InvalidJob, UnresolvedSecrets) as e:
            reason = str(e)
        else:
            self.errors.pop(job_id, None)
            return job
        previous = self.errors.get(job_id)
        if previous is None or previous.reason != reason:
            # Said once, not at every reconcile.
            log.error("job {job_id}: cannot run, not started: {reason}", job_id=job_id,
                      reason=reason)
            self.errors[job_id] = JobError(reason, _now(), stored.get("hash"))
        return None

    def runnable(self, stored: dict[str, Any]) -> Job:
        """The job to run: checked, its secrets decrypted and its references resolved
        (raises InvalidJob or UnresolvedSecrets saying why it cannot run here)."""
        # What the store could not decrypt is still encrypted.
        sealed = sealed_paths(stored)
        if sealed:
            raise UnresolvedSecrets([(path, f"cannot be decrypted: it is encrypted under the key "
                                            f"with fingerprint {fingerprint}, which this "
                                            f"instance's --secret-key does not hold")
                                     for path, fingerprint in sealed])
        job = load(stored, self._policy)
        definition = resolve(job.definition, self._environ, self._secrets_dir)
        if definition == job.definition:
            return job
        # The hash stays that of the stored definition: a resolved value is no change of it.
        return Job(definition=definition, modified=job.modified, hash=job.hash, paths=job.paths)

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
            runner.on_error = self._broken
            runner.start()

    def _broken(self, runner: JobRunner, reason: str) -> None:
        """``runner`` broke (SPEC §5): it is stopped (what is finished is committed), the
        job shows ``error`` here, and it is started again after a backoff."""
        job_id = runner.job.id
        if self.runners.get(job_id) is not runner:
            return
        count = self.restarts[job_id] = self.restarts.get(job_id, 0) + 1
        delay = min(MAX_RESTART_WAIT, 2.0 ** (count - 1))
        log.error("job {job_id}: stopped on this instance: {reason}; starting it again in "
                  "{delay:.0f} s (restart {count})", job_id=job_id, reason=reason, delay=delay,
                  count=count)
        self.errors[job_id] = JobError(reason, _now(), runner.job.hash)
        del self.runners[job_id]
        self._stop(runner)
        clock = self._shared.clock or self._shared.reactor
        self._restarting[job_id] = clock.callLater(delay, self._restart, job_id)

    def _restart(self, job_id: str) -> None:
        self._restarting.pop(job_id, None)
        if self.running:
            self.changed(job_id)
