"""A replicated Kafka (issue 22, "What it must show" 5; SPEC §6 "A replicated Kafka").

Three real Kafka nodes (the session's ``kafka_cluster``: replication 3, min.insync.replicas 2),
a real ``twistd -n restconsumer``, real Redis and a loopback endpoint that refuses 1 record in
20 (400: dead-lettered). The broker leading most of the job's partitions is SIGKILLed in the
middle of a steady stream and started again 20 s later: every record is delivered or
dead-lettered, each refused one exactly once in the dead-letter topic, no good one there,
nothing lost. No mock of Kafka; every wait is for a condition.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from tests.infra.kafka import KafkaCluster
from tests.infra.kafka_io import committed
from tests.infra.ports import wait_for
from tests.infra.redis import RedisServer
from tests.infra.service import ServiceProcess
from tests.infra.sink import Received, Sink

Start = Callable[..., ServiceProcess]

PARTITIONS = 6
#: Messages a second, and for how long: about 30 s of load in all.
RATE = 150
LOAD_SECONDS = 30.0
#: When the broker is killed (once this much has been delivered), and how long it stays down.
KILL_AFTER_DELIVERED = RATE * 4
DOWN_FOR = 20.0
#: The job's consumer session: longer than a coordinator's failover (the killed broker fenced
#: after broker.session.timeout.ms, 6 s here and 9 s by default, then the offsets loaded).
SESSION_MS = 30000


def job(name: str, topic: str, url: str, **more: Any) -> dict[str, Any]:
    """A job posting each message's id to ``{url}/{name}/{id}``."""
    return {"id": name, "owner": "ops", "type": "POST", "topic": topic,
            "datamap": {"id": "$.msg.id", "partition": "$.meta.partition", "offset": "$.meta.offset"},
            "url": f"{url}/{name}/{{id}}", "json_body": ["partition", "offset"], **more}


def refused(entity: str) -> bool:
    """The records the endpoint answers 400: 1 in 20."""
    return int(entity[1:]) % 20 == 7


def answer(got: Received) -> tuple[int, dict[str, str], bytes]:
    """400 to the refused records, 200 to the others."""
    return (400, {}, b"invalid record") if refused(entity(got)) else (200, {}, b"ok")


def entity(got: Received) -> str:
    """The ``{id}`` a request was sent for."""
    return got.path.rsplit("/", 1)[1]


def status(service: ServiceProcess, name: str) -> dict[str, Any]:
    """GET /job/{name}/status."""
    got = service.request("GET", f"/job/{name}/status")
    assert got.status == 200, got
    return got.json


@pytest.fixture
def on_cluster(tmp_path: Path, kafka_cluster: KafkaCluster,
               redis_db: RedisServer) -> Iterator[Start]:
    """Start restconsumer processes on the three-node cluster; afterwards every one is stopped,
    and every node runs again with its replicas in sync (the cluster is the session's)."""
    started: list[ServiceProcess] = []

    def start(*args: str) -> ServiceProcess:
        service = ServiceProcess(tmp_path / "service", kafka=kafka_cluster.bootstrap,
                                 redis=redis_db.url, args=list(args))
        started.append(service)
        return service.start()

    yield start
    for service in started:
        if service.process is not None:
            service.stop()
    for node in sorted(set(kafka_cluster.nodes) - kafka_cluster.running()):
        kafka_cluster.start_node(node)


class Load:
    """Produces ``{"id": "rN"}`` at a steady rate, round-robin over the partitions, on a thread
    (``acks=all``, idempotent); keeps the ids Kafka acknowledged."""

    def __init__(self, bootstrap: str, topic: str, rate: int, seconds: float) -> None:
        self._producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5,
                                   "enable.idempotence": True})
        self._topic = topic
        self._rate = rate
        self._seconds = seconds
        self.sent = 0
        self.acked: list[str] = []
        self.failed: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Load:
        """Start producing."""
        self._thread.start()
        return self

    def _report(self, err: Any, msg: Any) -> None:
        (self.failed if err is not None else self.acked).append(json.loads(msg.value())["id"])

    def _run(self) -> None:
        started = time.monotonic()
        sent = 0
        while (elapsed := time.monotonic() - started) < self._seconds:
            due = int(elapsed * self._rate)
            while sent < due:
                value = json.dumps({"id": f"r{sent}"}).encode()
                try:
                    self._producer.produce(self._topic, value=value, partition=sent % PARTITIONS,
                                           on_delivery=self._report)
                except BufferError:
                    break
                sent += 1
            self._producer.poll(0.01)
        self.sent = sent
        self._producer.flush(120)

    def join(self, timeout: float) -> None:
        """Wait until every message is produced and acknowledged (or refused)."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the load did not end"


def read_to_end(bootstrap: str, topic: str) -> list[Any]:
    """Every message of ``topic`` up to its end now."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4()}",
                         "enable.auto.commit": False})
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in partitions}
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        found: list[Any] = []
        at = dict.fromkeys(partitions, 0)
        deadline = time.monotonic() + 30
        while any(at[p] < ends[p] for p in partitions):
            assert time.monotonic() < deadline, f"{topic}: read {at}, its end is {ends}"
            for message in consumer.consume(500, 0.5):
                if message.error() is None:
                    found.append(message)
                    at[message.partition()] = message.offset() + 1
        return found
    finally:
        consumer.close()


