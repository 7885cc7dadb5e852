"""``--embedded``: the whole service with no infrastructure, as the README's run command starts it."""

from __future__ import annotations

import re
import socket
from pathlib import Path

from tests.infra.ports import wait_for
from tests.infra.service import REPO, ServiceProcess


def test_embedded_runs_the_example_job_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """Mock Kafka and a private redis-server come up, the jobs/ example loads, all goes on stop."""
    service = ServiceProcess(tmp_path, kafka="unused:1", redis="redis://unused:1/0",
                             args=["--embedded", "--jobs", str(REPO / "jobs")], token=None)
    service.start()
    try:
        log = service.log()
        assert "EMBEDDED MODE" in log
        token = re.search(r"generated API token \(shown once\): (\S+)", log).group(1)
        assert f"restconsumer API listening on http://127.0.0.1:{service.port}" in log
        redis_port = int(re.search(r"private redis-server at redis://127.0.0.1:(\d+)/0", log).group(1))

        health = wait_for(lambda: (h := service.request("GET", "/health", token=None)).status == 200
                          and h, 15, "embedded health")
        assert health.json["kafka"]["ok"] and health.json["redis"]["ok"]
        listed = wait_for(lambda: service.request("GET", "/jobs", token=token).json, 10, "example job")
        assert [j["id"] for j in listed] == ["demo-echo"]
        assert listed[0]["token"] == "***"

        # The demo feed's messages flow through a job to the demo endpoint of the API.
        job = {"id": "demo", "owner": "me", "type": "PUT", "topic": "demo.people",
               "datamap": {"id": "$.msg.id", "name": "$.msg.name"}, "json_body": ["name"],
               "url": f"http://127.0.0.1:{service.port}/embedded/echo/mine/{{id}}"}
        assert service.request("POST", "/job/demo", job, token=token).status == 201
        assert [j["id"] for j in service.request("GET", "/jobs/me", token=token).json] == ["demo"]
        wait_for(lambda: re.search(r'demo endpoint got PUT /embedded/echo/mine/person-\d+ \{"name":',
                                   service.log()), 30, "a demo message delivered")
    finally:
        code = service.stop()
    assert code in (0, -15)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", redis_port)) != 0, "the private redis-server outlived the service"
    assert "Traceback" not in service.log()
