"""Rebalancing moves only what moves (SPEC §6): two instances of the service share a job on
a real broker; an instance joining or leaving never revokes what the other keeps, and the
kept partitions go on delivering throughout."""

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


def partitions_in(log: str, how: str) -> list[set[int]]:
    """Each ``assigned``/``revoked`` line of job ``r``: its partitions."""
    return [{int(p) for p in re.findall(r"\[(\d+)\]", line)}
            for line in re.findall(rf"job r: {how} ([^\n]*)", log)]


def test_an_instance_joining_and_leaving_moves_only_its_share(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink) -> None:
    name = topic(partitions=4)
    first = services()
    job = {"id": "r", "owner": "ops", "type": "POST", "topic": name, "datamap": {"id": "$.msg.id"},
           "url": f"{sink.url}/r/{{id}}", "json_body": ["id"]}
    assert first.request("POST", "/job/r", job).status == 201
    wait_for(lambda: partitions_in(first.log(), "assigned") == [{0, 1, 2, 3}], 60, "the whole topic")

    second = services()
    wait_for(lambda: sum(map(len, partitions_in(second.log(), "assigned"))) == 2, 60, "a share to the second")
    [moved] = partitions_in(first.log(), "revoked")  # one revoke, of what moved only
    assert len(moved) == 2 and partitions_in(second.log(), "assigned")[-1] == moved
    kept = {0, 1, 2, 3} - moved

    produce(kafka.bootstrap, name, [json.dumps({"id": f"a{i}"}).encode() for i in range(400)], partitions=4)
    wait_for(lambda: len({r.path for r in sink.snapshot()}) >= 400, 60, "400 deliveries")

    assert second.stop() in (0, -15)
    wait_for(lambda: sum(map(len, partitions_in(first.log(), "assigned"))) == 6, 60,
             "the first takes its share back")
    assert partitions_in(first.log(), "assigned")[-1] == moved  # the incremental assign: only those
    revoked = partitions_in(first.log(), "revoked")
    assert revoked == [moved] and not kept & set().union(*revoked)  # what it kept, never revoked

    produce(kafka.bootstrap, name, [json.dumps({"id": f"b{i}"}).encode() for i in range(400)], partitions=4)
    wait_for(lambda: len({r.path for r in sink.snapshot()}) >= 800, 60, "800 deliveries")
    assert {r.path for r in sink.snapshot()} == {f"/r/{p}{i}" for p in "ab" for i in range(400)}
