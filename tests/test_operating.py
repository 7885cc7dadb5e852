"""Operating the service (SPEC §9): metrics, logs an operator can follow."""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.infra.kafka import KafkaBroker
from tests.infra.kafka_io import produce, read_all
from tests.infra.ports import free_port, wait_for
from tests.infra.redis import RedisServer
from tests.infra.service import ServiceProcess
from tests.infra.sink import Received, Sink

Start = Callable[..., ServiceProcess]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, parsed by prometheus-client itself."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def job(name: str, topic: str, url: str) -> dict[str, Any]:
    return {"id": name, "owner": "ops", "type": "POST", "topic": topic,
            "datamap": {"id": "$.msg.id"}, "url": f"{url}/{name}/{{id}}", "json_body": ["id"]}


def test_metrics_on_their_own_listener_without_auth(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink) -> None:
    port = free_port()
    name = topic(partitions=2)
    service = services("--metrics", f"tcp:{port}:interface=127.0.0.1")
    assert service.request("POST", "/job/counted", job("counted", name, sink.url)).status == 201
    produce(kafka.bootstrap, name, [json.dumps({"id": f"m{i}"}).encode() for i in range(50)],
            partitions=2)
    wait_for(lambda: sink.count() >= 50, 30, "50 deliveries")

    def scrape() -> dict[Any, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            assert answer.headers["Content-Type"].startswith("text/plain")
            return samples(answer.read().decode())

    found = wait_for(lambda: (s := scrape()).get(
        ("restconsumer_messages_total", (("job", "counted"), ("outcome", "delivered"))), 0) >= 50
        and s, 15, "the delivered counter")
    assert isinstance(found, dict)
    assert found[("restconsumer_requests_total", (("code", "2xx"), ("job", "counted")))] >= 50
    assert found[("restconsumer_request_duration_seconds_count", (("job", "counted"),))] >= 50
    assert ("restconsumer_request_duration_seconds_bucket",
            (("job", "counted"), ("le", "+Inf"))) in found
    wait_for(lambda: any(k[0] == "restconsumer_consumer_lag" and ("job", "counted") in k[1]
                         for k in scrape()), 15, "lag per partition")
    found = scrape()
    assert ("restconsumer_buffered_bytes", ()) in found
    assert found[("restconsumer_circuit_open", (("job", "counted"),))] == 0


def test_json_logs_are_flat_objects_and_failures_carry_the_job(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    def refuse(_: Received) -> tuple[int, dict[str, str], bytes]:
        return 400, {}, b"no"

    sink = Sink(refuse).start()
    try:
        name = topic()
        service = services("--log-format", "json")
        assert service.request("POST", "/job/json-refused", job("json-refused", name, sink.url)).status == 201
        produce(kafka.bootstrap, name, [b'{"id": "x1"}'])
        wait_for(lambda: ": dead-lettered: " in service.log(), 30, "the dead letter's log line")
        service.stop()
        lines = [line for line in service.log().splitlines() if line.strip()]
        assert len(lines) > 5
        records = []
        for line in lines:
            record = json.loads(line)  # every line the process wrote, stdout and stderr
            assert isinstance(record, dict)
            assert {"time", "level", "message", "logger"} <= set(record), record
            assert record["time"].endswith("Z")
            assert all(not isinstance(v, (dict, list)) for v in record.values()), record
            assert not any(k.startswith("log_") for k in record), record
            records.append(record)
        dead = [r for r in records if ": dead-lettered: " in r["message"]]
        assert dead and all(r["job_id"] == "json-refused" for r in dead)
        assert dead[0]["level"] == "error", dead[0]
        assert dead[0]["offset"] == 0 and dead[0]["partition"] == 0
    finally:
        sink.stop()


def test_log_level_warn_leaves_out_info(services: Start) -> None:
    service = services("--log-level", "warn")
    service.stop()
    text = service.log()
    assert "API listening" not in text
    quiet = services()
    quiet.stop()
    assert "API listening" in quiet.log()


def test_redis_away_and_back_is_said_once_each(
        services: Start, own_redis: RedisServer) -> None:
    """Redis stopped while the service keeps trying it: one line that it is unreachable, one
    that it is back — not a line per failed use or reconnect attempt, and no "Starting
    factory" noise."""
    service = services(redis=own_redis.url)
    own_redis.stop()
    wait_for(lambda: "Redis is unreachable" in service.log(), 20, "the line saying Redis is away")
    # Each /health asks Redis: ten of them answered "Redis away" are ten failed uses, while
    # the service's own watch and reconnects go on beside them.
    failed: list[object] = []

    def used_while_away() -> bool:
        answer = service.request("GET", "/health")
        if answer.status == 503 and answer.json["redis"]["ok"] is False:
            failed.append(answer)
        return len(failed) >= 10

    wait_for(used_while_away, 60, "ten uses of Redis failing while it is away", every=1.0)
    own_redis.start()
    wait_for(lambda: "Redis is reachable again" in service.log(), 30, "the line saying it is back")
    text = service.log()
    assert text.count("Redis is unreachable") == 1
    assert text.count("Redis is reachable again") == 1
    assert "Starting factory" not in text
    assert len(text.splitlines()) < 80, "a line per reconnect attempt"


def avro_container(records: list[dict[str, str]]) -> str:
    """An Avro Object Container File of ``records``, base64."""
    import base64
    import io

    import fastavro

    schema = {"type": "record", "name": "Person",
              "fields": [{"name": "id", "type": "string"}, {"name": "name", "type": "string"}]}
    out = io.BytesIO()
    fastavro.writer(out, fastavro.parse_schema(schema), records, codec="deflate")
    return base64.b64encode(out.getvalue()).decode()


def test_metrics_on_the_api_need_the_admin(services: Start) -> None:
    service = services()
    assert service.request("GET", "/metrics", token=None).status == 401
    answer = service.request("GET", "/metrics")
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/plain")
    samples(answer.body.decode())  # parses


def test_liveness_readiness_and_every_status_at_once(
        services: Start, topic: Callable[..., str], sink: Sink) -> None:
    service = services()
    assert service.request("GET", "/health/live", token=None).json == {"status": "ok"}
    ready = service.request("GET", "/health/ready", token=None)
    assert ready.status == 200 and ready.json["status"] == "ok"
    name = topic()
    for job_id in ("s1", "s2"):
        assert service.request("POST", f"/job/{job_id}", job(job_id, name, sink.url)).status == 201
    statuses = service.request("GET", "/jobs/status").json
    assert sorted(s["id"] for s in statuses) == ["s1", "s2"]
    assert all({"state", "counters", "circuit", "lag"} <= set(s) for s in statuses)


def test_preview_builds_requests_and_sends_nothing(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink) -> None:
    service = services()
    name = topic()
    definition = {**job("dry", name, sink.url), "basic_auth": {"user": "u", "pw": "pw-preview-77"}}
    answer = service.request("POST", "/preview", {"job": definition, "messages": [
        {"value": {"id": "p1"}, "key": "k"},
        {"value": {"other": 1}},
        {"base64": avro_container([{"id": "a1", "name": "Ann"}, {"id": "a2", "name": "Bo"}])},
    ]})
    assert answer.status == 200, answer
    results = answer.json["results"]
    requests = [r for r in results if "request" in r]
    errors = [r for r in results if "error" in r]
    assert len(requests) == 3 and len(errors) == 1
    assert [r["request"]["url"] for r in requests] == [f"{sink.url}/dry/p1", f"{sink.url}/dry/a1",
                                                        f"{sink.url}/dry/a2"]
    assert requests[0]["request"]["headers"]["Authorization"] == "Basic ***"
    assert json.loads(requests[0]["request"]["body"]) == {"id": "p1"}
    assert (errors[0]["message"], errors[0]["record"]) == (1, 0)
    assert "pw-preview-77" not in answer.body.decode()
    invalid = {**definition, "url": "ftp://x/", "owner": None}
    refused = service.request("POST", "/preview", {"job": invalid, "messages": [{"value": 1}]})
    as_job = service.request("POST", "/job/dry", invalid)
    assert refused.status == as_job.status == 400
    assert refused.json["details"] == as_job.json["details"]
    assert service.request("GET", "/job/dry").status == 404, "a preview stored a job"
    stored = service.request("POST", "/job/dry", definition)
    assert stored.status == 201
    again = service.request("POST", "/job/dry/preview", {"messages": [{"value": {"id": "s1"}}]})
    assert again.json["results"][0]["request"]["url"] == f"{sink.url}/dry/s1"
    assert sink.count() == 0, "a preview sent a request"
    assert read_all(kafka.bootstrap, "restconsumer.deadletter.dry", expect=1, timeout=3) == []


def test_dead_letters_listed_and_replayed_once(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    refused = {"/replayed/m2", "/replayed/m5", "/replayed/m9"}
    fixed = {"now": False}

    def answer(got: Received) -> tuple[int, dict[str, str], bytes]:
        if got.path in refused and not fixed["now"]:
            return 400, {}, b"not yet"
        return 200, {}, b"ok"

    sink = Sink(answer).start()
    try:
        name = topic(partitions=2)
        service = services()
        assert service.request("POST", "/job/replayed", job("replayed", name, sink.url)).status == 201
        produce(kafka.bootstrap, name, [json.dumps({"id": f"m{i}"}).encode() for i in range(12)],
                partitions=2)
        wait_for(lambda: service.request("GET", "/job/replayed/status").json["counters"]
                 ["dead_lettered"] == 3, 30, "three dead letters")
        def listed() -> list[dict[str, Any]] | None:
            found = service.request("GET", "/job/replayed/deadletters").json["deadletters"]
            return found if len(found) == 3 else None

        letters = wait_for(listed, 30, "three listed")
        assert isinstance(letters, list)
        assert sorted(json.loads(d["value"])["id"] for d in letters) == ["m2", "m5", "m9"]
        for letter in letters:
            assert letter["status"] == 400 and "not yet" in letter["reason"]
            assert letter["source"]["topic"] == name and letter["attempts"] == 1
            assert letter["timestamp"].endswith("Z")
        assert len(service.request("GET", "/job/replayed/deadletters?limit=1").json["deadletters"]) == 1
        assert service.request("GET", "/job/replayed/deadletters?limit=0").status == 400

        fixed["now"] = True
        before = sink.count()
        started = service.request("POST", "/job/replayed/deadletters/replay")
        assert started.status == 202, started
        assert set(started.json["replay"]["partitions"]) <= {"0"}
        wait_for(lambda: sink.count() == before + 3, 30, "the three sent again")
        assert sorted(r.path for r in sink.snapshot()[before:]) == sorted(refused)
        wait_for(lambda: service.request("GET", "/job/replayed/status").json.get("replay", {})
                 .get("state") == "done", 30, "the replay done")
        replay = service.request("GET", "/job/replayed/status").json["replay"]
        assert replay["delivered"] == 3 and replay["dead_lettered"] == 0
        again = service.request("POST", "/job/replayed/deadletters/replay")
        assert again.status == 202

        def second_done() -> dict[str, Any] | None:
            now = service.request("GET", "/job/replayed/status").json.get("replay", {})
            return now if now.get("started") != replay["started"] and now.get("state") == "done" else None

        second = wait_for(second_done, 30, "the second replay done")
        assert isinstance(second, dict)
        assert (second["replayed"], second["delivered"], second["dead_lettered"]) == (0, 0, 0), second
        assert sink.count() == before + 3, "a second replay sent something again"
    finally:
        sink.stop()


def test_a_replay_under_way_on_one_instance_is_409_on_another(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    """Two instances on one Redis: the replay's mark is the service's, not one process's."""
    state = {"fixed": False}
    answered = threading.Event()

    def answer(got: Received) -> tuple[int, dict[str, str], bytes]:
        if not state["fixed"]:
            return 400, {}, b"not yet"
        answered.wait(30)  # the replay is held under way until the other instance was refused
        return 200, {}, b"ok"

    sink = Sink(answer).start()
    try:
        name = topic(partitions=1)
        first = services()
        assert first.request("POST", "/job/marked", job("marked", name, sink.url)).status == 201
        produce(kafka.bootstrap, name, [json.dumps({"id": f"m{i}"}).encode() for i in range(3)])
        wait_for(lambda: first.request("GET", "/job/marked/status").json["counters"]
                 ["dead_lettered"] == 3, 30, "three dead letters")
        second = services()
        state["fixed"] = True
        assert first.request("POST", "/job/marked/deadletters/replay").status == 202
        other = second.request("POST", "/job/marked/deadletters/replay")
        assert other.status == 409, other
        assert "another instance" in json.dumps(other.json)
        answered.set()
        wait_for(lambda: first.request("GET", "/job/marked/status").json.get("replay", {})
                 .get("state") == "done", 30, "the replay done")
        assert wait_for(lambda: second.request("POST", "/job/marked/deadletters/replay").status == 202,
                        10, "the mark gone with the replay")
    finally:
        answered.set()
        sink.stop()
