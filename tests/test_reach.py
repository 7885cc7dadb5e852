"""What a tenant's jobs may reach (SPEC §8), through real Kafka, Redis and HTTP on loopback.

The tokens file names three owners: ``tenant`` (public addresses only), ``lab`` (granted
127.0.0.1) and ``hop`` (granted the name ``localhost``, not the address). Jobs of the
admin token are limited by ``--allow-hosts`` alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.infra.kafka import KafkaBroker
from tests.infra.kafka_io import produce, read_all
from tests.infra.ports import wait_for
from tests.infra.service import ServiceProcess
from tests.infra.sink import Received, Sink

Start = Callable[..., ServiceProcess]
TENANT, LAB, HOP = "tok-tenant-51c0", "tok-lab-90ad", "tok-hop-2be4"
QUICK = {"max_attempts": 2, "initial_wait": 0.1, "max_wait": 0.2}


def job(job_id: str, owner: str, url: str, topic: str, **more: Any) -> dict[str, Any]:
    return {"id": job_id, "owner": owner, "type": "POST", "topic": topic, "datamap": {"id": "$.msg.id"},
            "url": url, "retry": QUICK, **more}


@pytest.fixture
def sink() -> Iterator[Sink]:
    """An endpoint on 127.0.0.1; /hop/ redirects to 127.0.0.1 itself."""
    def respond(got: Received) -> tuple[int, dict[str, str], bytes]:
        if got.path.startswith("/hop/"):
            return 307, {"Location": f"http://127.0.0.1:{server.port}/landed/{got.path[5:]}"}, b""
        return 200, {}, b"ok"

    server = Sink(respond).start()
    yield server
    server.stop()


@pytest.fixture
def service(tmp_path: Path, services: Start) -> ServiceProcess:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({
        TENANT: "tenant",
        LAB: {"owner": "lab", "destinations": ["127.0.0.1"]},
        HOP: {"owner": "hop", "destinations": ["localhost"]},
    }))
    return services("--tokens", str(tokens))


def dead_letter_reason(kafka: KafkaBroker, job_id: str) -> str:
    [letter] = read_all(kafka.bootstrap, f"restconsumer.deadletter.{job_id}", expect=1, timeout=40)
    return dict(letter.headers())["restconsumer.reason"].decode()


def test_a_tenant_reaches_public_and_granted_addresses_only(
        service: ServiceProcess, sink: Sink, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    name = topic(1)
    port = sink.port

    refused = service.request("POST", "/job/literal", job("literal", "tenant", f"http://127.0.0.1:{port}/x/{{id}}",
                                                          name), token=TENANT)
    assert refused.status == 400
    [problem] = refused.json["details"]
    assert problem["field"] == "url" and "127.0.0.1 is a loopback address" in problem["reason"]
    refused = service.request("POST", "/job/token", job(
        "token", "tenant", "https://api.example/{id}", name,
        oauth2={"token_url": "http://169.254.169.254/token", "client_id": "c", "client_secret": "s"}),
        token=TENANT)
    assert refused.status == 400 and refused.json["details"][0]["field"] == "oauth2.token_url"

    definitions = [
        ("byname", TENANT, job("byname", "tenant", f"http://localhost:{port}/byname/{{id}}", name)),
        ("lab", LAB, job("lab", "lab", f"http://127.0.0.1:{port}/lab/{{id}}", name)),
        ("admin", True, job("admin", "ops", f"http://127.0.0.1:{port}/admin/{{id}}", name)),
        ("hop", HOP, job("hop", "hop", f"http://localhost:{port}/hop/{{id}}", name, follow_redirects=True)),
    ]
    for job_id, token, definition in definitions:
        answer = service.request("POST", f"/job/{job_id}", definition, token=token)
        assert answer.status == 201, (job_id, answer.json)
    preview = service.request("POST", "/job/byname/preview", {"messages": [{"value": {"id": "p"}}]},
                              token=TENANT)
    assert preview.status == 200
    [result] = preview.json["results"]
    assert "is a loopback address" in result["refused"] and result["request"]["url"].endswith("/byname/p")
    preview = service.request("POST", "/job/lab/preview", {"messages": [{"value": {"id": "p"}}]}, token=LAB)
    assert "refused" not in preview.json["results"][0]
    produce(kafka.bootstrap, name, [b'{"id": "r1"}'])

    wait_for(lambda: {"/lab/r1", "/admin/r1", "/hop/r1"} <= {r.path for r in sink.snapshot()}, 40,
             "the granted, admin and redirecting jobs' requests")
    reason = dead_letter_reason(kafka, "byname")
    assert "localhost (127.0.0.1) is a loopback address" in reason or "localhost (::1)" in reason
    reason = dead_letter_reason(kafka, "hop")
    assert "127.0.0.1 is a loopback address" in reason
    paths = [r.path for r in sink.snapshot()]
    assert not [p for p in paths if p.startswith(("/byname/", "/landed/"))]  # never reached
    assert paths.count("/lab/r1") == 1 and paths.count("/admin/r1") == 1

