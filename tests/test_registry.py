"""Confluent Schema Registry wire format (SPEC §12), in process: decoding, the schema cache,
the registry client (an injected fetch, and treq against a StubTreq resource), the options,
the dry run, and a running job whose messages wait for their schema. No socket, no sleep."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import fastavro
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import Request

from restconsumer.api.preview import preview
from restconsumer.delivery.registry import (
    ACCEPT,
    RegistryUnavailable,
    SchemaCache,
    SchemaRegistry,
    call_now,
    parse_option,
)
from restconsumer.jobs.decode import (
    Record,
    SchemaNeeded,
    UndecodableMessage,
    UnknownSchema,
    WireSchema,
    decode,
    schema_id,
)
from restconsumer.jobs.model import validate
from restconsumer.jobs.work import Incoming, prepare
from tests.infra.confluent import avro_frame, json_frame
from tests.test_runner import Harness, T, make_job

PERSON = {"type": "record", "name": "Person", "namespace": "org.example",
          "fields": [{"name": "id", "type": "string"}, {"name": "age", "type": "int"}]}
PLACE = {"type": "record", "name": "Place", "fields": [{"name": "id", "type": "string"},
                                                         {"name": "city", "type": "string"}]}
SECRET = "s3cret-registry-pw"


def framed(schema_id: int, schema: dict[str, Any], record: dict[str, Any]) -> bytes:
    """``record`` as Confluent's AvroSerializer writes it under ``schema_id``."""
    return avro_frame(schema_id, schema, record)


def cache_with(*entries: tuple[int, WireSchema | UnknownSchema]) -> SchemaCache:
    cache = SchemaCache()
    for ident, entry in entries:
        cache.put(ident, entry)
    return cache


def avro_schema(schema: dict[str, Any]) -> WireSchema:
    return WireSchema("AVRO", schema, fastavro.parse_schema(schema))


# -- decoding ------------------------------------------------------------------------------

def test_a_wire_format_value_decodes_with_its_cached_writer_schema() -> None:
    cache = cache_with((7, avro_schema(PERSON)))
    value = framed(7, PERSON, {"id": "p1", "age": 42})
    assert schema_id(value) == 7
    assert decode(value, cache) == [Record(PERSON, {"id": "p1", "age": 42})]


def test_an_id_known_to_be_unknown_is_undecodable_and_names_the_id() -> None:
    cache = cache_with((9, UnknownSchema("the registry answered 404 (Schema 9 not found)")))
    with pytest.raises(UndecodableMessage, match=r"schema id 9 is unknown to the schema registry: .*404"):
        decode(framed(9, PERSON, {"id": "x", "age": 1}), cache)


def test_an_id_not_fetched_yet_asks_for_its_schema() -> None:
    with pytest.raises(SchemaNeeded) as caught:
        decode(framed(3, PERSON, {"id": "x", "age": 1}), SchemaCache())
    assert caught.value.schema_id == 3
    assert not isinstance(caught.value, UndecodableMessage)


def test_a_corrupt_payload_is_undecodable() -> None:
    cache = cache_with((7, avro_schema(PERSON)))
    good = framed(7, PERSON, {"id": "p1", "age": 42})
    with pytest.raises(UndecodableMessage, match="corrupt Avro payload for schema id 7"):
        decode(good[:7], cache)  # cut inside the string
    with pytest.raises(UndecodableMessage, match="2 bytes left after the record"):
        decode(good + b"zz", cache)


def test_a_json_schema_payload_is_json() -> None:
    schema = {"type": "object", "title": "Thing"}
    cache = cache_with((5, WireSchema("JSON", schema)))
    value = json_frame(5, schema, {"id": "t1"})
    assert decode(value, cache) == [Record(schema, {"id": "t1"})]
    with pytest.raises(UndecodableMessage, match="corrupt JSON payload for schema id 5"):
        decode(value[:-1], cache)


