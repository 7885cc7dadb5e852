"""Job control (SPEC §5-7): stop/start, set_offset with two instances, ratelimit, status; the
control channel's subscription and the job counters, in-process against the real Redis."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs, formatEvent

from restconsumer.control.channel import JobControl
from restconsumer.control.store import JobStore, RedisAddress, StoreUnavailable
from tests.infra.kafka import KafkaBroker
from tests.infra.kafka_io import produce
from tests.infra.ports import wait_for
from tests.infra.redis import RedisServer
from tests.infra.service import ServiceProcess
from tests.infra.sink import Received, Sink

Start = Callable[..., ServiceProcess]


def job(name: str, topic: str, sink: Sink, **more: Any) -> dict[str, Any]:
    """A job posting each message's id, partition and offset to the sink."""
    return {"id": name, "owner": "ops", "type": "POST", "topic": topic,
            "datamap": {"id": "$.msg.id", "partition": "$.meta.partition", "offset": "$.meta.offset"},
            "url": f"{sink.url}/{name}/{{id}}", "json_body": ["partition", "offset"], **more}


def messages(prefix: str, count: int) -> list[bytes]:
    """``count`` JSON messages with ids prefix0, prefix1, ..."""
    return [json.dumps({"id": f"{prefix}{i}"}).encode() for i in range(count)]


def positions(received: list[Received]) -> list[tuple[int, int]]:
    """(partition, offset) of each request, in arrival order."""
    return [(b["partition"], b["offset"]) for b in (json.loads(r.body) for r in received)]


def status(service: ServiceProcess, name: str) -> dict[str, Any]:
    """GET /job/{name}/status."""
    answer = service.request("GET", f"/job/{name}/status")
    assert answer.status == 200, answer
    return answer.json


def test_stop_survives_a_restart_and_start_resumes(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink) -> None:
    """After stop nothing is sent, even after a restart; start resumes where it stopped."""
    name = topic(2)
    service = services()
    assert service.request("POST", "/job/pausing", job("pausing", name, sink)).status == 201
    produce(kafka.bootstrap, name, messages("a", 100), partitions=2)
    wait_for(lambda: sink.count() == 100, 30, "first 100")
    stopped = service.request("POST", "/job/pausing/stop")
    assert stopped.status == 200 and stopped.json["state"] == "stopped"
    wait_for(lambda: status(service, "pausing")["state"] == "stopped", 5, "stopped state")
    produce(kafka.bootstrap, name, messages("b", 60), partitions=2)
    time.sleep(3)
    assert sink.count() == 100

    service.stop()
    service = services()
    time.sleep(4)
    assert sink.count() == 100, "a stopped job ran after a restart"
    assert status(service, "pausing")["state"] == "stopped"

    assert service.request("POST", "/job/pausing/start").json["state"] == "running"
    wait_for(lambda: sink.count() >= 160, 30, "the 60 produced while stopped")
    time.sleep(1)
    ids = [r.path.rsplit("/", 1)[1] for r in sink.snapshot()]
    assert sorted(ids) == sorted([f"a{i}" for i in range(100)] + [f"b{i}" for i in range(60)])
    current = status(service, "pausing")
    assert current["state"] == "running"
    assert current["counters"]["delivered"] == 160
    assert current["counters"]["consumed"] == 160
    assert current["counters"]["dead_lettered"] == 0
    assert current["total_lag"] == 0


def test_stop_and_start_of_an_unknown_job_is_404(services: Start) -> None:
    """The control routes answer 404 for a job that does not exist."""
    service = services()
    for path in ("/job/ghost/stop", "/job/ghost/start", "/job/ghost/set_offset/end"):
        assert service.request("POST", path).status == 404
    assert service.request("GET", "/job/ghost/status").status == 404


