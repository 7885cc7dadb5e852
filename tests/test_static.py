"""Static membership (``--instance-id``, SPEC §6) on a real broker: a restart within the
session timeout moves nothing, and of two live members with one id the older ends."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from tests.infra.kafka import KafkaBroker
from tests.infra.kafka_io import produce
from tests.infra.ports import wait_for
from tests.infra.service import ServiceProcess
from tests.infra.sink import Sink

Start = Callable[..., ServiceProcess]


def moves(log: str) -> list[str]:
    return re.findall(r"job s: (?:assigned|revoked|lost) ([^\n]+)", log)


def job(name: str, sink: Sink) -> dict[str, object]:
    return {"id": "s", "owner": "ops", "type": "POST", "topic": name, "datamap": {"id": "$.msg.id"},
            "url": f"{sink.url}/s/{{id}}", "json_body": ["id"]}


def test_a_restart_within_the_session_moves_nothing(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink) -> None:
    name = topic(partitions=4)
    a = services("--instance-id", "node-a")
    b = services("--instance-id", "node-b")
    assert a.request("POST", "/job/s", job(name, sink)).status == 201
    wait_for(lambda: any(re.search(r"\[\d\]", m) for m in moves(a.log())) and
             any(re.search(r"\[\d\]", m) for m in moves(b.log())), 60, "both instances to hold a share")
    b_before = moves(b.log())
    assert a.stop() in (0, -15)
    again = services("--instance-id", "node-a")
    produce(kafka.bootstrap, name, [json.dumps({"id": f"m{i}"}).encode() for i in range(200)], partitions=4)
    wait_for(lambda: len({r.path for r in sink.snapshot()}) >= 200, 60, "200 deliveries")
    assert moves(b.log()) == b_before  # b was never revoked nor assigned anything
    assert {r.path for r in sink.snapshot()} == {f"/s/m{i}" for i in range(200)}
    assert again.process is not None and again.process.poll() is None


def test_of_two_live_members_with_one_id_the_older_ends_saying_why(
        services: Start, topic: Callable[..., str], sink: Sink) -> None:
    name = topic(partitions=2)
    older = services("--instance-id", "twin")
    assert older.request("POST", "/job/s", job(name, sink)).status == 201
    wait_for(lambda: any(re.search(r"\[\d\]", m) for m in moves(older.log())), 60, "the older's share")
    newer = services("--instance-id", "twin")
    assert older.process is not None
    code = older.process.wait(60)
    assert code not in (0, -15)  # not the clean end of a SIGTERM
    assert re.search(r"job s: Kafka ended this consumer: .*(?i:fenced)", older.log())
    assert newer.process is not None and newer.process.poll() is None
