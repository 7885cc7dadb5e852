"""When what is around it fails: endpoints down or refusing, Kafka restarted, Redis away."""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.infra.kafka import KafkaBroker
from tests.infra.kafka_io import produce, read_all
from tests.infra.ports import free_port, wait_for
from tests.infra.proxy import Proxy
from tests.infra.redis import RedisServer
from tests.infra.service import ServiceProcess
from tests.infra.sink import Received, Sink

Start = Callable[..., ServiceProcess]


def job(name: str, topic: str, url: str, **more: Any) -> dict[str, Any]:
    """A job posting each message's id, partition and offset."""
    return {"id": name, "owner": "ops", "type": "POST", "topic": topic,
            "datamap": {"id": "$.msg.id", "partition": "$.meta.partition", "offset": "$.meta.offset"},
            "url": f"{url}/{name}/{{id}}", "json_body": ["partition", "offset"], **more}


def messages(prefix: str, count: int) -> list[bytes]:
    """``count`` JSON messages with ids prefix0, prefix1, ..."""
    return [json.dumps({"id": f"{prefix}{i}"}).encode() for i in range(count)]


def ok_ids(received: list[Received]) -> Counter[str]:
    """How often each id was answered 200 (the sink marks failures in the path it saw)."""
    return Counter(r.path.rsplit("/", 1)[1] for r in received)


def status(service: ServiceProcess, name: str) -> dict[str, Any]:
    """GET /job/{name}/status."""
    answer = service.request("GET", f"/job/{name}/status")
    assert answer.status == 200, answer
    return answer.json


class Outage:
    """Answers 503 until ``until``; the first failure carries Retry-After: 2."""

    def __init__(self, seconds: float) -> None:
        self.until = time.monotonic() + seconds
        self.failed: list[Received] = []
        self.delivered: list[Received] = []
        self._lock = threading.Lock()

    def __call__(self, got: Received) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            if time.monotonic() < self.until:
                self.failed.append(got)
                return 503, ({"Retry-After": "2"} if len(self.failed) == 1 else {}), b"down"
            self.delivered.append(got)
            return 200, {}, b"ok"


