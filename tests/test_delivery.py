"""Messages become requests: real Kafka, real Redis, a real service process and a loopback endpoint."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import fastavro

from tests.infra.groups import finished, members
from tests.infra.kafka import KafkaBroker
from tests.infra.kafka_io import produce, read_all
from tests.infra.ports import wait_for
from tests.infra.service import ServiceProcess
from tests.infra.sink import Received, Sink

Start = Callable[..., ServiceProcess]


def settle(sink: Sink, expect: int, kafka: KafkaBroker, job_id: str, topic: str, partitions: int,
           timeout: float = 60) -> list[Received]:
    """Wait for ``expect`` requests and for the job to have finished every message of
    ``topic`` (its group committed each partition to its end), so no request of it is under
    way or still to come; then what the endpoint received."""
    wait_for(lambda: sink.count() >= expect, timeout, f"{expect} requests (have {sink.count()})", every=0.2)
    wait_for(lambda: finished(kafka.bootstrap, f"restconsumer.{job_id}", topic, partitions), timeout,
             f"job {job_id} to commit {topic} to its end", every=0.2)
    return sink.snapshot()


def paths_of(sink: Sink, prefix: str) -> list[str]:
    """The paths received that start with ``prefix``."""
    return [got.path for got in sink.snapshot() if got.path.startswith(prefix)]


def test_json_messages_become_exactly_the_expected_requests(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink) -> None:
    """1,000 JSON messages over 3 partitions: one request each, every part checked, order kept."""
    name = topic(3)
    produce(kafka.bootstrap, name, (json.dumps({"id": f"p{i}", "name": f"Person {i}", "age": i,
                                                "nested": {"n": i % 7}}).encode()
                                    for i in range(1000)), partitions=3)
    service = services()
    job = {
        "id": "people", "owner": "crm", "type": "PUT", "topic": name,
        "datamap": {"id": "$.msg.id", "name": "$.msg.name", "age": "$.msg.age",
                    "n": "$.msg.nested.n", "source": "$.constant.source", "part": "$.meta.partition",
                    "offset": "$.meta.offset", "absent": "$.msg.nothing"},
        "url": f"{sink.url}/api/people/{{id}}/",
        "query_params": ["source", "part", "absent"],
        "json_body": ["id", "name", "age", "n", "offset", "absent"],
        "basic_auth": {"user": "sync", "pw": "pw-delivery-1"},
        "constant": {"source": "aether"},
        "headers": {"X-Origin": "restconsumer"},
    }
    assert service.request("POST", "/job/people", job).status == 201
    received = settle(sink, 1000, kafka, "people", name, 3)
    assert len(received) == 1000
    expected_auth = "Basic " + base64.b64encode(b"sync:pw-delivery-1").decode()
    by_id = {}
    per_partition: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for got in received:
        body = json.loads(got.body)
        i = body["age"]
        assert got.method == "PUT"
        assert got.path == f"/api/people/p{i}/"
        assert got.query == {"source": ["aether"], "part": [str(i % 3)]}
        assert body == {"id": f"p{i}", "name": f"Person {i}", "age": i, "n": i % 7, "offset": i // 3}
        assert got.headers["authorization"] == expected_auth
        assert got.headers["x-origin"] == "restconsumer"
        assert got.headers["content-type"] == "application/json"
        by_id[i] = got
        per_partition[i % 3].append(i)
    assert sorted(by_id) == list(range(1000))
    for partition, order in per_partition.items():
        assert order == sorted(order), f"partition {partition} out of order"


PERSON = {
    "type": "record", "name": "Person", "namespace": "org.aether",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "nickname", "type": ["null", "string"], "default": None},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "household", "type": {"type": "record", "name": "Household", "fields": [
            {"name": "id", "type": "string"}, {"name": "size", "type": "int"}]}},
    ],
}


def avro_container(records: list[dict[str, Any]]) -> bytes:
    """One Aether-style Kafka message: an Avro container file, deflate, schema embedded."""
    out = io.BytesIO()
    fastavro.writer(out, fastavro.parse_schema(PERSON), records, codec="deflate")
    return out.getvalue()


def test_avro_containers_give_one_request_per_record(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink) -> None:
    """Deflate containers of 12 nested records: schema name, nested paths, unions, arrays as lists."""
    name = topic(2)
    messages = []
    for m in range(6):
        messages.append(avro_container([
            {"id": f"r{m}-{r}", "nickname": None if r % 2 else f"nick{r}",
             "tags": [f"t{r}", f"u{r}"], "household": {"id": f"h{m}", "size": r}}
            for r in range(12)]))
    produce(kafka.bootstrap, name, messages, partitions=2)
    service = services()
    job = {"id": "avro", "owner": "aether", "type": "POST", "topic": name,
           "datamap": {"id": "$.msg.id", "schema_name": "$.schema.name", "household": "$.msg.household.id",
                       "size": "$.msg.household.size", "tags": "$.msg.tags[*]", "nickname": "$.msg.nickname"},
           "url": f"{sink.url}/households/{{household}}/people/{{id}}",
           "json_body": ["schema_name", "tags", "size", "nickname"]}
    assert service.request("POST", "/job/avro", job).status == 201
    received = settle(sink, 72, kafka, "avro", name, 2)
    assert len(received) == 72
    seen = set()
    for got in received:
        body = json.loads(got.body)
        _, _, household, _, person = got.path.split("/")
        m, r = (int(x) for x in person[1:].split("-"))
        assert household == f"h{m}"
        assert body["schema_name"] == "org.aether.Person"
        assert body["tags"] == [f"t{r}", f"u{r}"]
        assert body["size"] == r
        assert body["nickname"] == (None if r % 2 else f"nick{r}")
        seen.add((m, r))
    assert len(seen) == 72


HOSTILE = ["a/b", "what?x=1", "frag#ment", "100%", "..", ".", "../../admin", "with space",
           "ünïcødé ✓", "@evil.example:80", "a\\b", "%2F", ""]


def test_message_data_stays_inside_one_path_segment(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink) -> None:
    """Values with / ? # % .. spaces and non-ASCII arrive as one percent-encoded segment."""
    name = topic(1)
    produce(kafka.bootstrap, name, (json.dumps({"id": value, "n": i}).encode()
                                    for i, value in enumerate(HOSTILE)))
    service = services()
    job = {"id": "hostile", "owner": "sec", "type": "POST", "topic": name,
           "datamap": {"id": "$.msg.id", "n": "$.msg.n"},
           "url": f"{sink.url}/things/{{id}}/x?fixed=1", "query_params": ["id"], "json_body": ["n"]}
    assert service.request("POST", "/job/hostile", job).status == 201
    received = settle(sink, len(HOSTILE), kafka, "hostile", name, 1)
    assert len(received) == len(HOSTILE)
    for got in received:
        value = HOSTILE[json.loads(got.body)["n"]]
        segments = got.path.split("/")
        assert len(segments) == 4 and segments[:2] == ["", "things"] and segments[3] == "x", got.raw_path
        assert unquote(segments[2]) == value
        assert segments[2] not in ("..", ".")
        assert got.query == {"fixed": ["1"], "id": [value]}
        assert got.headers["host"] == f"127.0.0.1:{sink.port}"


