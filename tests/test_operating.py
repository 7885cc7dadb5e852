"""Operating the service (SPEC §9): metrics, logs an operator can follow."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.infra.kafka import KafkaBroker
from tests.infra.kafka_io import produce
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
        assert service.request("POST", "/job/refused", job("refused", name, sink.url)).status == 201
        produce(kafka.bootstrap, name, [b'{"id": "x1"}'])
        wait_for(lambda: "dead-lettered" in service.log(), 30, "the dead letter's log line")
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
        assert dead and all(r["job_id"] == "refused" for r in dead)
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


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, which the test stops and starts."""
    server = RedisServer(tmp_path / "own-redis", persist=True)
    server.start()
    yield server
    server.stop()


def test_redis_away_and_back_is_said_once_each(
        services: Start, own_redis: RedisServer) -> None:
    """Redis stopped for ~12 s: one line that it is unreachable, one that it is back — not a
    line per reconnect attempt, and no "Starting factory" noise."""
    service = services(redis=own_redis.url)
    own_redis.stop()
    wait_for(lambda: "Redis is unreachable" in service.log(), 20, "the line saying Redis is away")
    time.sleep(12)
    own_redis.start()
    wait_for(lambda: "Redis is reachable again" in service.log(), 30, "the line saying it is back")
    text = service.log()
    assert text.count("Redis is unreachable") == 1
    assert text.count("Redis is reachable again") == 1
    assert "Starting factory" not in text
    assert len(text.splitlines()) < 80, "a line per reconnect attempt"