def test_an_outage_of_30_s_is_ridden_out_in_order_without_rebalance(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    """503 for 30 s (once with Retry-After: 2), then 200: all delivered in order, no dead letter,
    growing waits, and the consumer stays in its group with max.poll.interval.ms at 10 s."""
    outage = Outage(30)
    sink = Sink(outage).start()
    try:
        name = topic(2)
        produce(kafka.bootstrap, name, messages("o", 40), partitions=2)
        service = services("--kafka-option", "max.poll.interval.ms=10000")
        outage.until = time.monotonic() + 30
        assert service.request("POST", "/job/patient", job("patient", name, sink.url)).status == 201
        wait_for(lambda: len(outage.delivered) >= 40, 120, "all 40 after the outage", every=0.5)
        time.sleep(1)
        delivered = outage.delivered
        assert sorted(ok_ids(delivered)) == sorted(f"o{i}" for i in range(40))
        assert max(ok_ids(delivered).values()) == 1
        for partition in (0, 1):
            offsets = [json.loads(r.body)["offset"] for r in delivered
                       if json.loads(r.body)["partition"] == partition]
            assert offsets == list(range(20))
        # The message answered with Retry-After: 2 waited at least that long; that answer was
        # back-pressure (SPEC §5), not a counted attempt: the backoff of the 503s after it
        # starts from initial_wait and grows.
        told = outage.failed[0].path
        attempts = sorted(r.at for r in outage.failed if r.path == told)
        waits = [b - a for a, b in itertools.pairwise(attempts)]
        assert len(waits) >= 3
        assert waits[0] >= 1.9, waits
        assert waits[-1] > waits[2] > waits[1] > 0.75, waits
        log = service.log()
        assert len(re.findall(r"job patient: assigned", log)) == 1, "the consumer left its group"
        assert ": dead-lettered: " not in log
        current = status(service, "patient")
        assert current["counters"]["delivered"] == 40
        assert current["counters"]["dead_lettered"] == 0
        assert current["counters"]["retried"] == len(outage.failed)
        assert current["last_error"]["reason"].startswith("HTTP 503")
    finally:
        sink.stop()


def test_only_the_refused_messages_are_dead_lettered(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    """An endpoint answering 400 to some: exactly those are dead-lettered, with status and reason."""
    sink = Sink(lambda got: (400, {}, b"invalid person") if got.path.endswith("7")
                else (200, {}, b"ok")).start()
    try:
        name = topic(3)
        produce(kafka.bootstrap, name, messages("p", 300), partitions=3)
        service = services()
        assert service.request("POST", "/job/strict", job("strict", name, sink.url)).status == 201
        refused = {f"p{i}" for i in range(300) if str(i).endswith("7")}
        letters = read_all(kafka.bootstrap, "restconsumer.deadletter.strict", expect=len(refused), timeout=60)
        assert {json.loads(m.value())["id"] for m in letters} == refused
        for letter in letters:
            headers = dict(letter.headers())
            assert headers["restconsumer.control.status"] == b"400"
            assert b"invalid person" in headers["restconsumer.reason"]
            assert headers["restconsumer.attempts"] == b"1"
        wait_for(lambda: sink.count() >= 300, 30, "every message tried")
        time.sleep(1)
        assert sink.count() == 300
        current = status(service, "strict")
        assert current["counters"]["delivered"] == 300 - len(refused)
        assert current["counters"]["dead_lettered"] == len(refused)
        assert current["counters"]["failed"] == len(refused)
        assert current["counters"]["retried"] == 0
    finally:
        sink.stop()


def test_refused_connections_beyond_the_retry_budget_lose_nothing(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    """An endpoint that refuses connections for longer than the retry budget, then comes up:
    an outage, not poison (SPEC §5) — the circuit holds the job, and all 2,000 messages are
    delivered, none dead-lettered."""
    port = free_port()
    name = topic(4)
    produce(kafka.bootstrap, name, messages("c", 2000), partitions=4)
    service = services()
    quick = {"max_attempts": 3, "initial_wait": 0.05, "max_wait": 0.5}
    assert service.request("POST", "/job/refused",
                           job("refused", name, f"http://127.0.0.1:{port}", retry=quick)).status == 201
    wait_for(lambda: status(service, "refused")["circuit"]["state"] == "open", 60, "the circuit to open")
    time.sleep(2)  # retries used up many times over by now
    assert status(service, "refused")["counters"]["dead_lettered"] == 0
    sink = Sink(port=port).start()
    try:
        wait_for(lambda: status(service, "refused")["counters"]["delivered"] >= 2000, 120,
                 "all 2,000 delivered")
        current = status(service, "refused")
        assert current["counters"]["dead_lettered"] == 0
        assert current["circuit"]["state"] == "closed"
        assert set(ok_ids(sink.snapshot())) == {f"c{i}" for i in range(2000)}
        assert read_all(kafka.bootstrap, "restconsumer.deadletter.refused", expect=1, timeout=3) == []
    finally:
        sink.stop()


@pytest.fixture
def own_kafka(tmp_path: Path) -> Iterator[KafkaBroker]:
    """A broker of this test's own, which the test stops and starts."""
    broker = KafkaBroker(tmp_path / "own-kafka")
    broker.start()
    yield broker
    broker.stop()


def test_kafka_restarted_mid_stream(own_kafka: KafkaBroker, services: Start) -> None:
    """The broker stops for 20 s in the middle of the stream; every message arrives afterwards."""
    sink = Sink().start()
    try:
        own_kafka.create_topic("flaky", 2)
        service = services(kafka_bootstrap=own_kafka.bootstrap)
        assert service.request("POST", "/job/through", job("through", "flaky", sink.url)).status == 201
        produce(own_kafka.bootstrap, "flaky", messages("k", 300), partitions=2)
        wait_for(lambda: sink.count() >= 300, 60, "before the restart")
        own_kafka.stop()
        time.sleep(20)
        own_kafka.start()
        produce(own_kafka.bootstrap, "flaky", messages("l", 300), partitions=2)
        wait_for(lambda: len(ok_ids(sink.snapshot())) >= 600, 120, "after the restart", every=0.5)
        assert set(ok_ids(sink.snapshot())) == {f"k{i}" for i in range(300)} | {f"l{i}" for i in range(300)}
        assert service.request("GET", "/health", token=None).json["kafka"]["ok"]
    finally:
        sink.stop()


def test_redis_away_for_20_s(own_redis: RedisServer, services: Start, kafka: KafkaBroker,
                             topic: Callable[..., str]) -> None:
    """Redis stopped for 20 s: jobs keep delivering and the API answers 503 for the store.
    Then this instance alone loses Redis while another one changes the job: the change is
    picked up once this instance's subscriber is back."""
    sink = Sink().start()
    proxy = Proxy(own_redis.port)
    try:
        name = topic(2)
        first = services(redis=f"redis://127.0.0.1:{proxy.port}/0")
        second = services(redis=own_redis.url)
        assert first.request("POST", "/job/steady", job("steady", name, sink.url)).status == 201
        wait_for(lambda: len(status(first, "steady")["instances"]) == 2, 20, "running on both")

        own_redis.stop()
        time.sleep(1)
        produce(kafka.bootstrap, name, messages("r", 200), partitions=2)
        wait_for(lambda: sink.count() >= 200, 30, "delivery while Redis is away")
        answer = first.request("POST", "/job/other", job("other", name, sink.url))
        assert answer.status == 503 and answer.json["error"] == "job store unavailable"
        assert first.request("GET", "/jobs").status == 503
        assert first.request("GET", "/health", token=None).status == 503
        time.sleep(18)
        own_redis.start()
        wait_for(lambda: first.request("GET", "/jobs").status == 200, 20, "the store back")
        wait_for(lambda: second.request("GET", "/jobs").status == 200, 20, "the store back")

        proxy.cut()
        wait_for(lambda: first.request("GET", "/jobs").status == 503, 10, "the first instance cut off")
        changed = job("steady", name, sink.url)
        changed["url"] = f"{sink.url}/changed/{{id}}"
        assert second.request("POST", "/job/steady", changed).status == 200
        time.sleep(3)
        proxy.restore()
        wait_for(lambda: first.request("GET", "/jobs").status == 200, 20, "the first instance back")
        # Its subscriber comes back on its own schedule; the reconcile that follows applies
        # the change it missed.
        wait_for(lambda: "job steady: definition changed" in first.log(), 20, "the change picked up")
        produce(kafka.bootstrap, name, messages("s", 40), partitions=2)
        wait_for(lambda: sink.count() >= 240, 30, "after the change")
        time.sleep(1)
        after = [r.path for r in sink.snapshot() if r.path.rsplit("/", 1)[1].startswith("s")]
        assert len(after) == 40
        assert all(path.startswith("/changed/") for path in after), after[:3]
        assert first.request("GET", "/health", token=None).status == 200
    finally:
        proxy.close()
        sink.stop()


def test_sigterm_with_kafka_away_still_ends(own_kafka: KafkaBroker, services: Start) -> None:
    """Stopping while the broker is down: the final commit cannot be made, yet the process
    ends within the consumer's session timeout (10 s) and a little more."""
    sink = Sink().start()
    try:
        own_kafka.create_topic("gone", 1)
        service = services(kafka_bootstrap=own_kafka.bootstrap)
        assert service.request("POST", "/job/orphan", job("orphan", "gone", sink.url)).status == 201
        produce(own_kafka.bootstrap, "gone", messages("g", 20))
        wait_for(lambda: sink.count() >= 20, 60, "delivered")
        own_kafka.stop()
        began = time.monotonic()
        assert service.stop(timeout=30) in (0, -15)
        assert time.monotonic() - began < 20
        assert "Traceback" not in service.log()
        own_kafka.start()
    finally:
        sink.stop()