def test_set_offset_with_two_instances(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink) -> None:
    """beginning, a number, end and one partition: delivery restarts exactly there, everywhere."""
    name = topic(4)
    first, second = services(), services()
    assert first.request("POST", "/job/rewind", job("rewind", name, sink)).status == 201
    produce(kafka.bootstrap, name, messages("m", 400), partitions=4)
    wait_for(lambda: sink.count() == 400, 40, "all 400")
    wait_for(lambda: len(status(first, "rewind")["instances"]) == 2, 10, "both instances running it")

    def restart_at(path: str, expect: int) -> list[tuple[int, int]]:
        before = sink.count()
        answer = second.request("POST", path, timeout=60)
        assert answer.status == 200, answer
        wait_for(lambda: sink.count() - before >= expect, 40, f"{expect} redelivered after {path}")
        time.sleep(1.5)
        got = sink.snapshot()[before:]
        assert len(got) == expect, f"{len(got)} requests after {path}"
        return positions(got)

    again = restart_at("/job/rewind/set_offset/beginning", 400)
    for partition in range(4):
        offsets = [o for p, o in again if p == partition]
        assert offsets == list(range(100)), f"partition {partition} did not restart at 0"

    again = restart_at("/job/rewind/set_offset/60", 160)
    for partition in range(4):
        assert [o for p, o in again if p == partition] == list(range(60, 100))

    answer = first.request("POST", "/job/rewind/set_offset/end", timeout=60)
    assert answer.status == 200
    assert sorted((o["partition"], o["offset"]) for o in answer.json["offsets"]) == \
        [(p, 100) for p in range(4)]
    before = sink.count()
    produce(kafka.bootstrap, name, messages("n", 8), partitions=4)
    wait_for(lambda: sink.count() - before == 8, 30, "only the 8 new ones")
    time.sleep(1)
    assert sorted(positions(sink.snapshot()[before:])) == sorted((p, o) for p in range(4) for o in (100, 101))

    again = restart_at(f"/job/rewind/set_offset/95?topic={name}&partition=2", 7)
    assert again == [(2, o) for o in range(95, 102)]


def test_set_offset_refuses_bad_arguments(services: Start, topic: Callable[..., str], sink: Sink) -> None:
    """A bad offset, a topic the job does not read, a bad partition: 400, nothing moved."""
    name = topic(1)
    service = services()
    service.request("POST", "/job/picky", job("picky", name, sink))
    for path in ("/job/picky/set_offset/soon", "/job/picky/set_offset/-3",
                 "/job/picky/set_offset/end?topic=other", "/job/picky/set_offset/end?partition=x",
                 "/job/picky/set_offset/end?partition=7"):
        answer = service.request("POST", path, timeout=60)
        assert answer.status == 400, (path, answer)
        assert answer.json["details"]


def test_ratelimit_spaces_requests_and_the_api_stays_quick(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink) -> None:
    """ratelimit 0.2: consecutive requests at least 0.2 s apart; the API answers within 100 ms."""
    name = topic(3)
    produce(kafka.bootstrap, name, messages("r", 15), partitions=3)
    service = services()
    assert service.request("POST", "/job/slow", job("slow", name, sink, ratelimit=0.2)).status == 201
    wait_for(lambda: sink.count() >= 2, 30, "the first requests")
    slowest = 0.0
    while sink.count() < 15:
        began = time.perf_counter()
        assert service.request("GET", "/jobs").status == 200
        slowest = max(slowest, time.perf_counter() - began)
        time.sleep(0.05)
    times = [r.at for r in sink.snapshot()]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.19, gaps
    assert slowest < 0.1, f"the API took {slowest:.3f} s"


# --- the control channel's subscription (in-process, real Redis) ----------------------


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Let the reactor run until ``check()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await deferLater(reactor, 0.05, lambda: None)


class Supervisor:
    """What job control drives: reconciles and announced changes, recorded."""

    def __init__(self) -> None:
        self.reconciles = 0
        self.changes: list[str] = []

    async def reconcile(self) -> None:
        self.reconciles += 1

    def changed(self, job_id: str) -> None:
        self.changes.append(job_id)


