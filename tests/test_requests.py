"""More from messages and requests (SPEC §12) through the real service: real Kafka, real Redis,
a service process and loopback endpoints."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from restconsumer import __version__
from tests.infra.confluent import avro_frame
from tests.infra.groups import finished
from tests.infra.kafka import KafkaBroker
from tests.infra.kafka_io import committed, produce, read_all
from tests.infra.ports import wait_for
from tests.infra.service import ServiceProcess
from tests.infra.sink import Received, Sink

Start = Callable[..., ServiceProcess]
OAUTH_CLIENT_SECRET = "cs-integration-oauth-5"
REGISTRY_PASSWORD = "sr-integration-pw-7"
WEBHOOK_SECRET = "whsec_" + "c2lnbmluZy1zZWNyZXQtb2YtdGhlLWludGVncmF0aW9uLXRlc3Q="


def job(name: str, topic: str, url: str, **more: Any) -> dict[str, Any]:
    return {"id": name, "owner": "ops", "type": "POST", "topic": topic,
            "datamap": {"id": "$.msg.id"}, "url": f"{url}/{name}/{{id}}", "json_body": ["id"],
            **more}


def counters(service: ServiceProcess, job_id: str) -> dict[str, int]:
    return service.request("GET", f"/job/{job_id}/status").json["counters"]


def test_user_agent_and_the_kafka_messages_headers(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink) -> None:
    """Every request says who sends it; ``$.meta.headers`` holds the Kafka message's headers."""
    name = topic()
    service = services()
    definition = job("ua", name, sink.url, datamap={"id": "$.msg.id", "trace": "$.meta.headers.trace"},
                     json_body=["id", "trace"])
    assert service.request("POST", "/job/ua", definition).status == 201
    produce(kafka.bootstrap, name, [json.dumps({"id": f"m{i}"}).encode() for i in range(3)],
            headers=[("trace", b"trace-42")])
    wait_for(lambda: sink.count() >= 3, 40, "3 requests")
    for got in sink.snapshot():
        assert got.headers["user-agent"] == f"restconsumer/{__version__}"
        assert json.loads(got.body)["trace"] == "trace-42"


def test_start_from_latest_skips_what_the_topic_held_before_the_job(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink) -> None:
    name = topic(2)
    produce(kafka.bootstrap, name, [json.dumps({"id": f"old{i}"}).encode() for i in range(20)],
            partitions=2)
    service = services()
    assert service.request("POST", "/job/late", job("late", name, sink.url,
                                                    start_from="latest")).status == 201
    # The group starts at the end once it has its partitions: keep producing until one arrives.
    sent = 0

    def started() -> bool:
        nonlocal sent
        produce(kafka.bootstrap, name, [json.dumps({"id": f"new{sent}"}).encode(),
                                        json.dumps({"id": f"new{sent + 1}"}).encode()], partitions=2)
        sent += 2
        return sink.count() > 0

    wait_for(started, 60, "a new message delivered", every=0.5)
    # One last message in each partition: whatever of a partition is sent comes before it.
    produce(kafka.bootstrap, name, [json.dumps({"id": f"last{p}"}).encode() for p in range(2)], partitions=2)
    wait_for(lambda: {"/late/last0", "/late/last1"} <= {r.path for r in sink.snapshot()}, 30,
             "the last message of each partition")
    paths = [r.path for r in sink.snapshot()]
    assert not [p for p in paths if "/old" in p], paths
    # The default still starts from the beginning.
    assert service.request("POST", "/job/early", job("early", name, sink.url)).status == 201
    wait_for(lambda: sum("/early/old" in r.path for r in sink.snapshot()) >= 20, 40, "the old messages")


