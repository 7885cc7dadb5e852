"""Last of the run: no secret the tests used appears in any log the service wrote.

Runs after every other test module (by name), so it reads the logs of the whole run; it also
drives a service of its own through every path that logs, so it never reads nothing.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.infra.kafka import KafkaBroker
from tests.infra.kafka_io import produce, read_all
from tests.infra.ports import wait_for
from tests.infra.service import ADMIN_TOKEN, ServiceProcess
from tests.infra.sink import Sink

PW, TOKEN, KEY, API_PW = "pw-logged-never-19ab", "tk-logged-never-7f30", "key-logged-never-c4d2", \
    "api-pw-logged-never-5e61"

#: Every secret the test modules use (tokens, passwords, credential headers).
USED_ELSEWHERE = [
    ADMIN_TOKEN, "s3cret-pw-41", "k3y-value-77", "pw-delivery-1", "pw-ops-93", "pw-legacy-1",
    "tok-alice-6d1e0b", "tok-bob-77c2a9", "pw-never-shown-3a9f", "tk-never-shown-81c2",
    "key-never-shown-5e07",
]


def test_no_secret_in_any_service_log(
        services: Callable[..., ServiceProcess], kafka: KafkaBroker, topic: Callable[..., str],
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """Retries, dead letters, refused logins, invalid jobs: none of it logs a secret."""
    sink = Sink(lambda got: (503, {}, b"busy") if "retry" in got.path else (400, {}, b"bad")).start()
    try:
        name = topic(1)
        service = services("--api-user", "admin", "--api-password", API_PW)
        secret = {"id": "loud", "owner": "ops", "type": "POST", "topic": name,
                  "datamap": {"id": "$.msg.id"}, "url": f"{sink.url}/retry/{{id}}",
                  "basic_auth": {"user": "u", "pw": PW}, "headers": {"X-Api-Key": KEY},
                  "retry": {"max_attempts": 3, "initial_wait": 0.05}}
        assert service.request("POST", "/job/loud", secret).status == 201
        tokened = {**secret, "id": "quiet", "url": f"{sink.url}/fail/{{id}}", "token": TOKEN}
        del tokened["basic_auth"]
        assert service.request("POST", "/job/quiet", tokened).status == 201
        broken = {**secret, "type": "FETCH", "token": TOKEN}
        assert service.request("POST", "/job/loud", broken).status == 400
        for wrong in (f"Bearer {TOKEN}", "Basic " + base64.b64encode(f"admin:{PW}".encode()).decode()):
            assert service.request("GET", "/jobs", token=None, headers={"Authorization": wrong}).status == 401
        basic = "Basic " + base64.b64encode(f"admin:{API_PW}".encode()).decode()
        assert service.request("GET", "/jobs", token=None, headers={"Authorization": basic}).status == 200
        produce(kafka.bootstrap, name, [json.dumps({"id": "e1"}).encode()])
        read_all(kafka.bootstrap, "restconsumer.deadletter.loud", expect=1, timeout=40)
        read_all(kafka.bootstrap, "restconsumer.deadletter.quiet", expect=1, timeout=40)
        wait_for(lambda: "retries exhausted" in service.log(), 10, "the retries logged")
        assert service.request("POST", "/job/loud/stop").status == 200
        assert service.request("GET", "/job/loud/status").status == 200
        service.stop()
    finally:
        sink.stop()

    logs = sorted(Path(tmp_path_factory.getbasetemp()).rglob("service-*.log"))
    assert logs
    secrets = [PW, TOKEN, KEY, API_PW, *USED_ELSEWHERE]
    found = [(log.name, s) for log in logs for s in secrets if s in log.read_text(errors="replace")]
    assert found == [], found
    print(f"{len(logs)} service logs checked for {len(secrets)} secrets")