def coordinator(cluster: KafkaCluster, group: str) -> int:
    """The broker coordinating ``group`` (-1 if unknown)."""
    try:
        return cluster.admin().describe_consumer_groups([group])[group].result(10).coordinator.id
    except Exception:
        return -1


def test_a_broker_killed_mid_stream_loses_nothing(on_cluster: Start, kafka_cluster: KafkaCluster) -> None:
    """SIGKILL the broker leading most of the job's partitions mid-stream, start it again 20 s
    later: every record delivered or dead-lettered, each refused one once in the dead-letter
    topic, no good one there, nothing lost, and the group's commits reach the end."""
    name = "replicated"
    source = f"replicated.load.{uuid.uuid4().hex[:8]}"
    dead_letters = f"restconsumer.deadletter.{name}"
    kafka_cluster.create_topic(source, PARTITIONS)
    sink = Sink(answer).start()
    began = time.monotonic()
    try:
        # A session that outlasts the coordinator's failover (README, Kafka settings): the group
        # keeps its assignment, and the commits refused meanwhile are made again.
        service = on_cluster("--kafka-option", f"session.timeout.ms={SESSION_MS}")
        assert service.request("POST", f"/job/{name}", job(name, source, sink.url)).status == 201
        load = Load(kafka_cluster.bootstrap, source, RATE, LOAD_SECONDS).start()
        wait_for(lambda: sink.count() >= KILL_AFTER_DELIVERED, 60, "deliveries before the kill")
        # Among brokers leading as many of the job's partitions, the one that also coordinates
        # the group or leads the dead-letter topic: its loss then tests them too.
        wait_for(lambda: kafka_cluster.leaders(dead_letters), 30, "the dead-letter topic")
        dl_leader = kafka_cluster.leaders(dead_letters)[0]
        group_coordinator = coordinator(kafka_cluster, f"restconsumer.{name}")
        victim = kafka_cluster.leading_most(
            source, prefer=lambda node: 2 * (node == group_coordinator) + (node == dl_leader))
        led = sorted(p for p, leader in kafka_cluster.leaders(source).items() if leader == victim)
        before = sink.count()
        kafka_cluster.kill(victim)
        killed_at = time.monotonic()
        kafka_cluster.wait_leaders([source, dead_letters, "__consumer_offsets"], 60)
        failover = time.monotonic() - killed_at
        # Deliveries go on from the new leaders while the broker is down, refused records too.
        wait_for(lambda: sink.count() >= before + 2 * RATE, DOWN_FOR, "deliveries without the broker")
        moved_on = sink.count() - before
        wait_for(lambda: time.monotonic() - killed_at >= DOWN_FOR, DOWN_FOR + 1, "the broker's 20 s down")
        delivered_while_down = sink.count() - before
        kafka_cluster.start_node(victim)
        load.join(120)
        produced = set(load.acked)
        assert load.failed == [] and len(produced) == len(load.acked) == load.sent, \
            f"the test's own produce failed: {load.sent} sent, {len(load.acked)} acked, {load.failed[:5]}"
        bad = {e for e in produced if refused(e)}
        good = produced - bad

        def every_record_answered() -> bool:
            seen = {entity(r) for r in sink.snapshot()}
            return produced <= seen

        wait_for(every_record_answered, 90, "every record sent", every=0.5)
        wait_for(lambda: status(service, name)["counters"]["dead_lettered"] >= len(bad), 60,
                 "every refused record dead-lettered", every=0.5)
        group = f"restconsumer.{name}"
        ends = _highs(kafka_cluster, source)
        wait_for(lambda: committed(kafka_cluster.bootstrap, group, source, PARTITIONS) == ends, 60,
                 "the group's commits at the end of each partition", every=0.5)
        letters = Counter(json.loads(m.value())["id"] for m in read_to_end(kafka_cluster.bootstrap,
                                                                             dead_letters))
        received = sink.snapshot()
        tried = Counter(entity(r) for r in received)
        answered_ok = {entity(r) for r in received if not refused(entity(r))}
        duplicates = sum(n - 1 for n in tried.values())
        again = [e for e, n in tried.items() if n > 1]
        gaps = [b.at - a.at for a, b in itertools.pairwise(received)
                if killed_at - 1 <= a.at <= killed_at + DOWN_FOR]
        current = status(service, name)
        print(f"\nreplicated: {len(produced)} records ({len(good)} good, {len(bad)} refused) in "
              f"{time.monotonic() - began:.1f} s; killed node {victim} leading partitions {led} "
              f"(dead-letter leader {dl_leader}, group coordinator {group_coordinator}); new leaders "
              f"after {failover:.1f} s; {moved_on} requests by then + {delivered_while_down} while it "
              f"was down; longest pause {max(gaps, default=0):.2f} s; {duplicates} duplicate requests; "
              f"{len(letters)} dead letters, {sum(letters.values()) - len(letters)} repeated; "
              f"{sum(ends)} messages in the topic; sent again: {again[:10]}; "
              f"counters {current['counters']}")
        assert answered_ok == good, f"lost: {sorted(good - answered_ok)[:20]}"
        assert set(letters) == bad, (f"missing dead letters {sorted(bad - set(letters))[:20]}, "
                                     f"good ones dead-lettered {sorted(set(letters) - bad)[:20]}")
        assert max(letters.values()) == 1, f"dead-lettered twice: {[e for e, n in letters.items() if n > 1]}"
        assert current["state"] == "running", current
        log = service.log()
        assert f"job {name}: lost" not in log, "the assignment was lost: its session ran out"
        print(f"commits refused and made again: {'yes' if 'a commit failed' in log else 'none seen'}")
    finally:
        sink.stop()
        if set(kafka_cluster.nodes) == kafka_cluster.running():
            kafka_cluster.wait_in_sync([source, "__consumer_offsets"], 60)


