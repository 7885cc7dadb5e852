"""The HTTP API of a real service process, on a real Redis and a real Kafka broker."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.infra.ports import free_port, wait_for
from tests.infra.redis import RedisServer
from tests.infra.service import ServiceProcess

Start = Callable[..., ServiceProcess]


def demo_job(**changes: Any) -> dict[str, Any]:
    """A valid job definition using every optional field."""
    job = {
        "id": "demo",
        "owner": "alice",
        "type": "POST",
        "topic": ["people"],
        "datamap": {"id": "$.msg.id", "name": "$.msg.name", "source": "$.constant.source"},
        "url": "http://127.0.0.1:9/api/{id}/",
        "basic_auth": {"user": "crm", "pw": "s3cret-pw-41"},
        "query_params": ["source"],
        "json_body": ["id", "name"],
        "constant": {"source": "aether"},
        "headers": {"X-Trace": "on", "X-Api-Key": "k3y-value-77"},
        "ratelimit": 0.1,
        "retry": {"max_attempts": 3},
    }
    job.update(changes)
    return job


def test_health_reports_redis_and_kafka_without_auth(services: Start) -> None:
    """/health needs no token and says that both Redis and the real broker answer; the
    details (broker count, error texts) only with credentials."""
    service = services()
    answer = service.request("GET", "/health", token=None)
    assert answer.status == 200, answer
    assert answer.json == {"status": "ok", "redis": {"ok": True}, "kafka": {"ok": True}}
    detailed = service.request("GET", "/health")
    assert detailed.json["kafka"]["brokers"] == 1
    assert service.request("GET", "/health", token="wrong-token").json["kafka"] == {"ok": True}


def test_health_without_credentials_hides_the_error_texts(services: Start) -> None:
    """Redis away: without credentials only that it is down; with them, why."""
    service = services(redis="redis://127.0.0.1:1/0")
    bare = service.request("GET", "/health", token=None)
    assert bare.status == 503
    assert bare.json["redis"] == {"ok": False}
    assert "127.0.0.1" not in bare.body.decode()
    detailed = service.request("GET", "/health")
    assert detailed.status == 503
    assert detailed.json["redis"]["ok"] is False and "127.0.0.1:1" in detailed.json["redis"]["error"]


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/jobs"), ("GET", "/jobs/alice"), ("GET", "/job/demo"),
    ("POST", "/job/demo"), ("DELETE", "/job/demo"),
])
def test_every_route_but_health_needs_a_token(services: Start, method: str, path: str) -> None:
    """No token, or a wrong one, answers 401 in JSON and changes nothing."""
    service = services()
    for token in (None, "wrong-token"):
        answer = service.request(method, path, demo_job(), token=token)
        assert answer.status == 401, answer
        assert answer.json["error"] == "authentication required"
        assert "Bearer" in answer.headers["WWW-Authenticate"]
    assert service.request("GET", "/jobs").json == []


def test_job_lifecycle_through_the_api(services: Start, redis_db: RedisServer) -> None:
    """Create, read (secrets hidden), list by owner, update, delete; Redis holds what the API says."""
    service = services()
    created = service.request("POST", "/job/demo", demo_job())
    assert created.status == 201, created
    body = created.json
    assert body["hash"] and len(body["hash"]) == 64
    assert body["modified"].endswith("Z")
    assert body["basic_auth"] == {"user": "crm", "pw": "***"}
    assert body["headers"] == {"X-Trace": "on", "X-Api-Key": "***"}

    stored = json.loads(redis_db.client().get("job:demo"))
    assert stored["basic_auth"]["pw"] == "s3cret-pw-41"
    assert stored["hash"] == body["hash"]
    assert redis_db.client().smembers("list_jobs") == {"demo"}

    shown = service.request("GET", "/job/demo")
    assert shown.status == 200
    assert shown.json == body
    assert "s3cret-pw-41" not in shown.body.decode()
    assert "k3y-value-77" not in shown.body.decode()

    assert [j["id"] for j in service.request("GET", "/jobs/alice").json] == ["demo"]
    assert service.request("GET", "/jobs/bob").json == []
    assert [j["id"] for j in service.request("GET", "/jobs").json] == ["demo"]

    again = service.request("POST", "/job/demo", demo_job())
    assert again.status == 200
    assert again.json["hash"] == body["hash"]
    assert again.json["modified"] == body["modified"]

    # A job read back (secrets as ***) and posted again keeps its secrets.
    round_trip = service.request("POST", "/job/demo", {**shown.json, "ratelimit": 0.5})
    assert round_trip.status == 200, round_trip
    assert round_trip.json["hash"] != body["hash"]
    stored = json.loads(redis_db.client().get("job:demo"))
    assert stored["basic_auth"]["pw"] == "s3cret-pw-41"
    assert stored["headers"]["X-Api-Key"] == "k3y-value-77"

    deleted = service.request("DELETE", "/job/demo")
    assert deleted.status == 200
    assert deleted.json == {"id": "demo", "deleted": True}
    assert service.request("GET", "/job/demo").status == 404
    assert service.request("DELETE", "/job/demo").status == 404
    assert redis_db.client().get("job:demo") is None
    assert redis_db.client().smembers("list_jobs") == set()


def test_keys_are_read_case_insensitively(services: Start) -> None:
    """`ID`, `DataMap`, `Type` as in the original spec are the same fields."""
    service = services()
    job = {"ID": "legacy", "Owner": "alice", "Type": "put", "Topic": "people",
           "DataMap": {"id": "$.msg.id"}, "URL": "http://127.0.0.1:9/{id}",
           "Basic_Auth": {"user": "u", "password": "pw-legacy-1"}}
    answer = service.request("POST", "/job/legacy", job)
    assert answer.status == 201, answer
    assert answer.json["type"] == "PUT"
    assert answer.json["topic"] == ["people"]
    assert answer.json["datamap"] == {"id": "$.msg.id"}


def test_five_mistakes_are_all_named_and_nothing_is_stored(services: Start, redis_db: RedisServer) -> None:
    """A job with five different mistakes answers 400 naming every one."""
    service = services()
    bad = demo_job(type="FETCH", topic=[], url="ftp://127.0.0.1/{id}",
                   datamap={"id": "$.msg.id", "name": "$.[[broken"}, ratelimit=-1)
    del bad["owner"]
    answer = service.request("POST", "/job/demo", bad)
    assert answer.status == 400, answer
    assert answer.json["error"] == "invalid job"
    fields = {d["field"] for d in answer.json["details"]}
    assert {"owner", "type", "topic", "url", "datamap.name", "ratelimit"} <= fields
    assert all(d["reason"] for d in answer.json["details"])
    assert redis_db.client().keys("*") == []


def test_path_id_must_match(services: Start) -> None:
    """The id in the body must be the id of the route."""
    answer = services().request("POST", "/job/other", demo_job())
    assert answer.status == 400
    assert [d["field"] for d in answer.json["details"]] == ["id"]


def test_errors_are_json(services: Start) -> None:
    """Unknown route 404, wrong method 405, malformed JSON 400, oversize body 413 — all JSON."""
    service = services()
    missing = service.request("GET", "/no/such/route")
    assert missing.status == 404 and missing.json["error"] == "not found"
    assert missing.headers["Content-Type"] == "application/json"
    wrong = service.request("PUT", "/job/demo", demo_job())
    assert wrong.status == 405 and wrong.json["error"] == "method not allowed"
    malformed = service.request("POST", "/job/demo", raw=b"{not json")
    assert malformed.status == 400 and malformed.json["error"] == "malformed JSON"
    huge = service.request("POST", "/job/demo", raw=b"[" + b"1," * (600 * 1024) + b"1]")
    assert huge.status == 413 and huge.json["error"] == "request body too large"
    assert service.request("GET", "/job/nothing-here").json["error"] == "no such job"
    # The demo endpoint exists only with --embedded.
    assert service.request("POST", "/embedded/echo/x", {"a": 1}).status == 404


def test_every_change_is_published(services: Start, redis_db: RedisServer) -> None:
    """Each create, update and delete is announced on msg/job:{id}, seen by a plain Redis client."""
    service = services()
    pubsub = redis_db.client().pubsub()
    pubsub.psubscribe("msg/job:*")
    wait_for(lambda: pubsub.get_message(timeout=1), 5, "psubscribe confirmation")
    service.request("POST", "/job/demo", demo_job())
    service.request("POST", "/job/demo", demo_job(ratelimit=2))
    service.request("DELETE", "/job/demo")
    seen = []
    deadline = time.monotonic() + 5
    while len(seen) < 3 and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=1)
        if message and message["type"] == "pmessage":
            seen.append((message["channel"], message["data"]))
    assert seen == [("msg/job:demo", "update"), ("msg/job:demo", "update"), ("msg/job:demo", "delete")]


def test_generated_token_is_printed_once_and_works(services: Start) -> None:
    """With no credentials configured, a token is generated, logged once, and is the key."""
    service = services(token=None)
    lines = [line for line in service.log().splitlines() if "generated API token" in line]
    assert len(lines) == 1
    token = lines[0].split("(shown once): ")[1].split()[0]
    assert len(token) >= 24
    assert service.request("GET", "/jobs", token=None).status == 401
    assert service.request("GET", "/jobs", token=token).status == 200


def test_user_and_password(services: Start) -> None:
    """--api-user/--api-password: Basic auth works, a wrong password does not."""
    service = services("--api-user", "ops", "--api-password", "pw-ops-93", token=None)
    good = base64.b64encode(b"ops:pw-ops-93").decode()
    bad = base64.b64encode(b"ops:nope").decode()
    assert service.request("GET", "/jobs", token=None,
                           headers={"Authorization": f"Basic {good}"}).status == 200
    assert service.request("GET", "/jobs", token=None,
                           headers={"Authorization": f"Basic {bad}"}).status == 401
    assert "generated API token" not in service.log()


def test_store_away_answers_503(services: Start) -> None:
    """With Redis unreachable the API answers 503 at once for the store, and /health says why."""
    service = services(redis=f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    answer = service.request("POST", "/job/demo", demo_job())
    assert answer.status == 503, answer
    assert answer.json["error"] == "job store unavailable"
    assert service.request("GET", "/jobs").status == 503
    assert time.monotonic() - started < 3
    health = service.request("GET", "/health", token=None)
    assert health.status == 503
    assert health.json["redis"]["ok"] is False and health.json["kafka"]["ok"] is True


def test_sigterm_while_serving_exits_cleanly(services: Start) -> None:
    """SIGTERM during a stream of requests: a clean exit within a few seconds, no error logged."""
    service = services()
    service.request("POST", "/job/demo", demo_job())
    stop = threading.Event()
    answered = []

    def hammer() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                answered.append(service.request("GET", "/jobs", timeout=2).status)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(answered) > 50, 10, "requests being served")
    started = time.monotonic()
    code = service.stop()
    took = time.monotonic() - started
    stop.set()
    for thread in threads:
        thread.join()
    # twistd ends by re-raising the signal it stopped on, as Unix daemons should.
    assert code in (0, -15)
    assert took < 5
    log = service.log()
    assert "Traceback" not in log
    assert "#error]" not in log and "#critical]" not in log
    assert "store unavailable" not in log
    assert "Server Shut Down." in log


def test_oversize_bodies_are_refused_before_anything_else(services: Start) -> None:
    """413 even without a token, for a declared length and for a chunked body alike."""
    import http.client

    service = services()
    assert service.request("POST", "/job/demo", raw=b"x" * (1024 * 1024 + 1), token=None).status == 413
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=20)
    try:
        conn.putrequest("POST", "/job/demo")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.putheader("Authorization", f"Bearer {service.token}")
        conn.endheaders()
        chunk = b"y" * 65536
        for _ in range(20):
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        conn.send(b"0\r\n\r\n")
        answer = conn.getresponse()
        assert answer.status == 413
        assert json.loads(answer.read())["error"] == "request body too large"
    finally:
        conn.close()


def test_odd_credentials_and_bodies_never_give_a_server_error(services: Start) -> None:
    """Malformed Basic auth, deeply nested JSON, odd offsets: 4xx, never 5xx."""
    service = services("--api-user", "ops", "--api-password", "pw-ops-93")
    for header in ("Basic ²²²", "Basic !!!", "Bearer", "Digest x", "Basic " + "A" * 5000):
        assert service.request("GET", "/jobs", token=None, headers={"Authorization": header}).status == 401
    nested = b"[" * 100000 + b"]" * 100000
    answer = service.request("POST", "/job/demo", raw=nested)
    assert answer.status == 400 and answer.json["error"] == "malformed JSON"
    assert service.request("POST", "/job/demo", demo_job()).status == 201
    assert service.request("POST", "/job/demo/set_offset/%C2%B2").status == 400
    assert service.request("POST", "/job/demo/set_offset/end?partition=%C2%B2").status == 400
    assert "Traceback" not in service.log()


def test_json_log_format(services: Start) -> None:
    """--log-format json: every line of the log is a JSON object with its text in message."""
    service = services("--log-format", "json")
    service.request("POST", "/job/demo", demo_job())
    service.stop()
    lines = [line for line in service.log().splitlines() if line.strip()
             and not line.startswith("%")]  # librdkafka writes its own lines to stderr
    events = [json.loads(line) for line in lines]
    messages = [e["message"] for e in events]
    assert any(m.startswith("restconsumer API listening on http://127.0.0.1:") for m in messages)
    assert any(m.startswith("job demo created") for m in messages)
    assert all(e.get("level") in ("debug", "info", "warn", "error", "critical") for e in events)
