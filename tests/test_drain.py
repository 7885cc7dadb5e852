"""Draining on SIGTERM (SPEC §6), through real Kafka, Redis and HTTP: readiness goes at once,
the requests under way finish, their offsets are committed, and nothing is sent again."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable

from tests.infra.kafka import KafkaBroker
from tests.infra.kafka_io import produce
from tests.infra.ports import wait_for
from tests.infra.service import ServiceProcess
from tests.infra.sink import Received, Sink

Start = Callable[..., ServiceProcess]


def test_sigterm_says_not_ready_at_once_and_lets_the_requests_under_way_finish(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    release = threading.Event()
    under_way: list[str] = []

    def respond(got: Received) -> tuple[int, dict[str, str], bytes]:
        if got.path.startswith("/d/m"):
            under_way.append(got.path)
            release.wait(30)
        return 200, {}, b"ok"

    sink = Sink(respond).start()
    try:
        name = topic(partitions=4)
        first = services("--revoke-grace", "20")
        job = {"id": "d", "owner": "ops", "type": "POST", "topic": name, "datamap": {"id": "$.msg.id"},
               "url": f"{sink.url}/d/{{id}}", "json_body": ["id"]}
        assert first.request("POST", "/job/d", job).status == 201
        produce(kafka.bootstrap, name, [json.dumps({"id": f"m{i}"}).encode() for i in range(4)], partitions=4)
        wait_for(lambda: len(under_way) == 4, 60, "4 requests under way")

        assert first.process is not None
        first.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_for(lambda: first.request("GET", "/health/ready", token=False).status == 503, 1.0,
                 "/health/ready to answer 503", every=0.05)
        assert time.monotonic() - signalled < 1.0
        assert first.request("GET", "/health/live", token=False).status == 200
        assert first.process.poll() is None  # still running: draining
        release.set()
        # twistd ends a clean shutdown by re-raising the SIGTERM it was stopped with.
        assert first.process.wait(40) in (0, -15)  # one SIGTERM, as Kubernetes sends
        log = first.log()
        assert "draining" in log and "Traceback" not in log

        second = services()
        produce(kafka.bootstrap, name, [json.dumps({"id": "after"}).encode()], partitions=1)
        wait_for(lambda: any(r.path == "/d/after" for r in sink.snapshot()), 60, "the next message")
        paths = [r.path for r in sink.snapshot()]
        assert sorted(p for p in paths if p.startswith("/d/m")) == [f"/d/m{i}" for i in range(4)]  # once each
        assert second.request("GET", "/health/ready", token=False).status == 200
    finally:
        release.set()
        sink.stop()


def test_sigterm_sends_the_half_full_batch_and_releases_a_retry_wait_uncommitted(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    """The other steps of the drain: a batch waiting to fill goes at once, a record waiting to
    retry is let go uncommitted (the next instance sends it), and the process ends within
    ``--revoke-grace`` + 15 s though the retry would wait 10 minutes."""
    answers: dict[str, int] = {"/r/wait": 503}

    def respond(got: Received) -> tuple[int, dict[str, str], bytes]:
        status = answers.get(got.path, 200)
        return status, {"Retry-After": "600"} if status == 503 else {}, b"ok"

    sink = Sink(respond).start()
    try:
        batched, retried = topic(), topic()
        first = services("--revoke-grace", "5")
        jobs = [
            {"id": "b", "owner": "ops", "type": "POST", "topic": batched, "datamap": {"id": "$.msg.id"},
             "url": f"{sink.url}/b", "json_body": ["id"], "batch": {"max_messages": 100, "max_wait": 600}},
            {"id": "r", "owner": "ops", "type": "POST", "topic": retried, "datamap": {"id": "$.msg.id"},
             "url": f"{sink.url}/r/{{id}}", "json_body": ["id"],
             "retry": {"max_attempts": 10, "initial_wait": 600, "max_wait": 600}},
        ]
        for job in jobs:
            assert first.request("POST", f"/job/{job['id']}", job).status == 201
        produce(kafka.bootstrap, batched, [json.dumps({"id": f"m{i}"}).encode() for i in range(5)])
        produce(kafka.bootstrap, retried, [json.dumps({"id": "wait"}).encode()])
        wait_for(lambda: first.request("GET", "/job/b/status").json["counters"]["consumed"] == 5, 60,
                 "the batch filling")
        wait_for(lambda: any(r.path == "/r/wait" for r in sink.snapshot()), 60, "the first attempt")
        assert not any(r.path == "/b" for r in sink.snapshot())  # the batch waits to fill

        assert first.process is not None
        first.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert first.process.wait(5 + 15) in (0, -15)
        took = time.monotonic() - signalled
        print(f"drained in {took:.1f} s")
        batches = [json.loads(r.body) for r in sink.snapshot() if r.path == "/b"]
        assert batches == [[{"id": f"m{i}"} for i in range(5)]]  # sent at SIGTERM, not after 600 s

        answers["/r/wait"] = 200
        services()
        wait_for(lambda: [r.path for r in sink.snapshot()].count("/r/wait") == 2, 60,
                 "the released record sent again by the next instance")
    finally:
        sink.stop()
