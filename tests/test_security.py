"""Security (SPEC §4, §7-8): owner-scoped tokens, secrets, destinations, TLS, the OpenAPI contract."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from restconsumer.api import API
from tests.infra.certs import PKI, make_pki
from tests.infra.kafka import KafkaBroker
from tests.infra.kafka_io import produce, read_all
from tests.infra.ports import wait_for
from tests.infra.service import REPO, ServiceProcess
from tests.infra.sink import Received, Sink

Start = Callable[..., ServiceProcess]
ALICE, BOB = "tok-alice-6d1e0b", "tok-bob-77c2a9"
SECRET_PW, SECRET_TOKEN, SECRET_KEY = "pw-never-shown-3a9f", "tk-never-shown-81c2", "key-never-shown-5e07"


def job(job_id: str, owner: str, url: str = "http://127.0.0.1:9/{id}", **more: Any) -> dict[str, Any]:
    """A small valid job."""
    return {"id": job_id, "owner": owner, "type": "POST", "topic": "people",
            "datamap": {"id": "$.msg.id"}, "url": url, **more}


@pytest.fixture
def scoped(tmp_path: Path, services: Start) -> ServiceProcess:
    """A service with owner-scoped tokens for alice and bob, besides the admin token."""
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({ALICE: "alice", BOB: "bob"}))
    return services("--tokens", str(tokens))


def test_owner_tokens_see_and_change_only_their_jobs(scoped: ServiceProcess) -> None:
    """/jobs/{other} 403, another owner's job 404, posting for another owner 403; admin sees all."""
    s = scoped
    assert s.request("POST", "/job/a1", job("a1", "alice"), token=ALICE).status == 201
    assert s.request("POST", "/job/b1", job("b1", "bob"), token=BOB).status == 201
    assert s.request("POST", "/job/x1", job("x1", "carol")).status == 201  # admin, any owner

    assert [j["id"] for j in s.request("GET", "/jobs", token=ALICE).json] == ["a1"]
    assert [j["id"] for j in s.request("GET", "/jobs/alice", token=ALICE).json] == ["a1"]
    assert s.request("GET", "/jobs/bob", token=ALICE).status == 403
    assert s.request("GET", "/jobs/bob", token=ALICE).json["error"] == "forbidden"
    for method, path in [("GET", "/job/b1"), ("DELETE", "/job/b1"), ("POST", "/job/b1/stop"),
                         ("POST", "/job/b1/start"), ("GET", "/job/b1/status"),
                         ("POST", "/job/b1/set_offset/end")]:
        answer = s.request(method, path, token=ALICE)
        assert answer.status == 404, (method, path, answer)
    assert s.request("POST", "/job/a2", job("a2", "bob"), token=ALICE).status == 403
    assert s.request("POST", "/job/b1", job("b1", "alice"), token=ALICE).status == 403
    assert s.request("GET", "/job/b1").status == 200
    assert s.request("GET", "/job/b1").json["owner"] == "bob"
    assert sorted(j["id"] for j in s.request("GET", "/jobs").json) == ["a1", "b1", "x1"]
    assert s.request("GET", "/jobs", token="tok-unknown").status == 401
    assert s.request("DELETE", "/job/a1", token=ALICE).status == 200


