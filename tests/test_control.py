"""Job control (SPEC §5-7): stop/start, set_offset with two instances, ratelimit, status."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from typing import Any

from tests.infra.kafka import KafkaBroker
from tests.infra.kafka_io import produce
from tests.infra.ports import wait_for
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