def test_a_change_applies_to_what_follows_it_nothing_lost_and_delete_stops(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink) -> None:
    """Changing the URL through the API: once one request went to the new URL, every message
    produced after it goes there, and nothing is lost. After a delete the job's consumer
    leaves its group, and what is produced then reaches another job reading the topic, never
    the deleted one."""
    name = topic(2)
    service = services()
    job = {"id": "moving", "owner": "ops", "type": "POST", "topic": name,
           "datamap": {"id": "$.msg.id"}, "url": f"{sink.url}/v1/{{id}}"}
    assert service.request("POST", "/job/moving", job).status == 201
    produce(kafka.bootstrap, name, [json.dumps({"id": f"a{i}"}).encode() for i in range(50)], partitions=2)
    settle(sink, 50, kafka, "moving", name, 2, timeout=30)

    assert service.request("POST", "/job/moving", {**job, "url": f"{sink.url}/v2/{{id}}"}).status == 200
    sent = 0

    def changed() -> bool:
        # The change is announced to every instance; keep messages coming until one shows it.
        nonlocal sent
        produce(kafka.bootstrap, name, [json.dumps({"id": f"b{sent + i}"}).encode() for i in range(10)],
                partitions=2)
        sent += 10
        return bool(paths_of(sink, "/v2/"))

    wait_for(changed, 30, "a request to the changed URL", every=0.2)
    produce(kafka.bootstrap, name, [json.dumps({"id": f"c{i}"}).encode() for i in range(20)], partitions=2)
    received = settle(sink, 50 + sent + 20, kafka, "moving", name, 2, timeout=30)
    ids = [got.path.rsplit("/", 1)[1] for got in received]
    assert set(ids) == {f"a{i}" for i in range(50)} | {f"b{i}" for i in range(sent)} | \
        {f"c{i}" for i in range(20)}
    after = sorted(got.path for got in received if got.path.rsplit("/", 1)[1].startswith("c"))
    assert after == sorted(f"/v2/c{i}" for i in range(20)), "produced after the change, sent to the old URL"

    assert service.request("DELETE", "/job/moving").status == 200
    wait_for(lambda: members(kafka.bootstrap, "restconsumer.moving") == 0, 30,
             "the deleted job's consumer to leave its group")
    produce(kafka.bootstrap, name, [json.dumps({"id": f"d{i}"}).encode() for i in range(20)], partitions=2)
    witness = {**job, "id": "witness", "url": f"{sink.url}/witness/{{id}}"}
    assert service.request("POST", "/job/witness", witness).status == 201
    # The witness reads the topic from its start: the d messages were there, and it got them.
    settle(sink, 50 + sent + 20 + 50 + sent + 20 + 20, kafka, "witness", name, 2)
    assert sorted(p for p in paths_of(sink, "/witness/d")) == sorted(f"/witness/d{i}" for i in range(20))
    assert [p for p in paths_of(sink, "/v") if p.rsplit("/", 1)[1].startswith("d")] == [], \
        "the deleted job delivered"
    assert members(kafka.bootstrap, "restconsumer.moving") == 0


