"""In-process tests of job lifecycle (restconsumer.supervisor) and job control (restconsumer.control):
an in-memory store, runners that record what is done to them, no Redis and no Kafka.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed

from restconsumer.control import JobControl
from restconsumer.delivery.runner import Shared
from restconsumer.model import Job, validate
from restconsumer.offsets import OffsetError, OffsetRequest
from restconsumer.store import JobRecord, RedisAddress, StoreUnavailable
from restconsumer.supervisor import Supervisor


def definition(job_id: str, topic: str = "t", url: str = "http://h/x/{id}") -> dict[str, Any]:
    job = validate({"id": job_id, "owner": "o", "type": "POST", "topic": topic,
                    "datamap": {"id": "$.msg.id"}, "url": url})
    return {**job.definition, "hash": job.hash, "modified": job.modified}


class MemoryStore:
    """The part of JobStore the supervisor reads."""

    def __init__(self) -> None:
        self.records: dict[str, JobRecord] = {}
        self.down = False

    async def ids(self) -> set[str]:
        if self.down:
            raise StoreUnavailable("down")
        return set(self.records)

    async def record(self, job_id: str) -> JobRecord | None:
        if self.down:
            raise StoreUnavailable("down")
        return self.records.get(job_id)


class RecordingRunner:
    """A runner that only records its lifecycle."""

    made: list[RecordingRunner] = []

    def __init__(self, job: Job, shared: Shared) -> None:
        self.job = job
        self.events: list[str] = []
        self.stop_result: Deferred[None] = succeed(None)
        RecordingRunner.made.append(self)

    def start(self) -> None:
        self.events.append("start")

    def can_take(self, job: Job) -> bool:
        return job.topics == self.job.topics

    def update(self, job: Job) -> None:
        self.events.append("update")
        self.job = job

    def stop(self) -> Deferred[None]:
        self.events.append("stop")
        return self.stop_result


@pytest.fixture
def sup() -> tuple[Supervisor, MemoryStore]:
    RecordingRunner.made = []
    store = MemoryStore()
    supervisor = Supervisor(store, None, runner_factory=RecordingRunner)  # type: ignore[arg-type]
    supervisor.startService()
    return supervisor, store


def runners(supervisor: Supervisor) -> dict[str, RecordingRunner]:
    return supervisor.runners  # type: ignore[return-value]


@pytest_twisted.ensureDeferred
async def test_reconcile_starts_stored_jobs_and_stops_removed_ones(sup: Any) -> None:
    supervisor, store = sup
    store.records["a"] = JobRecord(definition("a"))
    store.records["b"] = JobRecord(definition("b"))
    await supervisor.reconcile()
    assert sorted(runners(supervisor)) == ["a", "b"]
    del store.records["a"]
    await supervisor.reconcile()
    assert sorted(runners(supervisor)) == ["b"]
    assert RecordingRunner.made[0].events == ["start", "stop"]


@pytest_twisted.ensureDeferred
async def test_a_change_with_the_same_topics_is_applied_in_place(sup: Any) -> None:
    supervisor, store = sup
    store.records["a"] = JobRecord(definition("a"))
    await supervisor.sync("a")
    store.records["a"] = JobRecord(definition("a", url="http://h/y/{id}"))
    await supervisor.sync("a")
    [runner] = RecordingRunner.made
    assert runner.events == ["start", "update"]


@pytest_twisted.ensureDeferred
async def test_new_topics_mean_a_new_runner(sup: Any) -> None:
    supervisor, store = sup
    store.records["a"] = JobRecord(definition("a"))
    await supervisor.sync("a")
    store.records["a"] = JobRecord(definition("a", topic="other"))
    await supervisor.sync("a")
    assert [r.events for r in RecordingRunner.made] == [["start", "stop"], ["start"]]


@pytest_twisted.ensureDeferred
async def test_stopped_or_moving_jobs_do_not_run(sup: Any) -> None:
    supervisor, store = sup
    store.records["a"] = JobRecord(definition("a"), stopped=True)
    store.records["b"] = JobRecord(definition("b"), moving_offsets=True)
    await supervisor.reconcile()
    assert runners(supervisor) == {}


@pytest_twisted.ensureDeferred
async def test_an_invalid_stored_job_is_not_run(sup: Any) -> None:
    supervisor, store = sup
    store.records["bad"] = JobRecord({"id": "bad", "owner": "o"})
    await supervisor.reconcile()
    assert runners(supervisor) == {}


@pytest_twisted.ensureDeferred
async def test_the_store_being_away_changes_nothing(sup: Any) -> None:
    supervisor, store = sup
    store.records["a"] = JobRecord(definition("a"))
    await supervisor.reconcile()
    store.down = True
    await supervisor.reconcile()
    await supervisor.sync("a")
    assert list(runners(supervisor)) == ["a"]


@pytest_twisted.ensureDeferred
async def test_stopping_the_service_waits_for_every_runner(sup: Any) -> None:
    supervisor, store = sup
    store.records["a"] = JobRecord(definition("a"))
    await supervisor.sync("a")
    pending: Deferred[None] = Deferred()
    RecordingRunner.made[0].stop_result = pending
    stopped = supervisor.stopService()
    assert not stopped.called
    pending.callback(None)
    assert stopped.called


@pytest_twisted.ensureDeferred
async def test_an_announcement_applies_the_change(sup: Any) -> None:
    supervisor, store = sup
    from twisted.internet import reactor

    control = JobControl(reactor, RedisAddress.from_url("redis://127.0.0.1:1/0"), supervisor)
    store.records["a"] = JobRecord(definition("a"))
    control.announced("msg/job:a", "update")
    await _settle()
    assert list(runners(supervisor)) == ["a"]
    del store.records["a"]
    control.announced("msg/job:a", "delete")
    control.announced("msg/other", "noise")
    await _settle()
    assert runners(supervisor) == {}


def _settle() -> Deferred[None]:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    return deferLater(reactor, 0, lambda: None)


def test_offset_requests_are_checked_against_the_job() -> None:
    one = validate({"id": "a", "owner": "o", "type": "POST", "topic": ["t1", "t2"],
                    "datamap": {"id": "$.msg.id"}, "url": "http://h/{id}"})
    assert OffsetRequest.parse("beginning", None, None, one) == OffsetRequest("beginning")
    assert OffsetRequest.parse("42", "t1", "3", one) == OffsetRequest(42, "t1", 3)
    with pytest.raises(OffsetError) as caught:
        OffsetRequest.parse("-1", "nope", "x", one)
    assert caught.value.status == 400
    text = str(caught.value)
    assert "offset must be" in text and "topic 'nope'" in text and "partition must be" in text
    with pytest.raises(OffsetError, match="partition needs topic"):
        OffsetRequest.parse("end", None, "0", one)