class RecordingControl(JobControl):
    """Job control that keeps the reason of every failed subscription."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failures: list[str] = []

    def subscribe_failed(self, reason: str) -> None:
        self.failures.append(reason)
        super().subscribe_failed(reason)


@pytest.fixture
def limited_user(redis_db: RedisServer) -> Any:
    """A Redis user that may use every key but no pub/sub channel (yet)."""
    client = redis_db.client()
    client.execute_command("ACL", "SETUSER", "limited", "reset", "on", ">secret", "~*", "+@all",
                           "resetchannels")
    yield client
    client.execute_command("ACL", "DELUSER", "limited")


@pytest_twisted.ensureDeferred
async def test_a_refused_psubscribe_is_retried_until_it_works(
        redis_db: RedisServer, limited_user: Any) -> None:
    """PSUBSCRIBE refused (NOPERM): retried, one warning, then listening once it is allowed."""
    address = RedisAddress("127.0.0.1", redis_db.port, 0, "limited", "secret", False)
    supervisor = Supervisor()
    control = RecordingControl(reactor, address, supervisor, every=3600)  # type: ignore[arg-type]
    with capturedLogs() as events:
        control.startService()
        try:
            await until(lambda: len(control.failures) >= 2, 15, "a second attempt after a refusal")
            assert "NOPERM" in control.failures[0]
            assert not control.connected
            limited_user.execute_command("ACL", "SETUSER", "limited", "allchannels")
            await until(lambda: control.connected, 15, "the subscription once allowed")
            limited_user.publish("msg/job:after", "update")
            await until(lambda: supervisor.changes == ["after"], 5, "the announced change")
        finally:
            await control.stopService()
    said = [formatEvent(e) for e in events]
    assert len([m for m in said if "subscribing to msg/job:* failed" in m]) == 1, said
    assert any("listening on msg/job:*" in m for m in said)


class Mute(Protocol):
    """A server that accepts and never answers."""

    def connectionMade(self) -> None:
        self.factory.connections += 1  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_an_unanswered_psubscribe_is_retried_on_a_new_connection() -> None:
    """PSUBSCRIBE never answered: after the timeout, the connection is dropped and made again."""
    factory = Factory.forProtocol(Mute)
    factory.connections = 0  # type: ignore[attr-defined]
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
    address = RedisAddress("127.0.0.1", port.getHost().port, 0, None, None, False)
    control = RecordingControl(reactor, address, Supervisor(), every=3600,  # type: ignore[arg-type]
                               subscribe_timeout=0.3)
    control.startService()
    try:
        await until(lambda: factory.connections >= 2, 15, "a second connection")  # type: ignore[attr-defined]
        assert control.failures and not control.connected
    finally:
        await control.stopService()
        await port.stopListening()


# --- job counters in Redis (in-process, real Redis) ---------------------------------


@pytest_twisted.async_yield_fixture
async def store(redis_db: RedisServer) -> Any:
    """A job store connected to the session's Redis; stopped after the test."""
    job_store = JobStore(RedisAddress.from_url(redis_db.url), clock=reactor)  # type: ignore[arg-type]
    job_store.startService()
    await until(lambda: job_store.connected, 10, "Redis")
    yield job_store
    await job_store.stopService()


@pytest_twisted.ensureDeferred
async def test_counters_are_added_together(store: JobStore, redis_db: RedisServer) -> None:
    """add_stats adds every non-zero delta; zeros and empty reports write nothing."""
    await store.add_stats("counted", {"delivered": 3, "retried": 0, "dead_lettered": 2})
    await store.add_stats("counted", {"delivered": 4, "consumed": 7})
    await store.add_stats("idle", {"delivered": 0})
    totals, _ = await store.stats("counted")
    assert totals == {"delivered": 7, "dead_lettered": 2, "consumed": 7}
    assert not redis_db.client().exists("job:idle:stats")


@pytest_twisted.ensureDeferred
async def test_counters_move_all_together_or_not_at_all(store: JobStore, redis_db: RedisServer) -> None:
    """A report that fails half-way adds nothing, so adding it again later counts nothing twice."""
    client = redis_db.client()
    await store.add_stats("partial", {"consumed": 5, "delivered": 5})
    client.hset("job:partial:stats", "retried", "not a number")
    report = {"consumed": 2, "delivered": 2, "retried": 1, "dead_lettered": 1}
    with pytest.raises(StoreUnavailable, match="retried"):
        await store.add_stats("partial", report)
    assert client.hgetall("job:partial:stats") == {"consumed": "5", "delivered": "5",
                                                    "retried": "not a number"}
    client.hset("job:partial:stats", "retried", "0")
    await store.add_stats("partial", report)
    assert client.hgetall("job:partial:stats") == {"consumed": "7", "delivered": "7", "retried": "1",
                                                    "dead_lettered": "1"}
