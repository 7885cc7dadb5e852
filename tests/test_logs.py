"""No secret the tests used appears in any log the service wrote.

The test drives a service of its own through every path that logs and reads its log, so it
never reads nothing, wherever it runs in the order. The logs of the whole run are read when
the run ends, by the teardown of a session-wide fixture (a leak there is reported as an
error at the teardown of the run's last test), so no module has to run last. The secrets
looked for are not a hand-kept list: :func:`tests.infra.used_secrets.collect` reads them from
the test modules themselves (and those registered at run time), so a new test's secret is
looked for without anyone adding it here.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.infra.kafka import KafkaBroker
from tests.infra.kafka_io import produce, read_all
from tests.infra.ports import wait_for
from tests.infra.service import ServiceProcess
from tests.infra.sink import Received, Sink
from tests.infra.used_secrets import collect

PW, TOKEN, KEY, API_PW = "pw-logged-never-19ab", "tk-logged-never-7f30", "key-logged-never-c4d2", \
    "api-pw-logged-never-5e61"
ENV_SECRET = "env-logged-never-0b7d"


def leaked(logs: list[Path]) -> list[tuple[str, str]]:
    """(log, secret) for every secret of the tests found in one of ``logs``."""
    secrets = sorted(collect())
    assert {PW, TOKEN, KEY, API_PW, ENV_SECRET} <= set(secrets)
    return [(log.name, s) for log in logs for s in secrets if s in log.read_text(errors="replace")]


@pytest.fixture(scope="session")
def every_log_of_the_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """At the end of the run, whatever ran after this module: no secret in any service log."""
    yield
    logs = sorted(Path(tmp_path_factory.getbasetemp()).rglob("service-*.log"))
    assert logs
    found = leaked(logs)
    assert found == [], f"secrets in the service logs of the run: {found}"
    print(f"{len(logs)} service logs checked for secrets")


def test_no_secret_in_any_service_log(
        services: Callable[..., ServiceProcess], kafka: KafkaBroker, topic: Callable[..., str],
        every_log_of_the_run: None) -> None:
    """Retries, dead letters, refused logins, invalid jobs: none of it logs a secret."""
    e1_tried_again = threading.Event()
    slow_judged = threading.Event()
    e1_seen = []
    holder: list[ServiceProcess] = []

    def slow_dead_lettered() -> bool:
        return holder[0].request("GET", "/job/loud/status").json["counters"]["dead_lettered"] >= 1

    def respond(got: Received) -> tuple[int, dict[str, str], bytes]:
        # A non-retryable answer while e1 is retried, so that e1's retries end in a dead
        # letter rather than in an open circuit (SPEC §5): slow is answered once e1 failed
        # and was tried again, and e1's last try once the service had slow's answer.
        if got.path == "/retry/slow":
            e1_tried_again.wait(30)
            return 400, {}, b"bad"
        if got.path == "/retry/e1":
            e1_seen.append(got)
            if len(e1_seen) == 2:
                e1_tried_again.set()
            elif len(e1_seen) == 3 and not slow_judged.is_set():
                wait_for(slow_dead_lettered, 30, "slow's 400 dead-lettered")
                slow_judged.set()
        return (503, {}, b"busy") if "retry" in got.path else (400, {}, b"bad")

    sink = Sink(respond).start()
    try:
        name = topic(1)
        service = services("--api-user", "admin", "--api-password", API_PW,
                           env={"RESTCONSUMER_SECRET_LOGGED": ENV_SECRET})
        holder.append(service)
        secret = {"id": "loud", "owner": "ops", "type": "POST", "topic": name,
                  "datamap": {"id": "$.msg.id"}, "url": f"{sink.url}/retry/{{id}}",
                  "basic_auth": {"user": "u", "pw": PW}, "headers": {"X-Api-Key": KEY},
                  "retry": {"max_attempts": 3, "initial_wait": 0.4, "max_wait": 0.4},
                  "ordering": "none"}
        assert service.request("POST", "/job/loud", secret).status == 201
        tokened = {**secret, "id": "quiet", "url": f"{sink.url}/fail/{{id}}", "token": TOKEN}
        del tokened["basic_auth"]
        assert service.request("POST", "/job/quiet", tokened).status == 201
        by_reference = {**tokened, "id": "referenced", "token": "${env:RESTCONSUMER_SECRET_LOGGED}"}
        assert service.request("POST", "/job/referenced", by_reference).status == 201
        unresolved = {**by_reference, "id": "unresolved", "token": "${env:RESTCONSUMER_SECRET_UNSET}"}
        assert service.request("POST", "/job/unresolved", unresolved).status == 201
        broken = {**secret, "type": "FETCH", "token": TOKEN}
        assert service.request("POST", "/job/loud", broken).status == 400
        for wrong in (f"Bearer {TOKEN}", "Basic " + base64.b64encode(f"admin:{PW}".encode()).decode()):
            assert service.request("GET", "/jobs", token=None, headers={"Authorization": wrong}).status == 401
        basic = "Basic " + base64.b64encode(f"admin:{API_PW}".encode()).decode()
        assert service.request("GET", "/jobs", token=None, headers={"Authorization": basic}).status == 200
        produce(kafka.bootstrap, name, [json.dumps({"id": i}).encode() for i in ("slow", "e1")])
        read_all(kafka.bootstrap, "restconsumer.deadletter.loud", expect=2, timeout=40)
        read_all(kafka.bootstrap, "restconsumer.deadletter.quiet", expect=2, timeout=40)
        read_all(kafka.bootstrap, "restconsumer.deadletter.referenced", expect=2, timeout=40)
        assert any(r.headers.get("authorization") == f"Bearer {ENV_SECRET}" for r in sink.snapshot())
        assert "RESTCONSUMER_SECRET_UNSET" in service.log()
        wait_for(lambda: "retries exhausted" in service.log(), 10, "the retries logged")
        assert service.request("POST", "/job/loud/stop").status == 200
        assert service.request("GET", "/job/loud/status").status == 200
        service.stop()
    finally:
        e1_tried_again.set()
        sink.stop()
    assert slow_judged.is_set(), "e1's last try came before slow's answer was judged"
    assert leaked([service.log_path]) == []
