"""Many requests under way without losing the order that matters (SPEC §11), on the real service."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from confluent_kafka import Producer

from tests.infra.crash import Record, Runs, redelivered
from tests.infra.kafka import KafkaBroker
from tests.infra.kafka_io import committed, produce, read_all
from tests.infra.ports import wait_for
from tests.infra.service import ServiceProcess
from tests.infra.sink import Received, Sink

Start = Callable[..., ServiceProcess]


def produce_keyed(bootstrap: str, topic: str, items: list[tuple[bytes, dict[str, Any]]]) -> None:
    """Produce JSON values with their keys (the default partitioner spreads keys)."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    for key, value in items:
        producer.produce(topic, key=key, value=json.dumps(value).encode())
        producer.poll(0)
    assert producer.flush(30) == 0


class OneKeyHiccups:
    """503 for the first three attempts at key k7's message number 2; 200 to the rest."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.failed = 0

    def __call__(self, got: Received) -> tuple[int, dict[str, str], bytes]:
        body = json.loads(got.body)
        with self.lock:
            if (body["key"], body["seq"]) == ("k7", 2) and self.failed < 3:
                self.failed += 1
                return 503, {}, b"busy"
        time.sleep(0.005)
        return 200, {}, b"ok"


def keyed_job(name: str, topic: str, url: str) -> dict[str, Any]:
    return {"id": name, "owner": "ops", "type": "POST", "topic": topic,
            "datamap": {"key": "$.msg.key", "seq": "$.msg.seq"}, "url": f"{url}/{name}",
            "json_body": ["key", "seq"], "ordering": "key", "max_in_flight": 32,
            "retry": {"max_attempts": 0, "initial_wait": 0.5, "max_wait": 1}}


def delivered_in_order(received: list[Received]) -> dict[str, list[int]]:
    """Each key's sequence numbers in the order they were first answered 200."""
    seen: dict[str, list[int]] = defaultdict(list)
    first: set[tuple[str, int]] = set()
    for got in received:
        body = json.loads(got.body)
        item = (body["key"], body["seq"])
        if item in first:
            continue
        first.add(item)
        seen[body["key"]].append(body["seq"])
    return seen


def test_key_order_holds_a_retried_key_while_the_others_go_on(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    hiccups = OneKeyHiccups()
    sink = Sink(hiccups).start()
    try:
        name = topic(partitions=2)
        items = [(f"k{k}".encode(), {"key": f"k{k}", "seq": s}) for s in range(6) for k in range(20)]
        produce_keyed(kafka.bootstrap, name, items)
        service = services()
        assert service.request("POST", "/job/keys", keyed_job("keys", name, sink.url)).status == 201
        wait_for(lambda: hiccups.failed >= 1, 30, "the first 503")
        # While k7#2 is being retried, other keys are delivered to the end.
        wait_for(lambda: any(s == [0, 1, 2, 3, 4, 5] for k, s in
                             delivered_in_order(sink.snapshot()).items() if k != "k7"), 30,
                 "another key delivered to its end while k7 waits")
        wait_for(lambda: len({(json.loads(r.body)["key"], json.loads(r.body)["seq"])
                              for r in sink.snapshot()}) == 120, 60, "all 120 records")
        order = delivered_in_order(sink.snapshot())
        assert all(seqs == [0, 1, 2, 3, 4, 5] for seqs in order.values()), order
        attempts = [json.loads(r.body)["seq"] for r in sink.snapshot() if json.loads(r.body)["key"] == "k7"]
        # k7's later records were not sent before its record 2 got through.
        assert attempts.index(3) > max(i for i, s in enumerate(attempts) if s == 2)
        assert hiccups.failed == 3
    finally:
        sink.stop()


def test_key_order_survives_a_crash_and_loses_nothing(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    def record_of(got: Received) -> Record:
        body = json.loads(got.body)
        return body["partition"], body["offset"]

    runs = Runs(record_of, lambda got: (time.sleep(0.002), (200, {}, b"ok"))[1])
    sink = Sink(runs).start()
    try:
        name = topic(partitions=3)
        items = [(f"k{k}".encode(), {"key": f"k{k}", "seq": s}) for s in range(60) for k in range(50)]
        produce_keyed(kafka.bootstrap, name, items)
        first = services()
        job = keyed_job("crash", name, sink.url)
        job["datamap"] |= {"partition": "$.meta.partition", "offset": "$.meta.offset"}
        job["json_body"] = [*job["json_body"], "partition", "offset"]
        assert first.request("POST", "/job/crash", job).status == 201
        # Mid-stream, with commits made in every partition meanwhile.
        wait_for(lambda: sink.count() >= 800 and
                 min(committed(kafka.bootstrap, "restconsumer.crash", name, 3)) > 0, 60,
                 "some deliveries and commits before the crash")
        first.stop(signal.SIGKILL)
        at_kill = committed(kafka.bootstrap, "restconsumer.crash", name, 3)
        runs.run = 2
        second = services()
        wait_for(lambda: len({(json.loads(r.body)["key"], json.loads(r.body)["seq"])
                              for r in sink.snapshot()}) == 3000, 120, "every record after the restart")
        order = delivered_in_order(sink.snapshot())
        assert all(seqs == list(range(60)) for seqs in order.values())
        # Re-sent: only records at or past their partition's committed offset at the kill —
        # what was under way, or finished past the lowest unfinished message (SPEC §5, §11).
        again, window = redelivered(runs, at_kill)
        print(f"committed at the kill: {at_kill}; uncommitted then: {window}; sent again: {again}")
        assert sum(at_kill) < 3000, "nothing was left to re-send: the crash came after the end"
        assert second.request("GET", "/job/crash/status").status == 200
    finally:
        sink.stop()


def test_a_refused_batch_dead_letters_only_the_refused_records(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    refused = {"m17", "m62"}

    def judge(got: Received) -> tuple[int, dict[str, str], bytes]:
        ids = {item["id"] for item in json.loads(got.body)}
        return (400, {}, b"bad record in batch") if ids & refused else (200, {}, b"ok")

    sink = Sink(judge).start()
    try:
        name = topic(partitions=1)
        produce(kafka.bootstrap, name, [json.dumps({"id": f"m{i}"}).encode() for i in range(100)])
        service = services()
        job = {"id": "batched", "owner": "ops", "type": "POST", "topic": name,
               "datamap": {"id": "$.msg.id"}, "url": f"{sink.url}/batch", "json_body": ["id"],
               "batch": {"max_messages": 100, "max_wait": 2}}
        assert service.request("POST", "/job/batched", job).status == 201
        letters = read_all(kafka.bootstrap, "restconsumer.deadletter.batched", expect=2, timeout=60)
        assert sorted(json.loads(m.value())["id"] for m in letters) == sorted(refused)
        for letter in letters:
            assert dict(letter.headers())["restconsumer.control.status"] == b"400"
        delivered = set()
        for got in sink.snapshot():
            ids = [item["id"] for item in json.loads(got.body)]
            if not set(ids) & refused:
                delivered.update(ids)
        assert delivered == {f"m{i}" for i in range(100)} - refused
        wait_for(lambda: committed(kafka.bootstrap, "restconsumer.batched", name, 1) == [100], 20,
                 "offsets committed to the end")
        status = service.request("GET", "/job/batched/status").json
        wait_for(lambda: service.request("GET", "/job/batched/status").json["counters"]["delivered"] == 98,
                 10, "the status to count 98 delivered")
        assert status["circuit"]["state"] == "closed"
    finally:
        sink.stop()