def test_secrets_never_leave_in_answers_or_dead_letters(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    """pw, token and credential headers: *** in every answer, absent from dead-letter headers."""
    sink = Sink(lambda got: (400, {}, b"rejected")).start()
    try:
        name = topic(1)
        service = services()
        secret_job = job("secretive", "ops", f"{sink.url}/{{id}}", topic=name,
                         basic_auth={"user": "u", "pw": SECRET_PW},
                         headers={"X-Api-Key": SECRET_KEY, "X-Auth-Token": SECRET_KEY,
                                  "Authorization-Extra": SECRET_KEY, "X-Plain": "visible"})
        answers = [service.request("POST", "/job/secretive", secret_job)]
        token_job = job("tokened", "ops", f"{sink.url}/{{id}}", topic=name, token=SECRET_TOKEN)
        answers.append(service.request("POST", "/job/tokened", token_job))
        answers += [service.request("GET", "/job/secretive"), service.request("GET", "/jobs"),
                    service.request("GET", "/jobs/ops"), service.request("GET", "/job/tokened")]
        for answer in answers:
            assert answer.status in (200, 201)
            for secret in (SECRET_PW, SECRET_TOKEN, SECRET_KEY):
                assert secret.encode() not in answer.body
        shown = service.request("GET", "/job/secretive").json
        assert shown["headers"]["X-Plain"] == "visible"
        assert set(shown["headers"].values()) == {"***", "visible"}

        produce(kafka.bootstrap, name, [b'{"id": "one"}'])
        wait_for(lambda: sink.count() >= 2, 30, "both jobs tried")
        got = {r.headers.get("authorization") for r in sink.snapshot()}
        assert f"Bearer {SECRET_TOKEN}" in got  # the endpoint does get the credentials
        for job_id in ("secretive", "tokened"):
            [letter] = read_all(kafka.bootstrap, f"restconsumer.deadletter.{job_id}", expect=1)
            blob = json.dumps([(k, v.decode(errors="replace")) for k, v in letter.headers()])
            for secret in (SECRET_PW, SECRET_TOKEN, SECRET_KEY):
                assert secret not in blob
    finally:
        sink.stop()


def test_allowlist_refuses_other_hosts_and_guards_redirects(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    """--allow-hosts: other hosts refused at validation; redirects not followed unless asked,
    then only to allowed hosts."""
    def respond(got: Received) -> tuple[int, dict[str, str], bytes]:
        if got.path.startswith("/away/"):
            return 307, {"Location": f"http://localhost:{sink.port}/landed/x"}, b""
        if got.path.startswith("/hop/"):
            return 307, {"Location": f"http://127.0.0.1:{sink.port}/landed/{got.path[5:]}"}, b""
        return 200, {}, b"ok"

    sink = Sink(respond).start()
    try:
        name = topic(1)
        service = services("--allow-hosts", "127.0.0.1,Other.Example")
        refused = service.request("POST", "/job/evil", job("evil", "ops", "http://evil.example/{id}"))
        assert refused.status == 400
        assert refused.json["details"] == [
            {"field": "url", "reason": "host 'evil.example' is not in the allowed hosts"}]
        allowed = job("ok", "ops", "https://other.example/{id}")
        assert service.request("POST", "/job/ok", allowed).status == 201
        service.request("DELETE", "/job/ok")

        quick = {"max_attempts": 1}
        for job_id, path, follow in [("follows", "hop", True), ("stays", "hop", False),
                                     ("escapes", "away", True)]:
            definition = job(job_id, "ops", f"{sink.url}/{path}/{{id}}", topic=name,
                             follow_redirects=follow, retry=quick)
            assert service.request("POST", f"/job/{job_id}", definition).status == 201
        produce(kafka.bootstrap, name, [b'{"id": "r1"}'])
        wait_for(lambda: len(read_all(kafka.bootstrap, "restconsumer.deadletter.escapes", expect=1,
                                      timeout=2)) == 1, 40, "the escaping redirect dead-lettered")
        [escaped] = read_all(kafka.bootstrap, "restconsumer.deadletter.escapes", expect=1)
        assert b"not an allowed host" in dict(escaped.headers())["restconsumer.reason"]
        [stayed] = read_all(kafka.bootstrap, "restconsumer.deadletter.stays", expect=1)
        assert dict(stayed.headers())["restconsumer.status"] == b"307"
        paths = [r.path for r in sink.snapshot()]
        assert paths.count("/landed/r1") == 1  # only the job that follows, to an allowed host
        assert "/landed/x" not in paths
    finally:
        sink.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A private CA and a certificate for localhost it signed."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_sink(pki: PKI) -> Iterator[Sink]:
    """An HTTPS endpoint whose certificate only the test CA vouches for."""
    sink = Sink(tls=(pki.cert_file, pki.key_file)).start()
    yield sink
    sink.stop()


def test_https_is_verified_and_a_ca_can_be_given(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], tls_sink: Sink,
        pki: PKI) -> None:
    """Refused without the CA; works with the job's ca_cert, and with --ca-file."""
    name = topic(1)
    service = services()
    once = {"max_attempts": 2, "initial_wait": 0.1}
    plain = job("untrusting", "ops", f"{tls_sink.url}/plain/{{id}}", topic=name, retry=once)
    with_ca = job("trusting", "ops", f"{tls_sink.url}/trusted/{{id}}", topic=name, ca_cert=pki.ca_pem)
    assert service.request("POST", "/job/untrusting", plain).status == 201
    assert service.request("POST", "/job/trusting", with_ca).status == 201
    assert service.request("POST", "/job/bad-ca", job("bad-ca", "ops", ca_cert="not a cert")).status == 400
    produce(kafka.bootstrap, name, [b'{"id": "t1"}'])
    [letter] = read_all(kafka.bootstrap, "restconsumer.deadletter.untrusting", expect=1, timeout=40)
    reason = dict(letter.headers())["restconsumer.reason"].lower()
    assert b"certificate" in reason or b"ssl" in reason or b"tls" in reason, reason
    wait_for(lambda: [r.path for r in tls_sink.snapshot()] == ["/trusted/t1"], 30, "the trusted job")

    service.stop()
    second = services("--ca-file", str(pki.ca_file))
    assert second.request("POST", "/job/untrusting", {**plain, "url": f"{tls_sink.url}/again/{{id}}"}
                          ).status == 200
    produce(kafka.bootstrap, name, [b'{"id": "t2"}'])
    wait_for(lambda: "/again/t2" in [r.path for r in tls_sink.snapshot()], 40, "trusted with --ca-file")


# -- the OpenAPI description ---------------------------------------------------------------

SPEC = json.loads((REPO / "restconsumer" / "openapi.json").read_text())


def _schema(ref: dict[str, Any]) -> dict[str, Any]:
    """A response schema with its $refs resolved and OpenAPI's nullable made JSON Schema."""
    def fix(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                target: Any = SPEC
                for part in node["$ref"].lstrip("#/").split("/"):
                    target = target[part]
                return fix(target)
            out = {k: fix(v) for k, v in node.items() if k != "nullable"}
            if node.get("nullable"):
                return {"anyOf": [out, {"type": "null"}]}
            return out
        if isinstance(node, list):
            return [fix(v) for v in node]
        return node

    return fix(ref)


def conforms(method: str, template: str, status: int, body: Any) -> None:
    """Fail unless ``body`` is what the description promises for that route and status."""
    operation = SPEC["paths"][template][method.lower()]
    response = operation["responses"][str(status)]
    if "$ref" in response:
        response = _schema(response)
    schema = _schema(response["content"]["application/json"]["schema"])
    jsonschema.Draft4Validator(schema).validate(body)


def test_openapi_describes_every_route_and_only_those(services: Start) -> None:
    """The description's operations are exactly the API's routes, and it is served without auth."""
    served = services().request("GET", "/openapi.json", token=None)
    assert served.status == 200
    assert served.json == SPEC
    routes = set()
    for rule in API.app.url_map.iter_rules():
        if rule.rule.startswith("/embedded/"):
            continue  # the --embedded demo endpoint is not part of the API
        path = rule.rule.replace("<job_id>", "{id}").replace("<owner>", "{owner}")
        path = path.replace("<offset>", "{offset}")
        routes |= {(path, m.lower()) for m in rule.methods - {"HEAD", "OPTIONS"}}
    described = {(p, m) for p, ops in SPEC["paths"].items() for m in ops if m != "parameters"}
    assert routes == described


def test_real_answers_conform_to_the_description(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    """Answers of every route, good and bad, match their documented schemas."""
    name = topic(1)
    s = services()
    conforms("GET", "/health", 200, s.request("GET", "/health", token=None).json)
    full = job("doc", "ops", topic=name, basic_auth={"user": "u", "pw": "p"}, token_type="Token",
               query_params=["id"], json_body=["id"], constant={"a": 1}, ratelimit=0.5,
               headers={"X-A": "b"}, retry={"max_attempts": 2}, timeout=5, follow_redirects=True)
    del full["token_type"]
    checks = [
        ("POST", "/job/{id}", "/job/doc", full),
        ("POST", "/job/{id}", "/job/doc", full),
        ("POST", "/job/{id}", "/job/doc", {"id": "doc"}),
        ("GET", "/job/{id}", "/job/doc", None),
        ("GET", "/job/{id}", "/job/none", None),
        ("GET", "/jobs", "/jobs", None),
        ("GET", "/jobs/{owner}", "/jobs/ops", None),
        ("POST", "/job/{id}/stop", "/job/doc/stop", None),
        ("POST", "/job/{id}/start", "/job/doc/start", None),
        ("POST", "/job/{id}/set_offset/{offset}", "/job/doc/set_offset/beginning", None),
        ("POST", "/job/{id}/set_offset/{offset}", "/job/doc/set_offset/later", None),
        ("GET", "/job/{id}/status", "/job/doc/status", None),
        ("DELETE", "/job/{id}", "/job/doc", None),
        ("DELETE", "/job/{id}", "/job/doc", None),
    ]
    seen = set()
    for method, template, path, body in checks:
        answer = s.request(method, path, body, timeout=60)
        conforms(method, template, answer.status, answer.json)
        seen.add((template, answer.status))
    assert {("/job/{id}", 201), ("/job/{id}", 200), ("/job/{id}", 400), ("/job/{id}", 404)} <= seen
    unauthorized = s.request("GET", "/jobs", token=None)
    conforms("GET", "/jobs", 401, unauthorized.json)


def test_schemathesis_finds_no_server_error_and_no_schema_break(
        services: Start, tmp_path: Path) -> None:
    """schemathesis, bounded in time, against the running service with a valid token."""
    service = services()
    binary = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    report = subprocess.run(
        [binary, "run", f"{service.url}/openapi.json", "--url", service.url,
         "-H", f"Authorization: Bearer {service.token}",
         "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                     "response_schema_conformance",
         "--phases", "examples,coverage,fuzzing", "--max-examples", "25", "--max-time", "90",
         "--request-timeout", "60", "--workers", "1", "--suppress-health-check", "all",
         "--no-color"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path)
    output = report.stdout + report.stderr
    print(output[-3000:])
    assert report.returncode == 0, output[-6000:]
    assert "passed" in output.lower()
    log = service.log()
    assert "Traceback" not in log and "internal error" not in log