def test_without_a_registry_framing_is_named_and_json_and_text_are_unchanged() -> None:
    with pytest.raises(UndecodableMessage, match=r"Schema Registry framing .*schema id 7.*--schema-registry"):
        decode(framed(7, PERSON, {"id": "\u00e9", "age": -1}) + b"\xff")
    assert decode(b'{"id": 1}') == [Record(None, {"id": 1})]
    assert decode(b"\x00\x00\x00\x00\x01text") == [Record(None, "\x00\x00\x00\x00\x01text")]
    # With a registry, plain JSON and text are still what they were.
    assert decode(b'{"id": 1}', SchemaCache()) == [Record(None, {"id": 1})]
    assert decode(b"hello", SchemaCache()) == [Record(None, "hello")]


def test_prepare_marks_a_message_waiting_for_its_schema_and_never_raises() -> None:
    builder = make_job()
    from restconsumer.jobs.mapping import RequestBuilder
    incoming = Incoming(T, 0, 0, None, framed(4, PERSON, {"id": "p", "age": 1}), [], None)
    waiting = prepare(RequestBuilder(builder), incoming, None, SchemaCache())
    assert waiting.schema_id == 4 and waiting.records == [] and waiting.error is None
    assert waiting.size == incoming.size()
    ready = prepare(RequestBuilder(builder), incoming, None, cache_with((4, avro_schema(PERSON))))
    assert ready.schema_id is None and ready.records[0].request is not None
    assert ready.records[0].request.url == b"http://sink.test/p/p"


# -- the cache -----------------------------------------------------------------------------

def test_an_unknown_id_is_asked_again_after_a_minute_and_a_known_one_is_kept() -> None:
    now = [100.0]
    cache = SchemaCache(now=lambda: now[0])
    cache.put(1, UnknownSchema("404"))
    cache.put(2, avro_schema(PERSON))
    now[0] += 59.9
    assert cache.get(1) == UnknownSchema("404")
    now[0] += 0.2
    assert cache.get(1) is None
    now[0] += 10_000
    assert isinstance(cache.get(2), WireSchema)
    cache.put(1, avro_schema(PLACE))
    assert isinstance(cache.get(1), WireSchema)


# -- the registry client -------------------------------------------------------------------

