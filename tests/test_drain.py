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
