"""The delivery core's invariants (SPEC §5 "Nothing waits for ever", "One way to deliver").

Through the documented interfaces only: real ``twistd -n restconsumer`` processes, the
session's real Kafka broker and Redis, real loopback HTTP servers, ``GET /job/{id}/status``
and ``GET /metrics``.

1. Records waiting in half-full batches survive a change of their job's definition (a
   header, the batch settings, batching turned off): every one is delivered, the lag
   reaches 0 and the committed offsets reach the end.
2. An open circuit whose probe is answered 400: the probe is dead-lettered and the job
   goes on (the circuit closes, every other record is delivered).
3. A replay sends what the running job would: resolved secret references, a signature
   that verifies, ``success_status`` honoured.
4. A replay of one dead-lettered record of an Avro container sends that record only.
5. ``restconsumer_oldest_unfinished_seconds`` and the status's ``oldest_unfinished_seconds``
   show how long the oldest unfinished message of each partition has waited.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import fastavro
import pytest
from prometheus_client.parser import text_string_to_metric_families
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.infra.kafka import KafkaBroker
from tests.infra.kafka_io import committed, produce, read_all
from tests.infra.ports import wait_for
from tests.infra.service import ServiceProcess
from tests.infra.sink import Received, Sink
from tests.infra.slowsink import SlowSink

Start = Callable[..., ServiceProcess]
Answer = tuple[int, dict[str, str], bytes]

WEBHOOK_SECRET = "whsec_" + "Y29yZS1pbnZhcmlhbnRzLXJlcGxheS1zaWduaW5nLXNlY3JldA=="


def job(name: str, topic: str, url: str, **more: Any) -> dict[str, Any]:
    """A job posting ``{"id": …}`` of each message to ``{url}/{name}/{id}``."""
    return {"id": name, "owner": "ops", "type": "POST", "topic": topic,
            "datamap": {"id": "$.msg.id"}, "url": f"{url}/{name}/{{id}}", "json_body": ["id"],
            **more}


def ids(count: int, partitions: int, prefix: str = "") -> list[str]:
    """Message ids in production order: message ``i`` goes to partition ``i % partitions``
    (as ``produce`` writes it), so its id is ``{prefix}p{partition}-{sequence}``."""
    return [f"{prefix}p{i % partitions}-{i // partitions:04d}" for i in range(count)]


def json_messages(entities: list[str]) -> list[bytes]:
    """One JSON message ``{"id": entity}`` per entity."""
    return [json.dumps({"id": e}).encode() for e in entities]


def status(service: ServiceProcess, name: str) -> dict[str, Any]:
    """GET /job/{name}/status."""
    answer = service.request("GET", f"/job/{name}/status")
    assert answer.status == 200, answer
    return answer.json


def metrics(service: ServiceProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``GET /metrics``, parsed by prometheus-client itself."""
    answer = service.request("GET", "/metrics")
    assert answer.status == 200, answer
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(answer.body.decode()) for s in family.samples}


def entity(got: Received) -> str:
    """The ``{id}`` a request was sent for (the last path segment)."""
    return got.path.rsplit("/", 1)[1]


def body_ids(got: Received) -> list[str]:
    """The ids a request carries: one JSON object, a JSON array of them, or NDJSON lines."""
    text = got.body.decode()
    if got.headers.get("content-type", "").startswith("application/x-ndjson"):
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        parsed = json.loads(text)
        items = parsed if isinstance(parsed, list) else [parsed]
    return [item["id"] for item in items]


def delivered(sink: Sink) -> set[str]:
    """Every id the endpoint has received so far, in any request."""
    return {i for got in sink.snapshot() for i in body_ids(got)}


def tail(service: ServiceProcess) -> str:
    """The end of the service's log without its access lines, for a failure message."""
    lines = [line for line in service.log().splitlines() if "twisted.python.log#info" not in line]
    return "\n".join(lines[-40:])


# -- 1. a change of definition loses no record waiting in a batch ---------------------------

#: Half-full batches: 250 records a partition wait for ``max_wait`` (10,000 would fill one).
BATCHED = {"max_messages": 10000, "max_wait": 4}
WAITING = 500