class FakeRegistry:
    """The registry's answers to each GET, given by the test (each a Deferred it may fire)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[bytes, list[bytes]], Deferred[tuple[int, bytes]]]] = []

    def __call__(self, url: str, headers: dict[bytes, list[bytes]],
                 timeout: float) -> Deferred[tuple[int, bytes]]:
        d: Deferred[tuple[int, bytes]] = Deferred()
        self.calls.append((url, headers, d))
        return d

    def open(self) -> list[Deferred[tuple[int, bytes]]]:
        return [d for _, _, d in self.calls if not d.called]

    def answer(self, status: int, body: Any) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.open()[0].callback((status, raw))

    def schema(self, schema: Any, **more: Any) -> None:
        self.answer(200, {"schema": json.dumps(schema), **more})


def registry(fake: FakeRegistry | None = None, clock: Clock | None = None,
             **options: str) -> tuple[SchemaRegistry, FakeRegistry, Clock]:
    fake = fake or FakeRegistry()
    clock = clock or Clock()
    return (SchemaRegistry(clock, "http://registry.test:8081/", options, fetch=fake, clock=clock,
                           run=call_now), fake, clock)


def results(ds: list[Deferred[Any]]) -> list[Any]:
    out: list[Any] = []
    for d in ds:
        d.addBoth(out.append)
    return out


def test_one_fetch_serves_every_caller_and_the_schema_is_cached() -> None:
    reg, fake, _ = registry()
    got = results([reg.fetch(7), reg.fetch(7), reg.fetch(8)])
    assert [url for url, _, _ in fake.calls] == ["http://registry.test:8081/schemas/ids/7",
                                                 "http://registry.test:8081/schemas/ids/8"]
    assert fake.calls[0][1][b"Accept"] == [ACCEPT]
    assert b"Authorization" not in fake.calls[0][1]
    fake.schema(PERSON)
    fake.schema(PLACE)
    assert [g.writer["name"] for g in got] == ["Person", "Person", "Place"]
    assert isinstance(reg.cache.get(7), WireSchema)
    assert isinstance(results([reg.fetch(7)])[0], WireSchema)
    assert len(fake.calls) == 2 and reg.fetched == 2


def test_a_404_with_the_registrys_code_is_an_unknown_id_remembered_for_a_while() -> None:
    reg, fake, _ = registry()
    got = results([reg.fetch(9)])
    fake.answer(404, {"error_code": 40403, "message": "Schema 9 not found"})
    assert got == [UnknownSchema("the registry answered 404 (Schema 9 not found)")]
    assert reg.cache.get(9) == got[0]
    results([reg.fetch(9)])
    assert len(fake.calls) == 1


@pytest.mark.parametrize(("answer", "reason"), [
    ((503, b"busy"), "answered HTTP 503 to GET /schemas/ids/1: busy"),
    ((401, b'{"error_code": 40101}'), "answered HTTP 401"),
    ((404, b"<html>no such page</html>"), "answered HTTP 404"),
    ((200, b"not json"), "no JSON object"),
])
def test_anything_but_a_schema_or_the_registrys_404_is_an_outage(answer: tuple[int, bytes],
                                                                 reason: str) -> None:
    reg, fake, _ = registry()
    got = results([reg.fetch(1), reg.fetch(1)])
    fake.open()[0].callback(answer)
    assert [g.type for g in got] == [RegistryUnavailable, RegistryUnavailable]
    assert reason in got[0].getErrorMessage()
    assert reg.cache.get(1) is None
    results([reg.fetch(1)])
    assert len(fake.calls) == 2, "an outage is not cached: the next caller asks again"


def test_a_refused_connection_and_no_answer_in_time_are_outages() -> None:
    reg, fake, clock = registry()
    refused = results([reg.fetch(1)])
    slow = results([reg.fetch(2)])
    fake.calls[0][2].errback(ConnectionRefusedError())
    assert refused[0].check(RegistryUnavailable)
    assert "cannot reach the schema registry: ConnectionRefusedError" in refused[0].getErrorMessage()
    clock.advance(9.9)
    assert slow == []
    clock.advance(0.1)
    assert slow[0].check(RegistryUnavailable)
    assert "did not answer within 10 s" in slow[0].getErrorMessage()
    assert fake.calls[1][2].called, "the request that timed out is cancelled"


def test_protobuf_is_unsupported_json_is_decoded_and_a_broken_schema_is_unusable() -> None:
    reg, fake, _ = registry()
    got = results([reg.fetch(1), reg.fetch(2), reg.fetch(3)])
    fake.answer(200, {"schemaType": "PROTOBUF", "schema": "syntax = \"proto3\";"})
    fake.answer(200, {"schemaType": "JSON", "schema": json.dumps({"type": "object"})})
    fake.schema({"type": "record", "name": "Bad", "fields": [{"name": "x", "type": "nosuchtype"}]})
    assert got[0] == UnknownSchema("unsupported schema type PROTOBUF (Avro and JSON are)")
    assert got[1] == WireSchema("JSON", {"type": "object"})
    assert isinstance(got[2], UnknownSchema) and "not a valid Avro schema" in got[2].reason


def test_references_to_other_subjects_are_fetched_and_parsed_first() -> None:
    reg, fake, _ = registry()
    address = {"type": "record", "name": "Address", "namespace": "org.example",
               "fields": [{"name": "city", "type": "string"}]}
    person = {"type": "record", "name": "Person", "namespace": "org.example",
              "fields": [{"name": "id", "type": "string"}, {"name": "home", "type": "org.example.Address"}]}
    got = results([reg.fetch(11)])
    fake.schema(person, references=[{"name": "org.example.Address", "subject": "addr/value", "version": 2}])
    assert fake.calls[1][0] == "http://registry.test:8081/subjects/addr%2Fvalue/versions/2"
    fake.schema(address)
    assert isinstance(got[0], WireSchema)
    value = avro_frame(11, person, {"id": "p", "home": {"city": "Oslo"}},
                       [("org.example.Address", "addr/value", 2, address)])
    assert decode(value, reg.cache)[0].msg == {"id": "p", "home": {"city": "Oslo"}}
    # A reference that is gone makes the id unusable (a bad message), not an outage.
    got = results([reg.fetch(12)])
    fake.schema(person, references=[{"name": "org.example.Address", "subject": "gone", "version": 1}])
    fake.answer(404, {"error_code": 40401, "message": "Subject 'gone' not found."})
    assert isinstance(got[0], UnknownSchema) and "'gone' version 1 not found" in got[0].reason


def test_basic_and_bearer_auth_options() -> None:
    reg, fake, _ = registry(**{"basic.auth.user.info": f"svc:{SECRET}"})
    results([reg.fetch(1)])
    assert fake.calls[0][1][b"Authorization"] == [b"Basic " + base64.b64encode(f"svc:{SECRET}".encode())]
    reg, fake, _ = registry(**{"bearer.auth.token": "tok-1"})
    results([reg.fetch(1)])
    assert fake.calls[0][1][b"Authorization"] == [b"Bearer tok-1"]
    with pytest.raises(ValueError, match="do not go together"):
        registry(**{"bearer.auth.token": "t", "basic.auth.user.info": "a:b"})
    with pytest.raises(ValueError, match=r"unknown key 'schema\.registry\.ssl\.keystore'"):
        parse_option("schema.registry.ssl.keystore=x")
    with pytest.raises(ValueError) as caught:
        parse_option(f"{SECRET}")
    assert SECRET not in str(caught.value)


class RegistryResource(Resource):
    """The registry's documented ``GET /schemas/ids/{id}``, for treq through a StubTreq."""

    isLeaf = True

    def __init__(self, schemas: dict[int, dict[str, Any]]) -> None:
        super().__init__()
        self.schemas = schemas
        self.seen: list[tuple[bytes, bytes | None, bytes | None]] = []

    def render_GET(self, request: Request) -> bytes:
        self.seen.append((request.uri, request.getHeader(b"accept"), request.getHeader(b"authorization")))
        request.setHeader(b"Content-Type", ACCEPT)
        ident = int(request.uri.rsplit(b"/", 1)[1])
        if ident not in self.schemas:
            request.setResponseCode(404)
            return json.dumps({"error_code": 40403, "message": f"Schema {ident} not found"}).encode()
        return json.dumps({"schema": json.dumps(self.schemas[ident])}).encode()


