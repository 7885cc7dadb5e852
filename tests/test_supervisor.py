"""In-process tests of job lifecycle (restconsumer.control.supervisor) and job control
(restconsumer.control.channel): an in-memory store, runners that record what is done to
them, no Redis and no Kafka.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed

from restconsumer.control.channel import JobControl
from restconsumer.control.offsets import OffsetError, OffsetRequest
from restconsumer.control.store import JobRecord, RedisAddress, StoreUnavailable
from restconsumer.control.supervisor import Supervisor
from restconsumer.delivery.runner import JobRunner, Shared
from restconsumer.delivery.settings import Current
from restconsumer.jobs.model import Job, validate


def definition(job_id: str, topic: str = "t", url: str = "http://h/x/{id}", **more: Any) -> dict[str, Any]:
    job = validate({"id": job_id, "owner": "o", "type": "POST", "topic": topic,
                    "datamap": {"id": "$.msg.id"}, "url": url, **more})
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


class NoLimits:
    """The part of Shared that a job's settings come from, with no owner limited."""

    destinations: dict[str, Any] = {}
    settings = Shared.settings


class RecordingRunner:
    """A runner that records its lifecycle; what it takes in place is decided by the real
    JobRunner's own ``can_take`` on its settings, not by a rule of the test's."""

    made: list[RecordingRunner] = []

    def __init__(self, job: Job, shared: Shared | None) -> None:
        self._shared = shared if shared is not None else NoLimits()
        self.current = Current(self._shared.settings(job))
        self.events: list[str] = []
        self.stop_result: Deferred[None] = succeed(None)
        RecordingRunner.made.append(self)

    @property
    def job(self) -> Job:
        return self.current.settings.job

    can_take = JobRunner.can_take

    def start(self) -> None:
        self.events.append("start")

    def update(self, job: Job) -> None:
        self.events.append("update")
        self.current.settings = self._shared.settings(job)

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


IN_PLACE = {"url": {"url": "http://h/y/{id}"}, "headers": {"headers": {"X-New": "1"}},
            "retry": {"retry": {"max_attempts": 2}}, "timeout": {"timeout": 5},
            "success_status": {"success_status": [409]}, "max_in_flight": {"max_in_flight": 4}}
REBUILT = {"topic": {"topic": "other"}, "ordering": {"ordering": "key"},
           "start_from": {"start_from": "latest"},
           "batch": {"url": "http://h/batch", "json_body": ["id"], "batch": {"max_messages": 5}}}


@pytest.mark.parametrize("change", [*IN_PLACE, *REBUILT])
@pytest_twisted.ensureDeferred
async def test_what_a_running_job_takes_in_place_follows_the_runners_own_rule(sup: Any, change: str) -> None:
    """Records already queued by their order group or gathered into batches, and a consumer
    subscribed from where start_from says, cannot take a change of those: a new runner; any
    other change is applied to the running one."""
    supervisor, store = sup
    store.records["a"] = JobRecord(definition("a"))
    await supervisor.sync("a")
    store.records["a"] = JobRecord(definition("a", **{**IN_PLACE, **REBUILT}[change]))
    await supervisor.sync("a")
    if change in IN_PLACE:
        [runner] = RecordingRunner.made
        assert runner.events == ["start", "update"]
        assert runners(supervisor)["a"] is runner
    else:
        assert [r.events for r in RecordingRunner.made] == [["start", "stop"], ["start"]]
    assert runners(supervisor)["a"].job.hash == store.records["a"].job["hash"]


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


# -- with the real JobRunner (issue 19): rebuilds, and a job that broke --------------------


def real_supervisor() -> tuple[Supervisor, MemoryStore, Any]:
    from twisted.internet.task import Clock

    from restconsumer.delivery.budget import ByteBudget
    from restconsumer.delivery.sender import HTTPSender
    from tests.test_runner import FakeAgent, FakeDeadLetters, FakeLoop

    clock = Clock()
    shared = Shared(clock, {"bootstrap.servers": "x"}, HTTPSender(clock, agent=FakeAgent(auto=200)),
                    FakeDeadLetters(), ByteBudget(1 << 24), clock=clock,  # type: ignore[arg-type]
                    loop_factory=FakeLoop)
    store = MemoryStore()
    supervisor = Supervisor(store, shared)  # type: ignore[arg-type]
    supervisor.startService()
    return supervisor, store, clock


def batched(job_id: str, **batch: Any) -> dict[str, Any]:
    stored = definition(job_id, url="http://h/batch")
    job = validate({k: v for k, v in stored.items() if k not in ("hash", "modified")}
                   | {"batch": batch, "json_body": ["id"]})
    return {**job.definition, "hash": job.hash, "modified": job.modified}


@pytest_twisted.ensureDeferred
async def test_a_batched_job_whose_batch_changes_is_rebuilt_and_a_header_change_is_taken_in_place() -> None:
    supervisor, store, _ = real_supervisor()
    store.records["a"] = JobRecord(batched("a", max_messages=10))
    await supervisor.sync("a")
    first = supervisor.runners["a"]
    changed = batched("a", max_messages=10)
    changed["headers"] = {"X-New": "1"}
    job = validate({k: v for k, v in changed.items() if k not in ("hash", "modified")})
    store.records["a"] = JobRecord({**job.definition, "hash": job.hash, "modified": job.modified})
    await supervisor.sync("a")
    assert supervisor.runners["a"] is first, "a header change is taken in place"
    store.records["a"] = JobRecord(batched("a", max_messages=20))
    await supervisor.sync("a")
    assert supervisor.runners["a"] is not first, "a batch change rebuilds the job"
    assert first._stopped is not None and first._stopped.called


@pytest_twisted.ensureDeferred
async def test_a_job_that_broke_shows_error_and_is_started_again_with_backoff() -> None:
    supervisor, store, clock = real_supervisor()
    store.records["a"] = JobRecord(definition("a"))
    await supervisor.sync("a")
    runner = supervisor.runners["a"]
    runner.assigned([("t", 0)])
    runner._broken("internal error taking messages in: boom")  # as JobRunner.arrived does
    assert "a" not in supervisor.runners and supervisor.restarts == {"a": 1}
    assert supervisor.errors["a"].reason.startswith("internal error taking messages in")
    await supervisor.sync("a")  # a reconcile meanwhile does not skip the backoff
    assert "a" not in supervisor.runners
    clock.advance(1.0)
    again = supervisor.runners["a"]
    assert again is not runner and "a" not in supervisor.errors
    again._broken("boom again")
    clock.advance(1.9)
    assert "a" not in supervisor.runners, "the second wait is longer"
    clock.advance(0.1)
    assert "a" in supervisor.runners and supervisor.restarts == {"a": 2}