#: Each change made while the records wait, and how a request sent after it shows it.
CHANGES: dict[str, tuple[Callable[[dict[str, Any]], dict[str, Any]], Callable[[Received], bool]]] = {
    "header": (lambda d: {**d, "headers": {"X-Version": "2"}},
               lambda got: got.headers.get("x-version") == "2"),
    "batch-settings": (lambda d: {**d, "batch": {"max_messages": 200, "max_wait": 2, "format": "ndjson"}},
                       lambda got: got.headers.get("content-type", "").startswith("application/x-ndjson")),
    "batching-off": (lambda d: {k: v for k, v in d.items() if k != "batch"},
                     lambda got: isinstance(json.loads(got.body), dict)),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_records_waiting_in_a_batch_are_delivered_after_the_job_changes(
        change: str, services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink) -> None:
    """500 records over 2 partitions wait in half-full batches (``max_messages`` 10,000,
    ``max_wait`` 4 s) when the job is changed through the API — a header changed, the batch
    settings changed (a lower ``max_messages``, a shorter wait, NDJSON), or batching turned
    off. Every one of the 500 reaches the endpoint, none is dead-lettered, ``total_lag``
    reaches 0 and the group's committed offsets reach the end of both partitions; a record
    produced after the change is sent as the changed job says.

    Before the fix, the batcher of the old definition was replaced with its records in it:
    they were never sent, never finished, and the lag stayed at 500 for ever.
    """
    name = topic(2)
    job_id = f"rebatch-{change}"
    expected = ids(WAITING, 2)
    produce(kafka.bootstrap, name, json_messages(expected), partitions=2)
    service = services()
    # A batched job's URL holds no placeholders (SPEC §11).
    definition = {**job(job_id, name, sink.url, headers={"X-Version": "1"}, batch=BATCHED),
                  "url": f"{sink.url}/{job_id}/batch"}
    answer = service.request("POST", f"/job/{job_id}", definition)
    assert answer.status == 201, answer
    wait_for(lambda: status(service, job_id)["counters"]["consumed"] >= WAITING, 30,
             f"the {WAITING} messages consumed", every=0.05)
    # The records must still wait for their batch when the job changes, or nothing is tested.
    assert sink.count() == 0, f"a batch went before the change ({sink.count()} requests): the " \
                              f"test did not exercise records waiting in a batch"
    alter, shows = CHANGES[change]
    changed = alter(definition)
    answer = service.request("POST", f"/job/{job_id}", changed)
    assert answer.status == 200, answer
    changed_at = time.monotonic()

    try:
        wait_for(lambda: delivered(sink) >= set(expected), 30, f"all {WAITING} records delivered",
                 every=0.2)
    except TimeoutError as e:
        now = status(service, job_id)
        raise AssertionError(
            f"{len(delivered(sink) & set(expected))} of {WAITING} records waiting in a batch when the "
            f"job changed ({change}) were delivered within 30 s; total_lag {now['total_lag']}, "
            f"counters {now['counters']}\n{tail(service)}") from e
    try:
        wait_for(lambda: status(service, job_id)["total_lag"] == 0, 30, "the lag at 0", every=0.2)
        wait_for(lambda: committed(kafka.bootstrap, f"restconsumer.{job_id}", name, 2)
                 == [WAITING // 2, WAITING // 2], 30, "the committed offsets at the end", every=0.5)
    except TimeoutError as e:
        raise AssertionError(f"every record was delivered, yet: lag {status(service, job_id)['lag']}, "
                             f"committed {committed(kafka.bootstrap, f'restconsumer.{job_id}', name, 2)} "
                             f"(the end is {WAITING // 2} on each partition)") from e
    assert status(service, job_id)["counters"]["dead_lettered"] == 0

    # The change took: what comes after it is sent as the changed job says.
    later = ids(2, 2, prefix="later-")
    produce(kafka.bootstrap, name, json_messages(later), partitions=2)
    wait_for(lambda: delivered(sink) >= set(later), 30, "the records produced after the change")
    after = [got for got in sink.snapshot() if set(body_ids(got)) & set(later)]
    assert after and all(shows(got) for got in after), [(got.headers, got.body[:200]) for got in after]
    wait_for(lambda: committed(kafka.bootstrap, f"restconsumer.{job_id}", name, 2)
             == [WAITING // 2 + 1, WAITING // 2 + 1], 30, "the later records committed")
    print(f"\n{change}: {WAITING} waiting records delivered "
          f"{sink.snapshot()[-1].at - changed_at:.1f} s after the change, in {sink.count()} requests")


# -- 2. a probe answered 4xx does not hold the circuit open -------------------------------

class DownThenJudging:
    """503 without ``Retry-After`` to everything while ``down``; then 400 to the first request
    (the circuit's probe, the only request an open circuit sends) and 200 to all others,
    whose ids it keeps in ``ok``."""

    def __init__(self) -> None:
        self.down = True
        self.probe: str | None = None
        self._ok: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, got: Received) -> Answer:
        with self._lock:
            if self.down:
                return 503, {}, b"down for maintenance"
            if self.probe is None:
                self.probe = entity(got)
                return 400, {}, b"this record is refused"
            self._ok.add(entity(got))
        return 200, {}, b"ok"

    def ok(self) -> set[str]:
        """The ids answered 200 so far."""
        with self._lock:
            return set(self._ok)


def test_a_probe_answered_400_is_dead_lettered_and_the_rest_delivered_once_the_circuit_closes(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    """30 records over 3 partitions; the endpoint answers 503 (no ``Retry-After``) to
    everything until the circuit is open, then 400 to the probe (the oldest unfinished
    record: the first of its partition) and 200 to everything else.

    The probe is dead-lettered (the dead-letter topic holds it alone, its reason and status
    say 400), the 29 others are delivered, and the circuit is ``closed`` again.

    Before the fix, a probe answered 4xx left the circuit open with nothing to probe again:
    the other records waited for ever.
    """
    name = topic(3)
    job_id = "probe-400"
    expected = ids(30, 3)
    respond = DownThenJudging()
    sink = Sink(respond).start()
    try:
        produce(kafka.bootstrap, name, json_messages(expected), partitions=3)
        service = services()
        retry = {"max_attempts": 3, "initial_wait": 0.2, "max_wait": 1}
        answer = service.request("POST", f"/job/{job_id}", job(job_id, name, sink.url, retry=retry))
        assert answer.status == 201, answer
        wait_for(lambda: status(service, job_id)["circuit"]["state"] == "open", 30,
                 "the circuit open", every=0.1)
        respond.down = False

        try:
            wait_for(lambda: respond.probe is not None and respond.ok() >= set(expected) - {respond.probe},
                     30, "every other record delivered", every=0.2)
        except TimeoutError as e:
            now = status(service, job_id)
            raise AssertionError(
                f"probe {respond.probe} answered 400; then {len(respond.ok())} of the 29 other records "
                f"were answered 200 within 30 s; circuit {now['circuit']}, counters {now['counters']}"
                f"\n{tail(service)}") from e
        probe = respond.probe
        assert probe is not None and probe.endswith("-0000"), \
            f"the probe {probe} is not the oldest unfinished record of its partition"
        wait_for(lambda: status(service, job_id)["circuit"]["state"] == "closed", 20,
                 "the circuit closed")
        letters = read_all(kafka.bootstrap, f"restconsumer.deadletter.{job_id}", expect=2, timeout=8)
        assert [json.loads(m.value())["id"] for m in letters] == [probe]
        headers = dict(letters[0].headers())
        assert headers["restconsumer.control.status"] == b"400", headers
        assert b"400" in headers["restconsumer.reason"], headers
        wait_for(lambda: status(service, job_id)["counters"]["delivered"] == 29, 10, "29 delivered")
        counters = status(service, job_id)["counters"]
        assert counters["dead_lettered"] == 1, counters
        assert {entity(r) for r in sink.snapshot()} == set(expected)
    finally:
        sink.stop()


# -- 3. a replay sends what the job would --------------------------------------------------

#: The variable the job's Authorization header refers to (SPEC §8: a reference is the whole
#: value, so the variable holds the whole header value).
AUTH_VARIABLE = "RESTCONSUMER_SECRET_CORE_REPLAY_AUTH"
AUTH_VALUE = "Bearer tok-core-replay-8d2f"


class Switch:
    """Answers every request with ``status`` (changed by the test)."""

    def __init__(self, status: int) -> None:
        self.status = status

    def __call__(self, got: Received) -> Answer:
        return self.status, {}, b"answered %d" % self.status


def signature(got: Received) -> str:
    """``valid`` if the request's Standard Webhooks signature verifies (with the reference
    implementation), else why not."""
    try:
        Webhook(WEBHOOK_SECRET).verify(got.body, got.headers, json_parse=False)
    except WebhookVerificationError as e:
        return f"invalid: {e}"
    return "valid"


def test_a_replay_sends_resolved_secrets_signed_and_counts_success_status_as_delivered(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    """A job with ``headers: {"Authorization": "${env:…}"}`` (the variable given to the
    service), Standard Webhooks ``signing`` and ``success_status: [409]``: its 4 records are
    dead-lettered (400), then the endpoint answers 409 and the dead letters are replayed.

    Each replayed request carries the resolved Authorization value (not the reference) and
    a signature that the ``standardwebhooks`` package verifies; the replay counts all 4 as
    delivered and none as dead-lettered, and no new dead letter is written.

    Before the fix, a replay built its requests with a second code path: the reference went
    out as text, nothing was signed, and a 409 was dead-lettered again.
    """
    name = topic()
    job_id = "replay-secrets"
    expected = [f"s{i}" for i in range(4)]
    respond = Switch(400)
    sink = Sink(respond).start()
    try:
        service = services(env={AUTH_VARIABLE: AUTH_VALUE})
        definition = job(job_id, name, sink.url, headers={"Authorization": f"${{env:{AUTH_VARIABLE}}}"},
                         signing={"secret": WEBHOOK_SECRET, "scheme": "standard-webhooks"},
                         success_status=[409])
        answer = service.request("POST", f"/job/{job_id}", definition)
        assert answer.status == 201, answer
        produce(kafka.bootstrap, name, json_messages(expected))
        wait_for(lambda: status(service, job_id)["counters"]["dead_lettered"] == 4, 40, "4 dead letters")
        # The running job itself sends the resolved value, signed: what a replay must match.
        first = sink.snapshot()
        assert [(entity(r), r.headers.get("authorization"), signature(r)) for r in first] == \
            [(i, AUTH_VALUE, "valid") for i in expected]

        respond.status = 409
        before = sink.count()
        started = service.request("POST", f"/job/{job_id}/deadletters/replay")
        assert started.status == 202, started
        wait_for(lambda: status(service, job_id).get("replay", {}).get("state") in ("done", "failed"),
                 40, "the replay ended")
        replay = status(service, job_id)["replay"]
        sent = sorted((entity(r), r.headers.get("authorization"), signature(r))
                      for r in sink.snapshot()[before:])
        counted = {k: replay[k] for k in ("state", "delivered", "dead_lettered")}
        assert (sent, counted) == ([(i, AUTH_VALUE, "valid") for i in expected],
                                   {"state": "done", "delivered": 4, "dead_lettered": 0}), \
            f"the replay sent (id, Authorization, signature) {sent} and counted {counted}"
        letters = read_all(kafka.bootstrap, f"restconsumer.deadletter.{job_id}", expect=5, timeout=5)
        assert len(letters) == 4, "a replayed record was dead-lettered again"
    finally:
        sink.stop()


# -- 4. a replay of one record of an Avro container ----------------------------------------

PERSON = {"type": "record", "name": "Person", "namespace": "org.aether",
          "fields": [{"name": "id", "type": "string"}, {"name": "name", "type": "string"}]}


def avro_container(records: list[dict[str, Any]]) -> bytes:
    """One Aether-style Kafka message: an Avro container file, deflate, schema embedded."""
    out = io.BytesIO()
    fastavro.writer(out, fastavro.parse_schema(PERSON), records, codec="deflate")
    return out.getvalue()


def test_a_replay_of_one_record_of_an_avro_container_sends_that_record_only(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    """One message, an Avro container of 3 records; the endpoint refuses ``rec-1`` (400) and
    takes the others: only ``rec-1`` is dead-lettered, its letter saying
    ``restconsumer.record: 1``. Once the endpoint takes it, the replay sends exactly one
    request, for ``rec-1``, and counts it delivered.

    Before the fix, a replay decoded the letter's container again and sent all 3 records.
    """
    name = topic()
    job_id = "replay-avro"
    fixed = threading.Event()

    def respond(got: Received) -> Answer:
        if entity(got) == "rec-1" and not fixed.is_set():
            return 400, {}, b"rec-1 refused for now"
        return 200, {}, b"ok"

    sink = Sink(respond).start()
    try:
        service = services()
        answer = service.request("POST", f"/job/{job_id}", job(job_id, name, sink.url))
        assert answer.status == 201, answer
        produce(kafka.bootstrap, name, [avro_container(
            [{"id": f"rec-{r}", "name": f"Person {r}"} for r in range(3)])])
        wait_for(lambda: status(service, job_id)["counters"]["dead_lettered"] == 1, 40, "1 dead letter")
        wait_for(lambda: status(service, job_id)["counters"]["delivered"] == 2, 10, "2 delivered")
        [letter] = read_all(kafka.bootstrap, f"restconsumer.deadletter.{job_id}", expect=1)
        assert dict(letter.headers())["restconsumer.record"] == b"1", letter.headers()

        fixed.set()
        before = sink.count()
        started = service.request("POST", f"/job/{job_id}/deadletters/replay")
        assert started.status == 202, started
        wait_for(lambda: status(service, job_id).get("replay", {}).get("state") in ("done", "failed"),
                 40, "the replay ended")
        sent = [r.path for r in sink.snapshot()[before:]]
        assert sent == [f"/{job_id}/rec-1"], f"the replay of rec-1's dead letter sent {sent}"
        replay = status(service, job_id)["replay"]
        assert (replay["state"], replay["delivered"], replay["dead_lettered"]) == ("done", 1, 0), replay
    finally:
        sink.stop()


# -- 5. how long the oldest unfinished message has waited ----------------------------------

GAUGE = "restconsumer_oldest_unfinished_seconds"


def test_the_oldest_unfinished_message_of_a_partition_shows_how_long_it_has_waited(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    """The endpoint holds the request of the first of 3 messages (one partition) unanswered.

    While it is held, ``GET /job/{id}/status`` shows ``oldest_unfinished_seconds`` as
    ``{"<topic>[0]": seconds}`` — a number that grows past 2 s and stays within the time since
    the message was produced — and ``GET /metrics`` has the gauge
    ``restconsumer_oldest_unfinished_seconds{job,topic,partition="0"}`` past 2 s too. Once the
    endpoint answers and all 3 are delivered, both go to 0 (or the partition leaves them).
    """
    name = topic()
    job_id = "oldest-unfinished"
    key = f"{name}[0]"
    labels = (("job", job_id), ("partition", "0"), ("topic", name))
    sink = SlowSink(lambda call: 50.0 if call.entity == "held" else 0.0).start()
    try:
        service = services()
        answer = service.request("POST", f"/job/{job_id}", job(job_id, name, sink.url, timeout=55))
        assert answer.status == 201, answer
        produced = time.monotonic()
        produce(kafka.bootstrap, name, json_messages(["held", "next-1", "next-2"]))
        wait_for(lambda: any(c.entity == "held" for c in sink.snapshot()), 40, "the held request")

        def waited() -> float:
            found = status(service, job_id).get("oldest_unfinished_seconds")
            assert isinstance(found, dict), f"no oldest_unfinished_seconds map in the status: {found!r}"
            value = found[key]
            assert isinstance(value, (int, float)) and not isinstance(value, bool), found
            return float(value)

        try:
            wait_for(lambda: waited() > 2.0, 15, "oldest_unfinished_seconds past 2 s", every=0.2)
        except TimeoutError as e:
            raise AssertionError(f"the status never showed {key} waiting past 2 s while its first "
                                 f"message was held: {status(service, job_id)}") from e
        first = waited()
        assert first <= time.monotonic() - produced + 1.0, \
            f"{first} s is more than the message has existed: not seconds since it was fetched"
        wait_for(lambda: waited() >= first + 0.5, 10, "oldest_unfinished_seconds growing", every=0.2)
        try:
            wait_for(lambda: metrics(service).get((GAUGE, labels), 0.0) > 2.0, 10,
                     f"{GAUGE} past 2 s", every=0.25)
        except TimeoutError as e:
            raise AssertionError(f"no {GAUGE}{dict(labels)} past 2 s in /metrics: "
                                 f"{[k for k in metrics(service) if k[0] == GAUGE]}") from e

        sink.release()
        wait_for(lambda: status(service, job_id)["counters"]["delivered"] == 3, 20, "3 delivered")

        def settled() -> bool:
            found = status(service, job_id).get("oldest_unfinished_seconds") or {}
            return found.get(key, 0) == 0 and metrics(service).get((GAUGE, labels), 0.0) == 0

        try:
            wait_for(settled, 10, "oldest_unfinished_seconds back to 0", every=0.2)
        except TimeoutError as e:
            shown = status(service, job_id).get("oldest_unfinished_seconds")
            raise AssertionError(f"with nothing unfinished: status {shown}, "
                                 f"gauge {metrics(service).get((GAUGE, labels))}") from e
    finally:
        sink.stop()