def test_the_treq_client_against_a_registry_resource() -> None:
    from treq.testing import StubTreq

    resource = RegistryResource({1: PERSON})
    stub = StubTreq(resource)
    clock = Clock()
    reg = SchemaRegistry(clock, "http://registry.test/sr", {"bearer.auth.token": "tok"}, http=stub,
                         clock=clock, run=call_now)
    got = results([reg.fetch(1), reg.fetch(1), reg.fetch(2)])
    stub.flush()
    assert isinstance(got[0], WireSchema) and got[0] is got[1] and got[0].writer == PERSON
    assert got[2] == UnknownSchema("the registry answered 404 (Schema 2 not found)")
    assert sorted(resource.seen) == [(b"/sr/schemas/ids/1", ACCEPT, b"Bearer tok"),
                                     (b"/sr/schemas/ids/2", ACCEPT, b"Bearer tok")]


# -- options -------------------------------------------------------------------------------

@pytest.fixture
def no_registry_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    for name in ("RESTCONSUMER_SCHEMA_REGISTRY", "RESTCONSUMER_SCHEMA_REGISTRY_OPTIONS",
                 "RESTCONSUMER_KAFKA_OPTIONS", "RESTCONSUMER_JOBS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def parse(*args: str) -> Any:
    from restconsumer.tap import Options

    options = Options()
    options.parseOptions(list(args))
    return options


@pytest.mark.usefixtures("no_registry_environment")
def test_registry_options_from_the_command_line_and_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from twisted.python.usage import UsageError

    from restconsumer.ops.workers import worker_environment

    options = parse("--schema-registry", "https://sr.example/", "--schema-registry-option",
                    f"basic.auth.user.info=svc:{SECRET}")
    assert options["schema-registry"] == "https://sr.example"
    assert options["schema-registry-options"] == {"basic.auth.user.info": f"svc:{SECRET}"}
    env = worker_environment(options)
    assert env["RESTCONSUMER_SCHEMA_REGISTRY"] == "https://sr.example"
    monkeypatch.setenv("RESTCONSUMER_SCHEMA_REGISTRY", "http://other:8081")
    monkeypatch.setenv("RESTCONSUMER_SCHEMA_REGISTRY_OPTIONS", env["RESTCONSUMER_SCHEMA_REGISTRY_OPTIONS"])
    worker = parse()
    assert (worker["schema-registry"], worker["schema-registry-options"]) == (
        "http://other:8081", {"basic.auth.user.info": f"svc:{SECRET}"})
    monkeypatch.setenv("RESTCONSUMER_SCHEMA_REGISTRY_OPTIONS", "bearer.auth.token=t1")
    assert parse()["schema-registry-options"] == {"bearer.auth.token": "t1"}
    monkeypatch.delenv("RESTCONSUMER_SCHEMA_REGISTRY")
    monkeypatch.delenv("RESTCONSUMER_SCHEMA_REGISTRY_OPTIONS")
    assert parse()["schema-registry"] is None
    for args, problem in [
        (("--schema-registry", "ftp://sr.example"), "not an http:// or https:// URL"),
        (("--schema-registry", "sr.example:8081"), "not an http:// or https:// URL"),
        (("--schema-registry", f"http://u:{SECRET}@sr"), "basic.auth.user.info"),
        (("--schema-registry-option", "bearer.auth.token=t"), "needs --schema-registry"),
        (("--schema-registry", "http://sr", "--schema-registry-option", "ssl.truststore=x"),
         "unknown key 'ssl.truststore'"),
        (("--schema-registry", "http://sr", "--schema-registry-option", "basic.auth.user.info=nopw"),
         "USER:PASSWORD"),
    ]:
        with pytest.raises(UsageError, match=problem) as caught:
            parse(*args)
        assert SECRET not in str(caught.value)


# -- the dry run ---------------------------------------------------------------------------

def test_the_preview_decodes_wire_format_and_says_when_the_registry_is_down() -> None:
    job = validate({"id": "p", "owner": "o", "type": "POST", "topic": "people",
                    "datamap": {"id": "$.msg.id", "kind": "$.schema.name"},
                    "url": "https://crm.example/people/{id}", "json_body": ["kind"]})
    cache = cache_with((1, avro_schema(PERSON)), (2, UnknownSchema("the registry answered 404")))

    def b64(value: bytes) -> dict[str, str]:
        return {"base64": base64.b64encode(value).decode()}

    got = preview(job, [b64(framed(1, PERSON, {"id": "a", "age": 3})),
                        b64(framed(2, PLACE, {"id": "b", "city": "c"})),
                        b64(framed(3, PLACE, {"id": "c", "city": "c"}))], 0, cache,
                  {3: "the schema registry answered HTTP 503 to GET /schemas/ids/3: busy"})
    assert got[0]["request"]["url"] == "https://crm.example/people/a"
    assert json.loads(got[0]["request"]["body"]) == {"kind": "Person"}
    assert got[1] == {"message": 1, "record": 0,
                      "error": "schema id 2 is unknown to the schema registry: the registry answered 404"}
    assert got[2] == {"message": 2, "record": 0, "error": "schema registry unavailable: the schema "
                      "registry answered HTTP 503 to GET /schemas/ids/3: busy"}


# -- a running job -------------------------------------------------------------------------

class RegistryHarness(Harness):
    """A JobRunner with a registry whose answers the test gives."""

    def __init__(self, **more: Any) -> None:
        clock = Clock()
        self.fake = FakeRegistry()
        self.registry = SchemaRegistry(clock, "http://registry.test", fetch=self.fake,
                                       clock=clock, run=call_now)
        super().__init__(validate({
            "id": "j", "owner": "o", "type": "POST", "topic": T, "url": "http://sink.test/p/{id}",
            "datamap": {"id": "$.msg.id", "kind": "$.schema.name"}, "json_body": ["kind"],
            "retry": {"max_attempts": 3, "initial_wait": 1, "max_wait": 4}, **more}),
            clock=clock, registry=self.registry)
        self.runner.assigned([(T, 0), (T, 1)])
        self.reserved = self.runner.held_bytes

    def value(self, value: Any, *, partition: int = 0) -> Any:
        tp = (T, partition)
        offset = self.offsets.get(tp, 0)
        self.offsets[tp] = offset + 1
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        incoming = Incoming(T, partition, offset, None, raw, [], 1_700_000_000_000)
        # As the Kafka thread does it: with the cache as it is now.
        settings = self.runner.current.settings
        return prepare(settings.builder, incoming, settings.order, self.registry.cache)

    def deliver_all(self, paths: list[str]) -> None:
        for path in paths:
            [pending] = self.agent.open()
            assert pending.path == path
            pending.answer(200)


def person(ident: str) -> bytes:
    return framed(1, PERSON, {"id": ident, "age": 1})


def test_messages_wait_for_their_schema_and_go_on_in_order() -> None:
    h = RegistryHarness()
    h.arrive(h.value({"id": "a"}), h.value(person("b")), h.value({"id": "c"}))
    h.arrive(h.value({"id": "d"}))
    assert h.agent.requests == [], "nothing goes before the message that waits"
    assert [url for url, _, _ in h.fake.calls] == ["http://registry.test/schemas/ids/1"]
    assert h.runner.held_bytes > h.reserved, "what waits is charged to the budget"
    h.fake.schema(PERSON)
    h.deliver_all(["p/a", "p/b", "p/c", "p/d"])
    assert [json.loads(r.body or b"{}").get("kind") for r in h.agent.requests] == [None, "Person", None, None]
    assert h.loop.commits == {(T, 0): 4}
    assert h.runner.held_bytes == h.reserved
    # Known now: the next message is decoded on the Kafka thread, no fetch, no wait.
    h.arrive(h.value(person("e")))
    h.deliver_all(["p/e"])
    assert len(h.fake.calls) == 1


def test_an_unknown_id_dead_letters_its_record_and_the_rest_is_delivered() -> None:
    h = RegistryHarness()
    h.arrive(h.value(person("a")), h.value(framed(66, PLACE, {"id": "x", "city": "y"})), h.value(person("c")))
    h.fake.schema(PERSON)
    h.fake.answer(404, {"error_code": 40403, "message": "Schema 66 not found"})
    h.deliver_all(["p/a", "p/c"])
    assert h.dead_letters.reasons() == [
        "schema id 66 is unknown to the schema registry: the registry answered 404 (Schema 66 not found)"]
    assert h.loop.commits == {(T, 0): 3}
    assert not h.runner.circuit.is_open


def test_a_registry_that_is_down_holds_the_job_on_its_circuit_until_it_answers() -> None:
    h = RegistryHarness()
    h.arrive(h.value(person("a")), h.value({"id": "b"}, partition=1))
    h.fake.answer(503, b"down")
    status = h.runner.circuit_status()
    assert status["state"] == "open"
    assert status["reason"].startswith("schema registry: the schema registry answered HTTP 503")
    assert (T, 0) in h.loop.paused and (T, 1) in h.loop.paused
    for _ in range(5):  # asked again after each of the job's retry waits (at most 4 s), for ever
        h.clock.advance(4)
        h.fake.open()[0].errback(ConnectionRefusedError())
    assert len(h.fake.calls) == 6
    assert h.dead_letters.sent == [] and h.agent.requests == []
    h.clock.advance(4)
    h.fake.schema(PERSON)
    assert h.runner.circuit_status()["state"] == "closed"
    assert not h.loop.paused
    for r in h.agent.open():
        r.answer(200)
    assert h.runner.stats.delivered == 2 and h.dead_letters.sent == []


def test_a_revoked_partition_drops_what_waits_and_its_bytes() -> None:
    h = RegistryHarness()
    h.arrive(h.value(person("a"), partition=0), h.value({"id": "b"}, partition=1))
    h.arrive(h.value({"id": "c"}, partition=0))
    h.runner.revoked([(T, 0)], False)
    h.fake.schema(PERSON)
    h.deliver_all(["p/b"])
    assert h.agent.requests[0].path == "p/b" and len(h.agent.requests) == 1
    assert h.runner.held_bytes == h.reserved


def test_stop_while_waiting_for_the_registry_does_not_hang() -> None:
    h = RegistryHarness()
    h.arrive(h.value(person("a")))
    h.fake.answer(503, b"down")
    stopped = results([h.runner.stop()])
    assert stopped == [None]
    h.clock.advance(60)
    assert len(h.fake.calls) == 1, "no fetch after the stop"
    assert h.budget.held == 0


def test_waiting_messages_are_decoded_again_off_the_reactor() -> None:
    ran: list[Callable[..., Any]] = []

    def run(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        ran.append(f)
        return succeed(f(*args))

    h = RegistryHarness()
    h.registry._run = run
    h.arrive(h.value(person("a")))
    h.fake.schema(PERSON)
    assert len(ran) == 1
    h.deliver_all(["p/a"])


def test_the_registry_answering_again_says_nothing_of_the_endpoint() -> None:
    """A registry outage holds the job apart from the endpoint's circuit: its end neither counts
    as a good answer of the endpoint (which would let a failing record be dead-lettered) nor
    closes a circuit the endpoint opened."""
    h = RegistryHarness()
    h.arrive(*[h.value({"id": f"n{i}"}, partition=1) for i in range(3)])
    h.agent.open()[0].answer(503)
    good = h.runner.circuit.good
    h.arrive(h.value(person("a")))
    h.fake.answer(503, b"down")
    assert h.runner.circuit_status()["state"] == "open" and not h.runner.circuit.is_open
    h.runner.circuit.open("the endpoint is down", h.clock.seconds())  # as three failures would
    h.clock.advance(4)
    h.fake.schema(PERSON)
    assert h.runner.circuit.good == good, "the registry's answer is not the endpoint's"
    assert h.runner.circuit.is_open
    assert h.runner.circuit_status()["reason"] == "the endpoint is down"


def test_an_id_beyond_what_a_registry_gives_is_dead_lettered_without_asking() -> None:
    h = RegistryHarness()
    h.arrive(h.value(framed(2**32 - 1, PERSON, {"id": "a", "age": 1})), h.value({"id": "b"}))
    assert h.fake.calls == []
    assert h.dead_letters.reasons() == ["schema id 4294967295 is not a schema registry id (over 2^31 - 1)"]
    h.deliver_all(["p/b"])


@pytest_twisted.ensureDeferred
async def test_an_https_registry_is_checked_with_the_ca_file_as_endpoints_are(tmp_path: Any) -> None:
    """A registry behind a private CA: trusted with --ca-file's policy (the sender's), refused
    without it (an outage: the system's CAs do not know it)."""
    from twisted.internet import reactor, ssl
    from twisted.web.server import Site

    from restconsumer.delivery.registry import RegistryUnavailable
    from restconsumer.delivery.sender import HTTPSender
    from tests.infra.certs import make_pki

    pki = make_pki(tmp_path)
    cert = ssl.PrivateCertificate.loadPEM(pki.cert_file.read_text() + pki.key_file.read_text())
    port = reactor.listenSSL(0, Site(RegistryResource({1: PERSON})), cert.options(),  # type: ignore[attr-defined]
                             interface="127.0.0.1")
    url = f"https://127.0.0.1:{port.getHost().port}"
    trusted = SchemaRegistry(reactor, url, tls=HTTPSender(reactor, ca_file=str(pki.ca_file)).tls_policy)
    default = SchemaRegistry(reactor, url)
    try:
        got = await trusted.fetch(1)
        assert isinstance(got, WireSchema) and got.writer == PERSON
        with pytest.raises(RegistryUnavailable):
            await default.fetch(1)
    finally:
        for registry in (trusted, default):
            if registry._connections is not None:
                await registry._connections.closeCachedConnections()
        await port.stopListening()