def test_bad_messages_are_dead_lettered_and_the_job_goes_on(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    """Undecodable bytes, a missing URL key and a 400 answer go to the dead-letter topic."""
    sink = Sink(lambda got: (400, {}, b"no such patient") if "bad400" in got.raw_path
                else (200, {}, b"ok")).start()
    try:
        name = topic(1)
        dead = f"{name}.dead"
        values = [b'{"id": "good1"}', b"\xff\xfe\x00\x81 not text", b'{"other": 1}',
                  b'{"id": "bad400"}', b'{"id": "good2"}']
        produce(kafka.bootstrap, name, values, headers=[("origin", b"test")])
        service = services()
        job = {"id": "dlq", "owner": "ops", "type": "POST", "topic": name, "dead_letter_topic": dead,
               "datamap": {"id": "$.msg.id"}, "url": f"{sink.url}/patients/{{id}}"}
        assert service.request("POST", "/job/dlq", job).status == 201
        received = settle(sink, 3, kafka, "dlq", name, 1)
        assert [got.path for got in received] == ["/patients/good1", "/patients/bad400", "/patients/good2"]
        letters = read_all(kafka.bootstrap, dead, expect=3)
        assert len(letters) == 3
        headers = [dict(m.headers()) for m in letters]
        assert [m.value() for m in letters] == [values[1], values[2], values[3]]
        assert [int(h["restconsumer.offset"]) for h in headers] == [1, 2, 3]
        for h in headers:
            assert h["restconsumer.job"] == b"dlq"
            assert h["restconsumer.topic"] == name.encode()
            assert h["restconsumer.partition"] == b"0"
            assert h["origin"] == b"test"
        assert b"UTF-8" in headers[0]["restconsumer.reason"]
        assert b"'id'" in headers[1]["restconsumer.reason"]
        assert headers[2]["restconsumer.control.status"] == b"400"
        assert b"no such patient" in headers[2]["restconsumer.reason"]
        log = service.log()
        assert "dead-lettered" in log and f"{name}[0]@3 entity bad400" in log
    finally:
        sink.stop()


def test_a_missed_announcement_is_caught_up_by_reconcile(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink,
        redis_db: Any) -> None:
    """A job written to Redis with no announcement starts at the next reconcile; a topic change
    made the same way moves the job to the new topic."""
    first, second = topic(1), topic(1)
    service = services("--reconcile-every", "1")
    job = {"id": "quiet", "owner": "ops", "type": "POST", "topic": first,
           "datamap": {"id": "$.msg.id"}, "url": f"{sink.url}/q/{{id}}"}
    created = service.request("POST", "/job/quiet", job).json
    client = redis_db.client()
    # Change the job behind the service's back: no message on msg/job:quiet.
    changed = dict(created)
    changed.update(topic=[second], hash="changed-elsewhere")
    client.set("job:quiet", json.dumps(changed))
    produce(kafka.bootstrap, second, [b'{"id": "on-second"}'])
    produce(kafka.bootstrap, first, [b'{"id": "on-first"}'])
    received = settle(sink, 1, kafka, "quiet", second, 1, timeout=30)
    assert [got.path for got in received] == ["/q/on-second"]
    assert f"starting on {second}" in service.log()
    # The first topic is read no more: a job reading it gets on-first, the changed job does not.
    witness = {**job, "id": "witness", "url": f"{sink.url}/witness/{{id}}"}
    assert service.request("POST", "/job/witness", witness).status == 201
    settle(sink, 2, kafka, "witness", first, 1, timeout=30)
    assert [got.path for got in sink.snapshot()] == ["/q/on-second", "/witness/on-first"]
