"""``--workers N``: jobs spread over N processes on one machine, answering as one service."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tests.infra.kafka import KafkaBroker
from tests.infra.kafka_io import produce
from tests.infra.ports import wait_for
from tests.infra.service import ServiceProcess
from tests.infra.sink import Sink

Start = Callable[..., ServiceProcess]


def session_processes(leader: int) -> list[int]:
    """The pids of every live process in the session that ``leader`` started."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is the state, [3] the session id
        if int(fields[3]) == leader and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def test_two_workers_share_a_job_and_stop_together(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink) -> None:
    name = topic(partitions=4)
    service = services("--workers", "2")
    leader = service.process.pid  # type: ignore[union-attr]
    wait_for(lambda: len(session_processes(leader)) >= 2, 30, "the worker process")
    job = {"id": "w", "owner": "ops", "type": "POST", "topic": name,
           "datamap": {"id": "$.msg.id"}, "url": f"{sink.url}/w/{{id}}", "json_body": ["id"]}
    assert service.request("POST", "/job/w", job).status == 201

    def two_instances() -> bool:
        status = service.request("GET", "/job/w/status").json
        return len(status["instances"]) == 2 and all(i["partitions"] for i in status["instances"])

    wait_for(two_instances, 60, "both processes to hold partitions of the job")
    produce(kafka.bootstrap, name, [json.dumps({"id": f"m{i}"}).encode() for i in range(5000)],
            partitions=4)
    wait_for(lambda: len({r.path for r in sink.snapshot()}) >= 5000, 120, "5,000 deliveries")
    assert {r.path for r in sink.snapshot()} == {f"/w/m{i}" for i in range(5000)}
    wait_for(lambda: service.request("GET", "/job/w/status").json["counters"]["delivered"] >= 5000,
             15, "the status to count every delivery")
    status = service.request("GET", "/job/w/status").json
    assert status["counters"]["delivered"] == len(sink.snapshot())
    assert {i["instance"].split(":")[1] for i in status["instances"]} == \
        {str(p) for p in session_processes(leader)}

    # twistd ends a clean shutdown by re-raising the SIGTERM it was stopped with.
    assert service.stop() in (0, -15)
    wait_for(lambda: not session_processes(leader), 30, "every process of the service to end")
    log = service.log()
    assert "worker 2 started" in log
    assert "Traceback" not in log
    assert "did not stop in time" not in log