def test_success_status_counts_a_409_as_delivered(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    def respond(got: Received) -> tuple[int, dict[str, str], bytes]:
        if "/dup" in got.path:
            return 409, {}, b"exists"
        if "/bad" in got.path:
            return 404, {}, b"no such thing"
        return 200, {}, b"ok"

    sink = Sink(respond).start()
    try:
        name = topic()
        service = services()
        assert service.request("POST", "/job/created", job("created", name, sink.url,
                                                           success_status=[409])).status == 201
        ids = ["dup1", "ok1", "bad1", "dup2", "ok2"]
        produce(kafka.bootstrap, name, [json.dumps({"id": i}).encode() for i in ids])
        wait_for(lambda: counters(service, "created").get("delivered", 0) >= 4, 40, "4 delivered")
        wait_for(lambda: counters(service, "created").get("dead_lettered", 0) == 1, 20, "1 dead letter")
        [letter] = read_all(kafka.bootstrap, "restconsumer.deadletter.created", expect=1)
        assert json.loads(letter.value()) == {"id": "bad1"}
        # All five finished (committed): no 409 waits to be retried.
        wait_for(lambda: finished(kafka.bootstrap, "restconsumer.created", name, 1), 20, "all committed")
        assert counters(service, "created")["delivered"] == 4
        assert len(sink.snapshot()) == 5, "a 409 was retried"
    finally:
        sink.stop()


def test_templated_headers_reach_the_endpoint_and_a_line_break_is_dead_lettered(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink) -> None:
    name = topic()
    service = services()
    definition = job("tmpl", name, sink.url,
                     datamap={"id": "$.msg.id", "tenant": "$.msg.tenant", "trace": "$.meta.headers.trace"},
                     headers={"X-Tenant": "{tenant}", "X-Trace": "t-{trace}", "X-Static": "s"})
    assert service.request("POST", "/job/tmpl", definition).status == 201
    produce(kafka.bootstrap, name, [json.dumps({"id": "a", "tenant": "acme"}).encode(),
                                    json.dumps({"id": "b", "tenant": "evil\r\nX-Injected: yes"}).encode(),
                                    json.dumps({"id": "c", "tenant": "zeta"}).encode()],
            headers=[("trace", b"42")])
    wait_for(lambda: sink.count() >= 2, 40, "2 requests")
    [letter] = read_all(kafka.bootstrap, "restconsumer.deadletter.tmpl", expect=1)
    reason = dict(letter.headers())["restconsumer.reason"].decode()
    assert "control character" in reason and "X-Tenant" in reason
    wait_for(lambda: finished(kafka.bootstrap, "restconsumer.tmpl", name, 1), 20, "all three committed")
    received = sink.snapshot()
    assert [(r.path, r.headers["x-tenant"], r.headers["x-trace"], r.headers["x-static"])
            for r in received] == [("/tmpl/a", "acme", "t-42", "s"), ("/tmpl/c", "zeta", "t-42", "s")]
    assert not any("x-injected" in r.headers for r in received)


def test_the_idempotency_key_is_the_same_across_retries_and_a_redelivery_after_sigkill(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    release = threading.Event()
    seen: dict[str, int] = {}

    def respond(got: Received) -> tuple[int, dict[str, str], bytes]:
        seen[got.path] = seen.get(got.path, 0) + 1
        if got.path.endswith("/retried") and seen[got.path] <= 2:
            return 503, {}, b"busy"
        if got.path.endswith("/held") and seen[got.path] == 1:
            release.wait(60)  # the service is killed while this request is under way
        return 200, {}, b"ok"

    sink = Sink(respond).start()
    try:
        name = topic()
        service = services()
        definition = job("idem", name, sink.url, idempotency_key=True,
                         retry={"max_attempts": 5, "initial_wait": 0.2, "max_wait": 0.5})
        assert service.request("POST", "/job/idem", definition).status == 201
        produce(kafka.bootstrap, name, [json.dumps({"id": "retried"}).encode(),
                                        json.dumps({"id": "held"}).encode()])
        wait_for(lambda: seen.get("/idem/held", 0) >= 1, 40, "the held request")
        service.stop(signal.SIGKILL)
        release.set()
        services()
        wait_for(lambda: seen.get("/idem/held", 0) >= 2, 60, "the redelivery after SIGKILL")
        keys: dict[str, set[str]] = {}
        for got in sink.snapshot():
            keys.setdefault(got.path, set()).add(got.headers["idempotency-key"])
        assert keys["/idem/retried"] == {f"idem:{name}:0:0:0"}
        assert keys["/idem/held"] == {f"idem:{name}:0:1:0"}
        assert seen["/idem/retried"] >= 3
    finally:
        release.set()
        sink.stop()


def test_filtered_records_are_not_sent_but_committed_and_counted(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    name = topic()
    service = services()
    definition = job("filt", name, sink.url, filter="$[?(@.msg.status == 'approved')]")
    assert service.request("POST", "/job/filt", definition).status == 201
    statuses = ["approved" if i % 3 == 0 else "draft" for i in range(30)]
    produce(kafka.bootstrap, name, [json.dumps({"id": f"m{i}", "status": s}).encode()
                                    for i, s in enumerate(statuses)]
            + [json.dumps({"id": "last", "status": "draft"}).encode()])
    wait_for(lambda: counters(service, "filt").get("filtered", 0) == 21, 40, "21 filtered")
    wait_for(lambda: committed(kafka.bootstrap, "restconsumer.filt", name, 1) == [31], 30,
             "every offset committed, the filtered last one too")
    assert sorted(r.path for r in sink.snapshot()) == sorted(f"/filt/m{i}" for i in range(0, 30, 3))
    assert counters(service, "filt")["delivered"] == 10
    text = service.request("GET", "/metrics").body.decode()
    found = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for family in text_string_to_metric_families(text) for s in family.samples}
    assert found[("restconsumer_messages_total", (("job", "filt"), ("outcome", "filtered")))] == 21


def standard_webhooks_valid(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """A receiver's check by the ``standardwebhooks`` package (the specification's own
    library): signature, headers, and a timestamp within five minutes of the wall clock."""
    try:
        Webhook(secret).verify(body, headers, json_parse=False)
    except WebhookVerificationError:
        return False
    return True


def test_signed_requests_verify_with_an_independent_standard_webhooks_check(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink) -> None:
    name = topic()
    service = services()
    definition = job("signed", name, sink.url, idempotency_key=True,
                     signing={"secret": WEBHOOK_SECRET, "scheme": "standard-webhooks"})
    assert service.request("POST", "/job/signed", definition).status == 201
    shown = service.request("GET", "/job/signed").json
    assert shown["signing"] == {"secret": "***", "scheme": "standard-webhooks"}
    produce(kafka.bootstrap, name, [json.dumps({"id": f"s{i}"}).encode() for i in range(5)])
    wait_for(lambda: sink.count() >= 5, 40, "5 signed requests")
    for got in sink.snapshot():
        assert standard_webhooks_valid(WEBHOOK_SECRET, got.headers, got.body), got.headers
        assert got.headers["webhook-id"] == got.headers["idempotency-key"]
        assert not standard_webhooks_valid(WEBHOOK_SECRET, got.headers, got.body + b" ")
    # Posted back with *** for the same URL, the stored secret is kept.
    assert service.request("POST", "/job/signed", shown).status == 200


def test_the_result_topic_holds_one_result_per_record(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    def respond(got: Received) -> tuple[int, dict[str, str], bytes]:
        if "/bad" in got.path:
            return 422, {}, b"rejected"
        return 201, {}, json.dumps({"created": got.path}).encode()

    sink = Sink(respond).start()
    try:
        name = topic()
        results = topic()
        service = services()
        definition = job("res", name, sink.url, result_topic=results,
                         filter="$[?(@.msg.skip != true)]")
        assert service.request("POST", "/job/res", definition).status == 201
        ids = ["r0", "bad1", "r2", "skip3", "r4"]
        produce(kafka.bootstrap, name, [json.dumps({"id": i, "skip": i.startswith("skip")}).encode()
                                        for i in ids], key=b"the-key")
        found = read_all(kafka.bootstrap, results, expect=4, timeout=40)
        assert len(found) == 4
        by_offset = {}
        for message in found:
            assert message.key() == b"the-key"
            result = json.loads(message.value())
            by_offset[result["source"]["offset"]] = result
        assert sorted(by_offset) == [0, 1, 2, 4], "a filtered record has no result"
        assert by_offset[0]["status"] == 201 and by_offset[0]["outcome"] == "delivered"
        assert json.loads(by_offset[0]["response"]["body"]) == {"created": "/res/r0"}
        assert by_offset[0]["job"] == "res" and by_offset[0]["source"]["topic"] == name
        assert isinstance(by_offset[0]["duration_ms"], (int, float))
        assert (by_offset[1]["status"], by_offset[1]["outcome"]) == (422, "dead_lettered")
        assert by_offset[1]["response"] == {"body": "rejected", "encoding": "text"}
        wait_for(lambda: committed(kafka.bootstrap, "restconsumer.res", name, 1) == [5], 30,
                 "every offset committed")
        assert counters(service, "res")["filtered"] == 1
    finally:
        sink.stop()


def test_oauth2_one_token_for_many_requests_and_a_new_one_after_a_401(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    from urllib.parse import parse_qs

    current = {"token": "tok-1"}
    valid = {"tok-1"}
    forms: list[dict[str, list[str]]] = []

    def token_endpoint(got: Received) -> tuple[int, dict[str, str], bytes]:
        forms.append(parse_qs(got.body.decode()))
        return 200, {"Content-Type": "application/json"}, json.dumps(
            {"access_token": current["token"], "token_type": "Bearer", "expires_in": 3600}).encode()

    def endpoint(got: Received) -> tuple[int, dict[str, str], bytes]:
        token = got.headers.get("authorization", "").removeprefix("Bearer ")
        return (200, {}, b"ok") if token in valid else (401, {}, b"expired")

    auth = Sink(token_endpoint).start()
    sink = Sink(endpoint).start()
    try:
        name = topic()
        service = services()
        definition = job("oauth", name, sink.url, oauth2={
            "token_url": f"{auth.url}/token", "client_id": "svc",
            "client_secret": OAUTH_CLIENT_SECRET, "scope": "people:write"})
        assert service.request("POST", "/job/oauth", definition).status == 201
        assert service.request("GET", "/job/oauth").json["oauth2"]["client_secret"] == "***"
        produce(kafka.bootstrap, name, [json.dumps({"id": f"a{i}"}).encode() for i in range(20)])
        wait_for(lambda: counters(service, "oauth").get("delivered", 0) >= 20, 40, "20 delivered")
        assert forms == [{"grant_type": ["client_credentials"], "client_id": ["svc"],
                          "client_secret": [OAUTH_CLIENT_SECRET], "scope": ["people:write"]}]
        assert {r.headers["authorization"] for r in sink.snapshot()} == {"Bearer tok-1"}
        # The endpoint now refuses the old token; the token endpoint gives a new one.
        current["token"] = "tok-2"
        valid.clear()
        valid.add("tok-2")
        produce(kafka.bootstrap, name, [json.dumps({"id": f"b{i}"}).encode() for i in range(10)])
        wait_for(lambda: counters(service, "oauth").get("delivered", 0) >= 30, 40, "30 delivered")
        assert len(forms) == 2, "a 401 must fetch exactly one new token"
        assert counters(service, "oauth")["dead_lettered"] == 0
        assert OAUTH_CLIENT_SECRET not in service.log()
    finally:
        auth.stop()
        sink.stop()


PERSON_SCHEMA = {"type": "record", "name": "Person", "namespace": "org.example",
                 "fields": [{"name": "id", "type": "string"}, {"name": "age", "type": "int"}]}
PLACE_SCHEMA = {"type": "record", "name": "Place",
                "fields": [{"name": "id", "type": "string"}, {"name": "city", "type": "string"}]}


def wire(schema_id: int, schema: dict[str, Any], record: dict[str, Any]) -> bytes:
    """``record`` as Confluent's AvroSerializer writes it under ``schema_id``."""
    return avro_frame(schema_id, schema, record)


class SchemaRegistryServer:
    """A loopback server answering the registry's documented ``GET /schemas/ids/{id}``; counts
    the requests per path; answers 503 while ``down``."""

    def __init__(self, schemas: dict[int, dict[str, Any]]) -> None:
        self.schemas = schemas
        self.down = False
        self.server = Sink(self.respond)

    def respond(self, got: Received) -> tuple[int, dict[str, str], bytes]:
        headers = {"Content-Type": "application/vnd.schemaregistry.v1+json"}
        if self.down:
            return 503, headers, b'{"error_code": 50003, "message": "registry is down"}'
        if got.headers.get("accept") != "application/vnd.schemaregistry.v1+json" \
                or not got.path.startswith("/schemas/ids/"):
            return 400, headers, b'{"error_code": 400, "message": "unexpected request"}'
        ident = int(got.path.rsplit("/", 1)[1])
        if ident not in self.schemas:
            return 404, headers, json.dumps({"error_code": 40403,
                                             "message": f"Schema {ident} not found"}).encode()
        return 200, headers, json.dumps({"schema": json.dumps(self.schemas[ident])}).encode()

    def fetches(self) -> dict[str, int]:
        seen: dict[str, int] = {}
        for got in self.server.snapshot():
            seen[got.path] = seen.get(got.path, 0) + 1
        return seen


def test_schema_registry_wire_format_decodes_each_schema_fetched_once_and_an_unknown_id_dead_letters(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink) -> None:
    import base64

    registry = SchemaRegistryServer({1: PERSON_SCHEMA, 2: PLACE_SCHEMA})
    registry.server.start()
    try:
        name = topic()
        service = services("--schema-registry", registry.server.url,
                           "--schema-registry-option", f"basic.auth.user.info=svc:{REGISTRY_PASSWORD}")
        definition = job("sr", name, sink.url, datamap={"id": "$.msg.id", "kind": "$.schema.name"},
                         json_body=["id", "kind"])
        assert service.request("POST", "/job/sr", definition).status == 201
        values = []
        for i in range(8):
            if i % 2:
                values.append(wire(2, PLACE_SCHEMA, {"id": f"pl{i}", "city": "Oslo"}))
            else:
                values.append(wire(1, PERSON_SCHEMA, {"id": f"pe{i}", "age": i}))
        values.insert(3, wire(77, PLACE_SCHEMA, {"id": "lost", "city": "Nowhere"}))
        produce(kafka.bootstrap, name, values)
        wait_for(lambda: counters(service, "sr").get("delivered", 0) >= 8, 60, "8 delivered")
        wait_for(lambda: counters(service, "sr").get("dead_lettered", 0) == 1, 30, "1 dead letter")
        bodies = sorted((json.loads(r.body)["id"], json.loads(r.body)["kind"]) for r in sink.snapshot())
        assert bodies == sorted([(f"pe{i}", "Person") for i in range(0, 8, 2)]
                                + [(f"pl{i}", "Place") for i in range(1, 8, 2)])
        [letter] = read_all(kafka.bootstrap, "restconsumer.deadletter.sr", expect=1)
        reason = dict(letter.headers())["restconsumer.reason"].decode()
        assert "schema id 77 is unknown to the schema registry" in reason
        assert registry.fetches() == {"/schemas/ids/1": 1, "/schemas/ids/2": 1, "/schemas/ids/77": 1}
        # The dry run decodes with the same cache: nothing fetched again.
        framed = base64.b64encode(wire(1, PERSON_SCHEMA, {"id": "dry", "age": 1})).decode()
        answer = service.request("POST", "/job/sr/preview", {"messages": [{"base64": framed}]})
        assert answer.status == 200, answer
        [result] = answer.json["results"]
        assert json.loads(result["request"]["body"]) == {"id": "dry", "kind": "Person"}
        assert registry.fetches()["/schemas/ids/1"] == 1
        assert counters(service, "sr")["delivered"] == 8
        expected = "Basic " + base64.b64encode(f"svc:{REGISTRY_PASSWORD}".encode()).decode()
        assert {r.headers.get("authorization") for r in registry.server.snapshot()} == {expected}
        assert REGISTRY_PASSWORD not in service.log()
    finally:
        registry.server.stop()


def test_a_schema_registry_that_is_down_holds_the_job_on_its_circuit_until_it_answers(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink) -> None:
    import base64

    registry = SchemaRegistryServer({1: PERSON_SCHEMA})
    registry.down = True
    registry.server.start()
    try:
        name = topic()
        service = services("--schema-registry", registry.server.url)
        definition = job("srdown", name, sink.url, datamap={"id": "$.msg.id", "kind": "$.schema.name"},
                         json_body=["id", "kind"],
                         retry={"max_attempts": 3, "initial_wait": 0.2, "max_wait": 1})
        assert service.request("POST", "/job/srdown", definition).status == 201
        produce(kafka.bootstrap, name, [wire(1, PERSON_SCHEMA, {"id": f"p{i}", "age": i}) for i in range(5)])

        def circuit() -> dict[str, Any]:
            return service.request("GET", "/job/srdown/status").json["circuit"]

        wait_for(lambda: circuit()["state"] == "open", 60, "the circuit open")
        assert "schema registry" in circuit()["reason"] and "503" in circuit()["reason"]
        wait_for(lambda: registry.fetches().get("/schemas/ids/1", 0) >= 3, 30, "the registry asked again")
        # The dry run answers, with the outage as that record's error.
        framed = base64.b64encode(wire(1, PERSON_SCHEMA, {"id": "dry", "age": 1})).decode()
        answer = service.request("POST", "/job/srdown/preview", {"messages": [{"base64": framed}]})
        assert answer.status == 200, answer
        [result] = answer.json["results"]
        assert result["error"].startswith("schema registry unavailable:") and "503" in result["error"]
        assert sink.count() == 0
        assert counters(service, "srdown").get("dead_lettered", 0) == 0
        registry.down = False
        wait_for(lambda: counters(service, "srdown").get("delivered", 0) >= 5, 60, "5 delivered")
        wait_for(lambda: circuit()["state"] == "closed", 30, "the circuit closed")
        assert sorted(r.path for r in sink.snapshot()) == sorted(f"/srdown/p{i}" for i in range(5))
        assert counters(service, "srdown").get("dead_lettered", 0) == 0
    finally:
        registry.server.stop()
