"""Several instances, and crashes: real Kafka, real Redis, real service processes."""

from __future__ import annotations

import json
import re
import signal
import time
from collections import Counter
from collections.abc import Callable

from tests.infra.kafka import KafkaBroker
from tests.infra.kafka_io import produce
from tests.infra.ports import wait_for
from tests.infra.service import ServiceProcess
from tests.infra.sink import Received, Sink

Start = Callable[..., ServiceProcess]


def ids(received: list[Received]) -> Counter[str]:
    """How often each entity id arrived."""
    return Counter(got.path.rsplit("/", 1)[1] for got in received)


def last_assignment(service: ServiceProcess, job_id: str) -> set[str]:
    """The partitions the service's last assignment of the job gave it."""
    lines = re.findall(rf"job {job_id}: assigned (.*)", service.log())
    assert lines, f"job {job_id} was never assigned partitions"
    return set() if lines[-1].strip() == "nothing" else set(lines[-1].strip().split(", "))


def test_two_instances_split_the_partitions(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    """A job created through one instance runs on both; 4 partitions split; 5,000 delivered."""
    sink = Sink().start()
    try:
        name = topic(4)
        first, second = services(), services()
        job = {"id": "shared", "owner": "ops", "type": "POST", "topic": name,
               "datamap": {"id": "$.msg.id"}, "url": f"{sink.url}/items/{{id}}"}
        assert first.request("POST", "/job/shared", job).status == 201

        def split() -> bool:
            a, b = last_assignment(first, "shared"), last_assignment(second, "shared")
            return len(a) == 2 and len(b) == 2 and not a & b

        wait_for(split, 40, "the partitions split between the two instances", every=0.5)
        produce(kafka.bootstrap, name, (json.dumps({"id": f"m{i}"}).encode() for i in range(5000)),
                partitions=4)
        wait_for(lambda: len(ids(sink.snapshot())) == 5000, 60, "5,000 distinct messages", every=0.5)
        assert split(), "a rebalance happened while delivering"
        assert set(ids(sink.snapshot())) == {f"m{i}" for i in range(5000)}
    finally:
        sink.stop()


def test_sigkill_mid_stream_loses_nothing(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    """SIGKILL in the middle of 5,000 messages; after a restart every message has arrived."""
    sink = Sink(lambda got: (time.sleep(0.002), (200, {}, b"ok"))[1]).start()
    try:
        name = topic(4)
        produce(kafka.bootstrap, name, (json.dumps({"id": f"k{i}"}).encode() for i in range(5000)),
                partitions=4)
        service = services()
        job = {"id": "crashy", "owner": "ops", "type": "POST", "topic": name,
               "datamap": {"id": "$.msg.id"}, "url": f"{sink.url}/items/{{id}}"}
        assert service.request("POST", "/job/crashy", job).status == 201
        wait_for(lambda: sink.count() >= 1500, 60, "a third of the messages", every=0.05)
        service.stop(signal.SIGKILL)
        before = sink.count()
        assert before < 5000, "the job finished before it could be killed"

        services()
        wait_for(lambda: len(ids(sink.snapshot())) == 5000, 90, "every message", every=0.5)
        time.sleep(1)
        counts = ids(sink.snapshot())
        duplicates = sum(counts.values()) - 5000
        print(f"delivered before the kill: {before}; duplicates after restart: {duplicates}")
        # The in-flight window: what was delivered but not yet committed when killed.
        # Commits go with every poll (at least every 0.1 s), so it is a fraction of a second.
        assert duplicates <= 400, f"{duplicates} duplicates"
    finally:
        sink.stop()
