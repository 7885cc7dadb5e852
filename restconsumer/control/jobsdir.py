"""The jobs folder: ``*.json`` files preloaded into the store at start-up (SPEC §3)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from restconsumer.control.store import JobStore, StoreUnavailable
from restconsumer.jobs.model import InvalidJob, Policy, validate

__all__ = ["JobFile", "JobsFolder", "read_folder"]


@dataclass(frozen=True)
class JobFile:
    """One file of the jobs folder: the definitions it holds, or why it cannot be read."""

    name: str
    definitions: list[Any]
    error: str | None = None


def read_folder(folder: str | Path) -> list[JobFile]:
    """Read every ``*.json`` file of ``folder``, in name order; a file holds a job or a list."""
    files = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            files.append(JobFile(path.name, [], f"cannot be read as JSON: {e or type(e).__name__}"))
            continue
        files.append(JobFile(path.name, data if isinstance(data, list) else [data]))
    return files


class JobsFolder(Service):
    """Creates the jobs of the folder that the store does not have yet.

    The files are read when the service is built (before the reactor runs); the jobs
    are written once Redis answers, retrying every ``retry_every`` seconds until then.
    Each is checked against the ``policy`` as a job posted to the API is (allowed hosts,
    its owner's topic limits, secret references).
    """

    log = Logger()

    def __init__(self, folder: str | Path, store: JobStore, clock: IReactorTime, *,
                 allow_hosts: frozenset[str] | None = None, policy: Policy | None = None,
                 retry_every: float = 1.0) -> None:
        self.folder = Path(folder)
        self.files = read_folder(folder)
        self._store = store
        self._clock = clock
        self._allow_hosts = allow_hosts
        self._policy = policy
        self._retry_every = retry_every
        self._later: IDelayedCall | None = None
        self.done: Deferred[dict[str, list[str]]] = Deferred()

    def startService(self) -> None:
        """Load the folder's jobs into the store as soon as it answers."""
        super().startService()
        self._later = self._clock.callLater(0, self._attempt)

    def stopService(self) -> None:
        """Give up loading if it has not happened yet."""
        super().stopService()
        if self._later is not None and self._later.active():
            self._later.cancel()

    def _attempt(self) -> None:
        self._later = None
        Deferred.fromCoroutine(self.load()).addCallbacks(self.done.callback, self._failed)

    def _failed(self, failure: Any) -> None:
        if failure.check(StoreUnavailable) and self.running:
            self.log.info("jobs folder waits for Redis: {reason}", reason=str(failure.value))
            self._later = self._clock.callLater(self._retry_every, self._attempt)
        elif self.running:
            self.log.failure("loading the jobs folder failed", failure)

    async def load(self) -> dict[str, list[str]]:
        """Create the folder's valid jobs the store lacks; report what happened to each."""
        report: dict[str, list[str]] = {"created": [], "kept": [], "invalid": []}
        for file in self.files:
            if file.error is not None:
                self.log.error("jobs folder: {file} {reason}", file=file.name, reason=file.error)
                report["invalid"].append(file.name)
                continue
            for index, raw in enumerate(file.definitions):
                where = file.name if len(file.definitions) == 1 else f"{file.name}[{index}]"
                try:
                    job = validate(raw, allow_hosts=self._allow_hosts, policy=self._policy)
                except InvalidJob as e:
                    self.log.error("jobs folder: {file} is not a valid job: {reason}",
                                   file=where, reason=str(e))
                    report["invalid"].append(where)
                    continue
                if await self._store.create(job):
                    self.log.info("jobs folder: job {job_id} created from {file}",
                                  job_id=job.id, file=where)
                    report["created"].append(job.id)
                else:
                    self.log.info("jobs folder: job {job_id} already stored; {file} left alone",
                                  job_id=job.id, file=where)
                    report["kept"].append(job.id)
        return report