def _highs(cluster: KafkaCluster, topic: str) -> list[int]:
    """The high watermark of each partition of ``topic``."""
    consumer = Consumer({"bootstrap.servers": cluster.bootstrap, "group.id": f"reader-{uuid.uuid4()}"})
    try:
        return [consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in range(PARTITIONS)]
    finally:
        consumer.close()


def test_the_topics_the_service_creates_have_replication_3_and_min_insync_2(
        on_cluster: Start, kafka_cluster: KafkaCluster) -> None:
    """On three brokers, the dead-letter and result topics the service creates get 3 replicas
    and min.insync.replicas 2 (SPEC §6), whatever the broker's defaults."""
    name = f"made-{uuid.uuid4().hex[:6]}"
    source = f"replicated.made.{name}"
    dead_letters, results = f"restconsumer.deadletter.{name}", f"results.{name}"
    kafka_cluster.create_topic(source, 1)
    sink = Sink(lambda got: (400, {}, b"no") if entity(got) == "r7" else (200, {}, b"ok")).start()
    try:
        service = on_cluster()
        assert service.request("POST", f"/job/{name}",
                               job(name, source, sink.url, result_topic=results)).status == 201
        producer = Producer({"bootstrap.servers": kafka_cluster.bootstrap, "acks": "all"})
        for i in (6, 7):
            producer.produce(source, json.dumps({"id": f"r{i}"}).encode())
        assert producer.flush(30) == 0
        wait_for(lambda: status(service, name)["counters"]["dead_lettered"] == 1, 60, "the dead letter")
        for topic in (dead_letters, results):
            partitions = kafka_cluster.partitions(topic)
            assert {len(m.replicas) for m in partitions.values()} == {3}, (topic, partitions)
            assert kafka_cluster.topic_config(topic)["min.insync.replicas"] == "2", topic
        assert "created the topic " + dead_letters in service.log()
    finally:
        sink.stop()
