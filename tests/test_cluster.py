"""Several instances, and crashes: real Kafka, real Redis, real service processes."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable

from tests.infra.crash import Record, Runs, redelivered
from tests.infra.kafka import KafkaBroker
from tests.infra.kafka_io import committed, produce
from tests.infra.ports import wait_for
from tests.infra.service import ServiceProcess
from tests.infra.sink import Received, Sink

Start = Callable[..., ServiceProcess]


def ids(received: list[Received]) -> Counter[str]:
    """How often each entity id arrived."""
    return Counter(got.path.rsplit("/", 1)[1] for got in received)


def last_assignment(service: ServiceProcess, job_id: str) -> set[str]:
    """The partitions the service holds of the job, by its log: assignments add, revocations
    and losses take away (rebalances are cooperative: each line names only what moved)."""
    events = re.findall(rf"job {job_id}: (assigned|revoked|lost) (.*)", service.log())
    assert events, f"job {job_id} was never assigned partitions"
    held: set[str] = set()
    for how, what in events:
        named = set() if what.strip() == "nothing" else set(what.strip().split(", "))
        held = held | named if how == "assigned" else held - named
    return held


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
    """SIGKILL in the middle of 5,000 messages; after a restart every message has arrived, and
    what came twice is only what the group had not committed when the process died (SPEC §5)."""

    def record_of(got: Received) -> Record:
        _, _, partition, offset, _ = got.path.split("/")
        return int(partition), int(offset)

    runs = Runs(record_of, lambda got: (time.sleep(0.002), (200, {}, b"ok"))[1])
    sink = Sink(runs).start()
    try:
        name = topic(4)
        produce(kafka.bootstrap, name, (json.dumps({"id": f"k{i}"}).encode() for i in range(5000)),
                partitions=4)
        service = services()
        job = {"id": "crashy", "owner": "ops", "type": "POST", "topic": name,
               "datamap": {"id": "$.msg.id", "p": "$.meta.partition", "o": "$.meta.offset"},
               "url": f"{sink.url}/items/{{p}}/{{o}}/{{id}}"}
        assert service.request("POST", "/job/crashy", job).status == 201
        # Mid-stream: a third delivered, and commits made in every partition meanwhile.
        wait_for(lambda: sink.count() >= 1500 and
                 min(committed(kafka.bootstrap, "restconsumer.crashy", name, 4)) > 0, 60,
                 "a third of the messages, and commits in every partition", every=0.05)
        service.stop(signal.SIGKILL)
        at_kill = committed(kafka.bootstrap, "restconsumer.crashy", name, 4)
        runs.run = 2
        assert sum(at_kill) < 5000, "the job finished before it could be killed"

        services()
        wait_for(lambda: len(ids(sink.snapshot())) == 5000, 90, "every message", every=0.5)
        wait_for(lambda: committed(kafka.bootstrap, "restconsumer.crashy", name, 4) == [1250] * 4, 30,
                 "every offset committed")
        assert set(ids(sink.snapshot())) == {f"k{i}" for i in range(5000)}
        again, window = redelivered(runs, at_kill)
        print(f"committed at the kill: {at_kill}; uncommitted then: {window}; sent again: {again}")
    finally:
        sink.stop()


class PerPartition:
    """Answers slowly and keeps, per partition, the most requests answered at once."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.now: Counter[str] = Counter()
        self.most: Counter[str] = Counter()
        self.lock = threading.Lock()

    def __call__(self, got: Received) -> tuple[int, dict[str, str], bytes]:
        partition = got.path.split("/")[2]
        with self.lock:
            self.now[partition] += 1
            self.most[partition] = max(self.most[partition], self.now[partition])
        time.sleep(self.delay)
        with self.lock:
            self.now[partition] -= 1
        return 200, {}, b"ok"


def test_a_rebalance_never_sends_one_partition_twice_at_once(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    """Slow answers while a second instance joins (taking a partition over) and leaves:
    requests of one partition never overlap, and every message arrives, in order."""
    tracker = PerPartition(1.5)
    sink = Sink(tracker).start()
    try:
        name = topic(2)
        produce(kafka.bootstrap, name, (json.dumps({"id": f"s{i}"}).encode() for i in range(20)),
                partitions=2)
        first = services()
        job = {"id": "pair", "owner": "ops", "type": "POST", "topic": name,
               "datamap": {"id": "$.msg.id", "p": "$.meta.partition"},
               "url": f"{sink.url}/p/{{p}}/{{id}}"}
        assert first.request("POST", "/job/pair", job).status == 201
        wait_for(lambda: sink.count() >= 2, 30, "the first requests")
        second = services()
        wait_for(lambda: last_assignment(second, "pair"), 40, "the second instance taking a partition")
        wait_for(lambda: sink.count() >= 10, 60, "more requests after the join")
        second.stop()
        wait_for(lambda: len(ids(sink.snapshot())) == 20, 90, "all 20", every=0.5)
        assert dict(tracker.most) == {"0": 1, "1": 1}
        for partition in ("0", "1"):
            order = [int(r.path.rsplit("/s", 1)[1]) for r in sink.snapshot()
                     if r.path.split("/")[2] == partition]
            firsts = [order.index(i) for i in sorted(set(order))]
            assert firsts == sorted(firsts), f"partition {partition}: first deliveries out of order"
        duplicates = sum(ids(sink.snapshot()).values()) - 20
        assert duplicates <= 4, f"{duplicates} duplicates from two rebalances"
    finally:
        sink.stop()
