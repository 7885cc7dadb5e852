"""``max_in_flight: "auto"`` and 429 as back-pressure (SPEC §5, §11; issue 23, "What it must
show" 3), through real Kafka, Redis and a loopback HTTP endpoint.

1. A job that sets no ``max_in_flight`` against an endpoint serving S requests at a time
   (20 ms each) and queueing the rest: the limit the status shows settles between S/2 and
   2·S while the backlog lasts.
2. A 429 storm with ``Retry-After: 1`` (every request for 3 s) on a job with
   ``max_attempts: 2``: nothing is dead-lettered, the circuit never opens, every record is
   delivered, and the limit comes back up once the storm has passed (given a backlog that
   needs it: a limit not used stays put).
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from tests.infra.kafka import KafkaBroker
from tests.infra.kafka_io import produce
from tests.infra.ports import wait_for
from tests.infra.service import ServiceProcess
from tests.infra.sink import Received, Sink

Start = Callable[..., ServiceProcess]
SLOTS = 8


def job(name: str, topic: str, url: str, **more: Any) -> dict[str, Any]:
    """A job without ``max_in_flight`` (so ``"auto"``), in no order."""
    return {"id": name, "owner": "ops", "type": "POST", "topic": topic, "ordering": "none",
            "datamap": {"n": "$.msg.n"}, "url": f"{url}/{name}/{{n}}", "json_body": ["n"], **more}


def status(service: ServiceProcess, name: str) -> dict[str, Any]:
    """GET /job/{name}/status."""
    answer = service.request("GET", f"/job/{name}/status")
    assert answer.status == 200, answer
    return answer.json  # type: ignore[no-any-return]


def test_the_limit_settles_at_the_knee_of_a_queueing_endpoint(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    slots = threading.Semaphore(SLOTS)

    def respond(_: Received) -> tuple[int, dict[str, str], bytes]:
        with slots:  # S served at a time, the rest wait their turn
            time.sleep(0.02)
        return 200, {}, b"ok"

    sink = Sink(respond).start()
    try:
        name = topic(partitions=4)
        produce(kafka.bootstrap, name, [json.dumps({"n": i}).encode() for i in range(3000)], partitions=4)
        service = services()
        assert service.request("POST", "/job/q", job("q", name, sink.url)).status == 201
        limits: list[int] = []

        def sample() -> bool:
            s = status(service, "q")
            if s["counters"]["delivered"] > 300:  # past the start
                limits.append(s["in_flight_limit"])
            return s["counters"]["delivered"] >= 3000

        wait_for(sample, 120, "the backlog delivered", every=0.2)
        settled = limits[len(limits) // 2:]
        print(f"limits once settled: median {statistics.median(settled)}, {min(settled)}..{max(settled)} "
              f"({len(limits)} samples); endpoint serves {SLOTS} at a time")
        assert SLOTS / 2 <= statistics.median(settled) <= 2 * SLOTS
        assert status(service, "q")["counters"]["dead_lettered"] == 0
    finally:
        sink.stop()


def test_a_429_storm_slows_the_job_and_loses_nothing(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    storm = {"until": 0.0}
    throttled = [0]

    def respond(_: Received) -> tuple[int, dict[str, str], bytes]:
        if time.monotonic() < storm["until"]:
            throttled[0] += 1
            return 429, {"Retry-After": "1"}, b"slow down"
        time.sleep(0.005)
        return 200, {}, b"ok"

    sink = Sink(respond).start()
    try:
        name = topic(partitions=4)
        service = services()
        body = job("s", name, sink.url, retry={"max_attempts": 2, "initial_wait": 0.2, "max_wait": 1})
        assert service.request("POST", "/job/s", body).status == 201
        sent = 0
        circuits: list[str] = []
        limits: list[tuple[str, int]] = []

        def feed(count: int, phase: str, seconds: float) -> None:
            nonlocal sent
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                produce(kafka.bootstrap, name, [json.dumps({"n": sent + i}).encode() for i in range(count)],
                        partitions=4)
                sent += count
                s = status(service, "s")
                circuits.append(s["circuit"]["state"])
                limits.append((phase, s["in_flight_limit"]))

        feed(50, "before", 4)
        storm["until"] = time.monotonic() + 3.0
        feed(50, "storm", 3)
        # After it: a backlog more than one request at a time can carry, so the limit is used.
        produce(kafka.bootstrap, name, [json.dumps({"n": sent + i}).encode() for i in range(4000)],
                partitions=4)
        sent += 4000

        def after() -> bool:
            s = status(service, "s")
            circuits.append(s["circuit"]["state"])
            limits.append(("after", s["in_flight_limit"]))
            return s["counters"]["delivered"] >= sent

        wait_for(after, 90, "every record delivered", every=0.2)
        final = status(service, "s")
        during = [n for phase, n in limits if phase == "storm"]
        after = [n for phase, n in limits if phase == "after"]
        print(f"{sent} records, {throttled[0]} answered 429; limit before "
              f"{[n for p, n in limits if p == 'before'][-3:]}, during {during}, after {after}")
        assert throttled[0] > 0
        assert final["counters"]["dead_lettered"] == 0 and final["counters"]["delivered"] == sent
        assert "open" not in circuits and final["circuit"]["state"] == "closed"
        assert max(after) > min(during), "the limit comes back up once the storm has passed"
    finally:
        sink.stop()
