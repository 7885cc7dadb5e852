"""In-process tests of a running job (restconsumer.delivery.runner): a Clock, an in-memory HTTP agent, a
fake Kafka loop and fake dead letters — the message's whole way, fetched to committed, with no
socket and no sleep.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, Message
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from zope.interface import implementer

from restconsumer.base.types import TP
from restconsumer.delivery.budget import ByteBudget
from restconsumer.delivery.intake import MAX_WINDOW, RESUME_WINDOW
from restconsumer.delivery.runner import JobRunner, Shared
from restconsumer.delivery.sender import HTTPSender
from restconsumer.jobs.model import Job, validate
from restconsumer.jobs.work import Incoming, Prepared, prepare

T = "people"


class FakeResponse:
    """An IResponse with a whole body."""

    def __init__(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.code = code
        self.headers = Headers({k: [v] for k, v in (headers or {}).items()})
        self._body = body

    def deliverBody(self, protocol: Any) -> None:
        protocol.dataReceived(self._body)
        protocol.connectionLost(Failure(ResponseDone()))


@dataclasses.dataclass
class Pending:
    """A request the fake agent holds until the test answers it."""

    method: bytes
    url: bytes
    body: bytes | None
    d: Deferred[FakeResponse]
    cancelled: bool = False
    headers: Any = None

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name.encode()) if self.headers is not None else None
        return values[0].decode("latin-1") if values else None

    def answer(self, code: int = 200, body: bytes = b"ok", headers: dict[str, str] | None = None) -> None:
        self.d.callback(FakeResponse(code, body, headers))

    @property
    def path(self) -> str:
        return self.url.decode().split("/", 3)[3]


@implementer(IAgent)
class FakeAgent:
    """Holds every request; ``auto`` answers at once with that status."""

    def __init__(self, auto: int | None = None) -> None:
        self.auto = auto
        self.requests: list[Pending] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Any:  # noqa: N803
        def cancel(_: Any) -> None:
            pending.cancelled = True

        pending = Pending(method, uri, getattr(bodyProducer, "_data", None), Deferred(cancel),
                          headers=headers)
        self.requests.append(pending)
        if self.auto is not None:
            pending.answer(self.auto)
        return pending.d

    def open(self) -> list[Pending]:
        """Requests not yet answered nor cancelled."""
        return [r for r in self.requests if not r.d.called]

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]


class FakeDeadLetters:
    """Records dead letters; each is acknowledged when the test says (or at once)."""

    def __init__(self, auto: bool = True) -> None:
        self.auto = auto
        self.sent: list[tuple[str, bytes | None, dict[str, bytes], Deferred[None]]] = []

    def send(self, topic: str, key: bytes | None, value: bytes | None,
             headers: list[tuple[str, bytes]]) -> Deferred[None]:
        d: Deferred[None] = succeed(None) if self.auto else Deferred()
        self.sent.append((topic, value, dict(headers), d))
        return d

    def reasons(self) -> list[str]:
        return [h["restconsumer.reason"].decode() for _, _, h, _ in self.sent]


class FakeLoop:
    """Stands in for the KafkaLoop: records commits, pauses and resumes."""

    def __init__(self, reactor: Any, name: str, config: dict[str, Any], topics: list[str],
                 handler: JobRunner, **options: Any) -> None:
        self.handler = handler
        self.config = config
        self.commits: dict[TP, int] = {}
        self.paused: set[TP] = set()
        self.assignment: list[TP] = []
        self.lag: dict[TP, int] = {}
        self.started = False

    def start(self) -> None:
        self.started = True

    def commit(self, offsets: dict[TP, int]) -> None:
        self.commits.update(offsets)

    def pause(self, tp: TP) -> None:
        self.paused.add(tp)

    def resume(self, tp: TP) -> None:
        self.paused.discard(tp)

    def stop(self) -> Deferred[None]:
        d = self.handler.revoked(list(self.handler.ledger.partitions()), False)
        return d.addCallback(self.commits.update)


def make_job(**more: Any) -> Job:
    job = validate({"id": "j", "owner": "o", "type": "POST", "topic": T,
                    "datamap": {"id": "$.msg.id"}, "url": "http://sink.test/p/{id}",
                    "json_body": ["id"], "retry": {"max_attempts": 3, "initial_wait": 1, "max_wait": 4}})
    if more:
        job = dataclasses.replace(job, definition={**job.definition, **more})
    return job


class Harness:
    """One JobRunner wired to the fakes."""

    def __init__(self, job: Job | None = None, *, agent: FakeAgent | None = None,
                 dead_letters: FakeDeadLetters | None = None, budget: int = 64 * 1024 * 1024,
                 grace: float = 5.0, allow_hosts: frozenset[str] | None = None,
                 token_fetch: Any = None, clock: Clock | None = None, registry: Any = None) -> None:
        self.clock = clock or Clock()
        self.agent = agent or FakeAgent()
        self.dead_letters = dead_letters or FakeDeadLetters()
        self.budget = ByteBudget(budget)
        self.sender = HTTPSender(self.clock, agent=self.agent, allow_hosts=allow_hosts)
        shared = Shared(self.clock, {"bootstrap.servers": "x"}, self.sender, self.dead_letters,  # type: ignore[arg-type]
                        self.budget, revoke_grace=grace, loop_factory=FakeLoop, token_fetch=token_fetch,
                        registry=registry)
        self.runner = JobRunner(job or make_job(), shared)
        self.runner.start()
        self.loop: FakeLoop = self.runner.loop  # type: ignore[assignment]
        self.offsets: dict[TP, int] = {}

    def message(self, value: Any, *, partition: int = 0, offset: int | None = None,
                key: bytes | None = None,
                headers: list[tuple[str, bytes | None]] | None = None) -> Prepared:
        tp = (T, partition)
        if offset is None:
            offset = self.offsets.get(tp, 0)
        self.offsets[tp] = offset + 1
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        incoming = Incoming(T, partition, offset, key, raw, headers or [], 1_700_000_000_000)
        return prepare(self.runner.current.settings.builder, incoming, self.runner.current.settings.order)

    def arrive(self, *prepared: Prepared) -> None:
        self.runner.arrived(list(prepared))


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    harness.runner.assigned([(T, 0), (T, 1)])
    yield harness


def empty_avro() -> bytes:
    import io

    import fastavro

    out = io.BytesIO()
    schema = {"type": "record", "name": "P", "fields": [{"name": "id", "type": "string"}]}
    fastavro.writer(out, fastavro.parse_schema(schema), [], codec="deflate")
    return out.getvalue()


def test_a_message_with_no_record_does_not_stall_its_partition(h: Harness) -> None:
    # Fault 1 of issue 8: an empty Avro container left the partition without a worker.
    h.arrive(h.message(empty_avro()))
    assert h.loop.commits == {(T, 0): 1}
    h.arrive(*[h.message({"id": f"m{i}"}) for i in range(5)])
    for i in range(5):
        [pending] = h.agent.open()
        assert pending.path == f"p/m{i}"
        pending.answer(200)
    assert h.loop.commits == {(T, 0): 6}
    assert h.runner.stats.delivered == 5


def test_an_empty_container_alone_and_between_messages(h: Harness) -> None:
    h.agent.auto = 200
    h.arrive(h.message({"id": "a"}), h.message(empty_avro()), h.message({"id": "b"}))
    h.arrive(h.message(empty_avro()))
    h.arrive(h.message({"id": "c"}))
    assert h.agent.paths() == ["p/a", "p/b", "p/c"]
    assert h.loop.commits[(T, 0)] == 5


def test_one_request_at_a_time_per_partition_partitions_side_by_side(h: Harness) -> None:
    h.arrive(*[h.message({"id": f"a{i}"}, partition=0) for i in range(3)],
             *[h.message({"id": f"b{i}"}, partition=1) for i in range(3)])
    assert sorted(r.path for r in h.agent.open()) == ["p/a0", "p/b0"]
    h.agent.open()[1].answer()
    assert sorted(r.path for r in h.agent.open()) == ["p/a0", "p/b1"]
    assert h.loop.commits == {(T, 1): 1}


def test_commit_waits_for_the_lowest_unfinished_message() -> None:
    h = Harness(make_job(ordering="none"))
    h.runner.assigned([(T, 0)])
    h.arrive(*[h.message({"id": f"m{i}"}) for i in range(4)])
    first, second, third, fourth = h.agent.open()
    for pending in (second, third, fourth):
        pending.answer()
    assert h.loop.commits == {}
    first.answer()
    assert h.loop.commits == {(T, 0): 4}


def test_a_dead_letter_does_not_hold_up_the_partition_but_its_offset_waits_for_the_ack() -> None:
    h = Harness(dead_letters=FakeDeadLetters(auto=False))
    h.runner.assigned([(T, 0)])
    h.arrive(h.message({"id": "bad"}), h.message({"id": "good"}))
    h.agent.open()[0].answer(400, b"no")
    [pending] = h.agent.open()
    assert pending.path == "p/good"
    pending.answer(200)
    assert h.loop.commits == {}, "the offset moved before Kafka had the dead letter"
    [(topic, value, headers, ack)] = h.dead_letters.sent
    assert topic == "restconsumer.deadletter.j"
    assert json.loads(value or b"") == {"id": "bad"}
    assert headers["restconsumer.control.status"] == b"400"
    assert headers["restconsumer.offset"] == b"0"
    ack.callback(None)
    assert h.loop.commits == {(T, 0): 2}
    assert h.runner.stats.dead_lettered == 1


def test_undecodable_and_template_errors_are_dead_lettered_and_the_job_goes_on(h: Harness) -> None:
    h.agent.auto = 200
    h.arrive(h.message(b"\xff\xfe\x00bad"), h.message({"no_id": 1}), h.message({"id": "ok"}))
    reasons = h.dead_letters.reasons()
    assert len(reasons) == 2
    assert "neither Avro" in reasons[0]
    assert "needs 'id'" in reasons[1]
    assert h.agent.paths() == ["p/ok"]
    assert h.loop.commits == {(T, 0): 3}


def test_retries_used_up_with_no_good_answer_open_the_circuit_and_lose_nothing(h: Harness) -> None:
    h.arrive(h.message({"id": "x"}), h.message({"id": "y"}))
    for _ in range(2):
        h.agent.open()[0].answer(503)
        h.clock.advance(4)
    h.agent.open()[0].answer(503)
    assert h.dead_letters.sent == [], "an outage was taken for a bad message"
    assert h.runner.circuit.is_open
    status = h.runner.circuit_status()
    assert status["state"] == "open" and status["since"].endswith("Z")
    assert "503" in status["reason"]
    assert (T, 0) in h.loop.paused and (T, 1) in h.loop.paused
    # Probes: at most one every max_wait (4 s), not counted against max_attempts.
    for _ in range(5):
        h.clock.advance(3.9)
        assert len(h.agent.open()) == 0
        h.clock.advance(0.1)
        [probe] = h.agent.open()
        assert probe.path == "p/x"
        probe.answer(503)
    h.clock.advance(4)
    h.agent.open()[0].answer(200)
    assert h.runner.stats.delivered == 1
    assert not h.runner.circuit.is_open
    assert h.loop.paused == set()
    h.agent.open()[0].answer(200)
    assert h.loop.commits == {(T, 0): 2}
    assert h.dead_letters.sent == []


def test_poison_is_dead_lettered_when_other_records_show_the_endpoint_works(h: Harness) -> None:
    h.arrive(h.message({"id": "poison"}, partition=0), h.message({"id": "after"}, partition=0),
             *[h.message({"id": f"ok{i}"}, partition=1) for i in range(5)])
    for _ in range(3):
        for pending in h.agent.open():
            pending.answer(503 if pending.path == "p/poison" else 200)
        h.clock.advance(4)
    assert not h.runner.circuit.is_open
    assert len(h.dead_letters.sent) == 1
    assert "retries exhausted after 3 attempts" in h.dead_letters.reasons()[0]
    for pending in h.agent.open():
        pending.answer(200)
    assert "p/after" in h.agent.paths()
    assert h.loop.commits[(T, 0)] == 2


def test_different_records_failing_in_a_row_open_the_circuit_at_once() -> None:
    h = Harness()
    h.runner.assigned([(T, p) for p in range(4)])
    h.arrive(*[h.message({"id": f"m{p}"}, partition=p) for p in range(4)])
    for pending in h.agent.open()[:3]:
        pending.answer(503)
    assert h.runner.circuit.is_open
    h.agent.open()[0].answer(503)
    h.clock.advance(1.5)
    assert h.agent.open() == [], "records retried on their own while the circuit is open"
    h.clock.advance(3)
    [probe] = h.agent.open()
    assert probe.path == "p/m0", "the probe is the oldest unfinished record"
    probe.answer(200)
    assert not h.runner.circuit.is_open
    assert len(h.agent.open()) == 3


def test_retry_after_is_honoured_up_to_ten_times_max_wait(h: Harness) -> None:
    h.arrive(h.message({"id": "x"}, partition=0), h.message({"id": "y"}, partition=1))
    h.agent.open()[1].answer(200)
    h.agent.open()[0].answer(429, b"", {"Retry-After": "86400"})
    h.clock.advance(39.9)
    assert h.agent.open() == []
    h.clock.advance(0.2)
    assert len(h.agent.open()) == 1


def test_a_tls_verification_failure_is_dead_lettered_on_its_first_attempt() -> None:
    from OpenSSL import SSL
    from twisted.web.client import ResponseNeverReceived

    @implementer(IAgent)
    class Untrusted:
        calls = 0

        def request(self, *args: Any, **kwargs: Any) -> Any:
            Untrusted.calls += 1
            error = SSL.Error([("SSL routines", "", "certificate verify failed")])
            return fail(ResponseNeverReceived([Failure(error)]))

    h = Harness(agent=Untrusted())  # type: ignore[arg-type]
    h.runner.assigned([(T, 0)])
    h.arrive(h.message({"id": "x"}))
    assert Untrusted.calls == 1
    [reason] = h.dead_letters.reasons()
    assert reason.startswith("TLS verification failed")
    assert h.loop.commits == {(T, 0): 1}


def test_messages_of_a_partition_not_assigned_are_dropped(h: Harness) -> None:
    h.arrive(h.message({"id": "x"}, partition=7))
    assert h.agent.requests == []
    assert h.runner.stats.consumed == 0


def test_revocation_waits_for_a_request_under_way_within_the_grace(h: Harness) -> None:
    h.arrive(h.message({"id": "a"}), h.message({"id": "b"}))
    revoked = h.runner.revoked([(T, 0)], False)
    got: list[dict[TP, int]] = []
    revoked.addCallback(got.append)
    assert not got
    h.agent.open()[0].answer(200)
    assert got == [{(T, 0): 1}], "commits up to the first, which ended; b was dropped"
    assert h.agent.paths() == ["p/a"]


def test_revocation_cancels_a_request_that_outlives_the_grace(h: Harness) -> None:
    h.arrive(h.message({"id": "slow"}), h.message({"id": "next"}))
    got: list[dict[TP, int]] = []
    h.runner.revoked([(T, 0)], False).addCallback(got.append)
    h.clock.advance(4.9)
    assert not got
    h.clock.advance(0.2)
    assert h.agent.requests[0].cancelled, "the request under way was not cancelled"
    assert got == [{(T, 0): 0}], "the committed offset passed an unfinished message"
    assert h.dead_letters.sent == []
    assert h.runner.stats.failed == 0


def test_revocation_ends_a_wait_to_retry_at_once(h: Harness) -> None:
    h.arrive(h.message({"id": "x"}))
    h.agent.open()[0].answer(503)
    got: list[dict[TP, int]] = []
    h.runner.revoked([(T, 0)], False).addCallback(got.append)
    assert got == [{(T, 0): 0}]
    assert all(c.getTime() >= 30 for c in h.clock.getDelayedCalls()), "only the summary line waits"
    h.clock.advance(100)
    assert len(h.agent.requests) == 1


def test_a_request_answered_503_during_the_revocation_grace_lets_go_at_once(h: Harness) -> None:
    """Waited for because it was under way, it does not then hold the revocation through a
    wait to retry: the partition goes as soon as the answer came."""
    h.arrive(h.message({"id": "x"}))
    got: list[dict[TP, int]] = []
    h.runner.revoked([(T, 0)], False).addCallback(got.append)
    assert got == []
    h.agent.open()[0].answer(503)
    assert got == [{(T, 0): 0}], "the revocation waited for a retry that will not be sent"
    h.clock.advance(100)
    assert len(h.agent.requests) == 1


def test_a_lost_partition_commits_nothing_and_cancels_at_once(h: Harness) -> None:
    h.agent.auto = None
    h.arrive(h.message({"id": "a"}))
    got: list[dict[TP, int]] = []
    h.runner.revoked([(T, 0)], True).addCallback(got.append)
    assert got == [{}]
    assert h.agent.requests[0].cancelled


def test_finishing_after_revoke_and_reassign_changes_nothing(h: Harness) -> None:
    h.arrive(h.message({"id": "a"}))
    pending = h.agent.open()[0]
    h.runner.revoked([(T, 0)], False)
    h.clock.advance(10)
    h.runner.assigned([(T, 0)])
    h.loop.commits.clear()
    assert pending.cancelled
    h.agent.auto = 200
    h.arrive(h.message({"id": "a"}, offset=0))
    assert h.loop.commits == {(T, 0): 1}
    assert h.runner.stats.delivered == 1


def test_over_the_budget_partitions_holding_something_pause_and_resume_below_it() -> None:
    one = len(json.dumps({"id": "m0", "pad": "x" * 5000}).encode())
    h = Harness(budget=16 * one)
    h.runner.assigned([(T, 0), (T, 1)])
    reserved = h.budget.held
    h.arrive(*[h.message({"id": f"m{i}", "pad": "x" * 5000}) for i in range(12)])
    assert (T, 0) in h.loop.paused
    assert (T, 1) not in h.loop.paused, "a partition holding nothing may always take one message"
    while h.agent.open():
        h.agent.open()[0].answer(200)
    assert h.loop.paused == set()
    assert h.budget.held == reserved
    assert h.runner.held_bytes == reserved


def test_no_job_takes_more_than_half_of_the_budget() -> None:
    h = Harness(budget=200_000)
    h.runner.assigned([(T, 0)])
    h.budget.charge("other", 10)
    h.arrive(*[h.message({"id": f"m{i}", "pad": "x" * 20_000}) for i in range(6)])
    assert h.budget.over("j")
    assert (T, 0) in h.loop.paused


def test_a_partition_pauses_past_the_window_of_unfinished_messages(h: Harness) -> None:
    h.arrive(h.message({"id": "first"}), h.message({"id": "far"}, offset=MAX_WINDOW + 5))
    assert (T, 0) in h.loop.paused
    h.agent.open()[0].answer(200)
    h.agent.open()[0].answer(200)
    assert (T, 0) not in h.loop.paused


def test_a_partition_paused_past_the_window_resumes_only_below_half_of_it(h: Harness) -> None:
    """Not at every finished message: librdkafka drops a paused partition's pre-fetched data."""
    h.arrive(h.message({"id": "first"}), h.message({"id": "middle"}, offset=100),
             h.message({"id": "far"}, offset=MAX_WINDOW + 5))
    assert (T, 0) in h.loop.paused
    h.agent.open()[0].answer(200)  # the window is now MAX_WINDOW - 94: under it, over half
    assert RESUME_WINDOW < h.runner.ledger.window((T, 0)) <= MAX_WINDOW
    assert (T, 0) in h.loop.paused
    h.agent.open()[0].answer(200)
    assert (T, 0) not in h.loop.paused


def test_stop_cancels_what_is_under_way_and_commits_what_is_finished(h: Harness) -> None:
    h.arrive(h.message({"id": "a"}), h.message({"id": "b"}))
    h.agent.open()[0].answer(200)
    stopped = h.runner.stop()
    h.clock.advance(10)
    assert stopped.called
    assert h.loop.commits == {(T, 0): 1}
    assert h.agent.requests[1].cancelled
    assert h.budget.held == 0


def test_ordering_by_key_keeps_each_key_in_order_and_others_go_on() -> None:
    h = Harness(make_job(ordering="key"))
    h.runner.assigned([(T, 0)])
    h.arrive(h.message({"id": "a1"}, key=b"a"), h.message({"id": "a2"}, key=b"a"),
             h.message({"id": "b1"}, key=b"b"), h.message({"id": "n1"}), h.message({"id": "n2"}))
    assert sorted(r.path for r in h.agent.open()) == ["p/a1", "p/b1", "p/n1", "p/n2"]
    h.agent.requests[0].answer(200)
    assert "p/a2" in [r.path for r in h.agent.open()]


def test_a_connection_refused_is_retried(h: Harness) -> None:
    calls: list[int] = []

    @implementer(IAgent)
    class Refusing:
        def request(self, *args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            return fail(ConnectionRefusedError()) if len(calls) < 2 else succeed(FakeResponse(200))

    h2 = Harness(agent=Refusing())  # type: ignore[arg-type]
    h2.runner.assigned([(T, 0)])
    h2.arrive(h2.message({"id": "x"}))
    h2.clock.advance(2)
    assert len(calls) == 2
    assert h2.loop.commits == {(T, 0): 1}


def test_our_own_cancel_at_a_revocation_is_not_a_failure(h: Harness) -> None:
    h.arrive(h.message({"id": "x"}))
    got: list[dict[TP, int]] = []
    h.runner.revoked([(T, 0)], True).addCallback(got.append)
    assert h.agent.requests[0].cancelled
    assert got == [{}]
    assert h.runner.stats.failed == 0
    assert h.runner.stats.last_error is None
    assert h.dead_letters.sent == []


@pytest.mark.parametrize("attempt", [1, 2], ids=["first-attempt", "a-retry"])
def test_a_cancelled_error_from_outside_is_retried_and_the_partition_goes_on(
        h: Harness, attempt: int) -> None:
    """A lower layer gives up on a request (its Deferred fails with CancelledError) while
    nothing of ours cancelled it: the partition is neither revoked nor stopped, so the record
    is not abandoned (it would never end) nor dead-lettered as an internal error: it is
    retried like a dropped connection, delivered, and its offset committed."""
    h.arrive(h.message({"id": "x"}), h.message({"id": "y"}))
    if attempt == 2:
        h.agent.open()[0].answer(503)
        h.clock.advance(1)
    [pending] = h.agent.open()
    assert pending.path == "p/x"
    pending.d.errback(CancelledError("a lower layer gave up"))
    assert not pending.cancelled, "the test's cancel came from outside, not from the runner"
    h.clock.advance(4)
    [again] = h.agent.open()
    assert again.path == "p/x"
    again.answer(200)
    [after] = h.agent.open()
    assert after.path == "p/y"
    after.answer(200)
    assert h.agent.paths() == ["p/x"] * (attempt + 1) + ["p/y"]
    assert h.dead_letters.sent == []
    assert h.runner.stats.delivered == 2
    assert h.runner.stats.failed == 0
    assert h.loop.commits == {(T, 0): 2}


BASE = {"id": "j", "owner": "o", "type": "POST", "topic": T, "datamap": {"id": "$.msg.id"},
        "url": "http://sink.test/p/{id}", "json_body": ["id"],
        "retry": {"max_attempts": 3, "initial_wait": 1, "max_wait": 4}}


def fetched(h: Harness, value: Any, offset: int) -> Prepared:
    """A message as the Kafka loop hands it over, prepared by the runner itself."""
    message = Message(topic=T, partition=0, offset=offset, key=None, value=json.dumps(value).encode(),
                      headers=None, timestamp=(TIMESTAMP_CREATE_TIME, 1_700_000_000_000))
    return h.runner.prepare(message)


def test_update_takes_a_change_in_place_and_refuses_one_that_needs_a_rebuild() -> None:
    """JobRunner.update: a change it can take is used from the next read of the settings on
    (the answer of a request already under way is judged by it, a message fetched after it is
    built by it), with nothing cancelled; a change of topics, ordering, batch or start_from
    raises and leaves the running definition whole."""
    h = Harness(validate(BASE))
    h.runner.assigned([(T, 0)])
    h.arrive(fetched(h, {"id": "a"}, 0))
    [a] = h.agent.open()
    assert a.path == "p/a"
    changed = validate({**BASE, "url": "http://sink.test/q/{id}", "success_status": [409]})
    assert h.runner.can_take(changed)
    h.runner.update(changed)
    assert h.runner.job.hash == changed.hash
    assert not a.cancelled
    a.answer(409)  # a dead letter under the old definition, delivered under the new one
    assert h.dead_letters.sent == []
    assert h.runner.stats.delivered == 1
    h.arrive(fetched(h, {"id": "b"}, 1))
    [b] = h.agent.open()
    assert b.path == "q/b"
    for rebuild in ({"topic": "other"}, {"ordering": "key"}, {"start_from": "latest"},
                    {"url": "http://sink.test/q/batch", "batch": {"max_messages": 2}}):
        refused = validate({**BASE, "url": "http://sink.test/q/{id}", "success_status": [409], **rebuild})
        assert not h.runner.can_take(refused), rebuild
        with pytest.raises(ValueError, match="rebuilt"):
            h.runner.update(refused)
        assert h.runner.job.hash == changed.hash
    b.answer(200)
    h.arrive(fetched(h, {"id": "c"}, 2))
    [c] = h.agent.open()
    assert c.path == "q/c"
    c.answer(409)
    assert h.runner.stats.delivered == 3
    assert h.dead_letters.sent == []
    assert h.loop.commits == {(T, 0): 3}


def batch_job(**batch: Any) -> Job:
    return validate({"id": "j", "owner": "o", "type": "POST", "topic": T,
                     "datamap": {"id": "$.msg.id"}, "url": "http://sink.test/p/batch",
                     "json_body": ["id"], "batch": batch,
                     "retry": {"max_attempts": 3, "initial_wait": 1, "max_wait": 4}})


def test_a_batch_goes_when_full_and_the_rest_after_max_wait() -> None:
    h = Harness(batch_job(max_messages=3, max_wait=0.5))
    h.runner.assigned([(T, 0)])
    h.arrive(*[h.message({"id": f"m{i}"}) for i in range(4)])
    [first] = h.agent.open()
    assert json.loads(first.body or b"") == [{"id": "m0"}, {"id": "m1"}, {"id": "m2"}]
    first.answer(200)
    assert h.loop.commits == {(T, 0): 3}
    assert h.agent.open() == []
    h.clock.advance(0.5)
    [rest] = h.agent.open()
    assert json.loads(rest.body or b"") == [{"id": "m3"}]
    rest.answer(200)
    assert h.loop.commits == {(T, 0): 4}
    assert h.runner.stats.delivered == 4


def test_one_batch_per_partition_under_way_and_ndjson() -> None:
    h = Harness(batch_job(max_messages=2, format="ndjson"))
    h.runner.assigned([(T, 0)])
    h.arrive(*[h.message({"id": f"m{i}"}) for i in range(6)])
    [first] = h.agent.open()
    assert first.body == b'{"id":"m0"}\n{"id":"m1"}\n'
    first.answer(200)
    [second] = h.agent.open()
    assert second.body == b'{"id":"m2"}\n{"id":"m3"}\n'


def test_a_refused_batch_is_split_until_the_refused_records_are_alone() -> None:
    h = Harness(batch_job(max_messages=10))
    h.runner.assigned([(T, 0)])
    h.arrive(*[h.message({"id": f"m{i}"}) for i in range(10)])
    refused = {"m3", "m7"}
    sent = 0
    while h.agent.open():
        pending = h.agent.open()[0]
        ids = {item["id"] for item in json.loads(pending.body or b"")}
        pending.answer(400 if ids & refused else 200)
        sent += 1
        assert sent < 40
    dead = sorted(json.loads(v or b"")["id"] for _, v, _, _ in h.dead_letters.sent)
    assert dead == ["m3", "m7"]
    assert h.runner.stats.delivered == 8
    assert h.loop.commits == {(T, 0): 10}


def test_a_revoked_partition_sends_no_further_half_of_a_refused_batch() -> None:
    h = Harness(batch_job(max_messages=4))
    h.runner.assigned([(T, 0)])
    h.arrive(*[h.message({"id": f"m{i}"}) for i in range(4)])
    h.agent.open()[0].answer(400)  # the whole batch refused: its first half goes
    [half] = h.agent.open()
    assert len(json.loads(half.body or b"")) == 2
    got: list[dict[TP, int]] = []
    h.runner.revoked([(T, 0)], True).addCallback(got.append)
    assert got == [{}] and half.cancelled
    h.clock.advance(100)
    assert len(h.agent.requests) == 2, "the second half was sent after the revocation"
    assert h.dead_letters.sent == []


def test_an_attempt_that_raises_at_once_does_not_stall_its_partition(h: Harness) -> None:
    send = h.sender.send

    def refuse_a(request: Any, *args: Any, **kwargs: Any) -> Any:
        if request.url.endswith(b"/p/a"):
            raise ValueError("not a URL Agent takes")
        return send(request, *args, **kwargs)

    h.sender.send = refuse_a  # type: ignore[method-assign]
    h.arrive(h.message({"id": "a"}), h.message({"id": "b"}), h.message({"id": "c"}))
    # SPEC §5 "Nothing waits for ever": an unexpected exception in a per-record step
    # dead-letters that record with the reason, and the partition goes on: the records
    # after it are delivered and committed past it.
    assert h.dead_letters.reasons() == ["internal error: ValueError: not a URL Agent takes"]
    for later in ("p/b", "p/c"):
        [pending] = h.agent.open()
        assert pending.path == later
        pending.answer(200)
    assert h.agent.paths() == ["p/b", "p/c"]
    assert h.runner.stats.delivered == 2
    assert h.loop.commits == {(T, 0): 3}


def test_a_batch_is_retried_and_holds_its_partition() -> None:
    h = Harness(batch_job(max_messages=2))
    h.runner.assigned([(T, 0), (T, 1)])
    h.arrive(h.message({"id": "a"}), h.message({"id": "b"}),
             h.message({"id": "c"}, partition=1), h.message({"id": "d"}, partition=1))
    first, other = h.agent.open()
    other.answer(200)
    first.answer(503)
    h.clock.advance(1)
    [again] = h.agent.open()
    assert again.body == first.body
    again.answer(200)
    assert h.loop.commits == {(T, 0): 2, (T, 1): 2}
    assert h.dead_letters.sent == []


def test_ordering_by_a_datamap_key_keeps_each_entity_in_order() -> None:
    job = validate({"id": "j", "owner": "o", "type": "POST", "topic": T,
                    "datamap": {"id": "$.msg.id", "who": "$.msg.who"}, "url": "http://sink.test/p/{id}",
                    "ordering": {"by": "who"}})
    h = Harness(job)
    h.runner.assigned([(T, 0)])
    h.arrive(h.message({"id": "1", "who": "ann"}), h.message({"id": "2", "who": "bob"}),
             h.message({"id": "3", "who": "ann"}))
    assert sorted(r.path for r in h.agent.open()) == ["p/1", "p/2"]
    h.agent.requests[0].answer(200)
    assert sorted(r.path for r in h.agent.open()) == ["p/2", "p/3"]
    [three] = [r for r in h.agent.open() if r.path == "p/3"]
    three.answer(200)
    assert h.loop.commits == {(T, 0): 1}, "committed past bob's unfinished message"
    h.agent.open()[0].answer(200)
    assert h.loop.commits == {(T, 0): 3}


def test_max_in_flight_bounds_the_requests_under_way() -> None:
    h = Harness(make_job(ordering="none", max_in_flight=3))
    h.runner.assigned([(T, 0)])
    h.arrive(*[h.message({"id": f"m{i}"}) for i in range(10)])
    assert len(h.agent.open()) == 3
    h.agent.open()[1].answer(200)
    assert len(h.agent.open()) == 3


def test_the_allowlist_holds_at_send_time_for_a_job_stored_before_it() -> None:
    agent = FakeAgent(auto=200)
    h = Harness(agent=agent, allow_hosts=frozenset({"allowed.test"}))
    h.runner.assigned([(T, 0)])
    h.arrive(h.message({"id": "x"}))
    assert agent.requests == [], "a request left for a host outside the allowlist"
    [reason] = h.dead_letters.reasons()
    assert "'sink.test' is not an allowed host" in reason
    assert h.loop.commits == {(T, 0): 1}


def test_metrics_count_records_requests_retries_and_gauges() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    h = Harness()
    h.runner.assigned([(T, 0), (T, 1)])
    h.arrive(h.message({"id": "a"}), h.message({"id": "b"}, partition=1))
    h.agent.open()[0].answer(200)
    h.agent.open()[0].answer(503)
    h.clock.advance(1)
    h.agent.open()[0].answer(400)
    h.runner.loop.lag = {(T, 0): 7}
    metrics = h.runner._shared.metrics
    metrics.refresh({"j": h.runner}, h.budget.held)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics.exposition().decode())
               for s in family.samples}
    assert samples[("restconsumer_messages_total", (("job", "j"), ("outcome", "delivered")))] == 1
    assert samples[("restconsumer_messages_total", (("job", "j"), ("outcome", "dead_lettered")))] == 1
    assert samples[("restconsumer_requests_total", (("code", "2xx"), ("job", "j")))] == 1
    assert samples[("restconsumer_requests_total", (("code", "5xx"), ("job", "j")))] == 1
    assert samples[("restconsumer_requests_total", (("code", "4xx"), ("job", "j")))] == 1
    assert samples[("restconsumer_request_duration_seconds_count", (("job", "j"),))] == 3
    assert samples[("restconsumer_retries_total", (("job", "j"),))] == 1
    assert samples[("restconsumer_consumer_lag", (("job", "j"), ("partition", "0"), ("topic", T)))] == 7
    assert samples[("restconsumer_circuit_open", (("job", "j"),))] == 0
    assert samples[("restconsumer_buffered_bytes", ())] == h.budget.held
    h.runner.loop.lag = {}
    metrics.refresh({}, 0)
    text = metrics.exposition().decode()
    assert "restconsumer_consumer_lag{" not in text and "restconsumer_circuit_open{" not in text


def test_metrics_counted_per_request_are_written_by_flush_before_exposition_and_at_stop() -> None:
    from restconsumer.delivery.metrics import Metrics, MetricsFlusher

    def value(name: str, **labels: str) -> float | None:
        return metrics._registry.get_sample_value(name, labels)

    metrics = Metrics()
    for job, status, seconds in [("a", 200, 0.002), ("a", 503, 0.02), ("b", None, 5.0), ("a", 201, 0.3)]:
        metrics.answered(job, status, seconds)
    metrics.delivered("a")
    metrics.delivered("b", 4)
    assert value("restconsumer_requests_total", job="a", code="2xx") is None  # not yet written
    text = metrics.exposition().decode()  # flushes first
    assert 'restconsumer_requests_total{code="2xx",job="a"} 2.0' in text
    assert value("restconsumer_requests_total", job="a", code="5xx") == 1
    assert value("restconsumer_requests_total", job="b", code="error") == 1
    assert value("restconsumer_request_duration_seconds_count", job="a") == 3
    assert value("restconsumer_request_duration_seconds_bucket", job="a", le="0.025") == 2
    assert value("restconsumer_request_duration_seconds_sum", job="b") == 5.0
    assert value("restconsumer_messages_total", job="b", outcome="delivered") == 4
    # What is counted after the last flush is written when the flusher stops.
    flusher = MetricsFlusher(metrics)
    flusher.clock = Clock()
    flusher.startService()
    metrics.delivered("a", 2)
    flusher.clock.advance(0.25)
    assert value("restconsumer_messages_total", job="a", outcome="delivered") == 3
    metrics.answered("a", 404, 0.001)
    flusher.stopService()
    assert value("restconsumer_requests_total", job="a", code="4xx") == 1


def test_a_job_with_work_logs_a_summary_every_30_s() -> None:
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        h = Harness()
        h.runner.assigned([(T, 0)])
        h.agent.auto = 200
        h.arrive(h.message({"id": "a"}), h.message({"id": "b"}))
        h.clock.advance(30)
        h.clock.advance(30)
        lines = [e for e in events if e.get("log_format", "").startswith("job {job_id}: delivered")]
        assert len(lines) == 1, "a line when there was work, none when there was none"
        assert lines[0]["delivered"] == 2 and lines[0]["new"] == 2 and lines[0]["job_id"] == "j"
    finally:
        globalLogPublisher.removeObserver(events.append)


def test_ratelimit_spaces_every_send_even_when_a_wake_up_is_late() -> None:
    h = Harness(make_job(ratelimit=1.0, ordering="none"))
    h.runner.assigned([(T, 0)])
    h.agent.auto = 200
    h.arrive(*[h.message({"id": f"m{i}"}) for i in range(4)])
    assert len(h.agent.requests) == 1
    h.clock.advance(1.5)  # one wake-up half a second late
    assert len(h.agent.requests) == 2
    h.clock.advance(0.9)
    assert len(h.agent.requests) == 2, "the next send came less than 1 s after the last"
    h.clock.advance(0.1)
    assert len(h.agent.requests) == 3


# -- SPEC §12: more from messages and requests --------------------------------------------


def test_every_request_carries_the_user_agent_single_and_batched() -> None:
    from restconsumer import __version__
    h = Harness()
    h.runner.assigned([(T, 0)])
    h.arrive(h.message({"id": "a"}))
    [pending] = h.agent.open()
    assert pending.header("User-Agent") == f"restconsumer/{__version__}"
    pending.answer(200)
    b = Harness(make_job(batch={"max_messages": 2, "max_bytes": 1 << 20, "max_wait": 0.5,
                                "format": "ndjson"}, url="http://sink.test/p/all"))
    b.runner.assigned([(T, 0)])
    b.arrive(b.message({"id": "a"}), b.message({"id": "b"}))
    [batch] = b.agent.open()
    assert batch.header("User-Agent") == f"restconsumer/{__version__}"
    assert batch.header("Content-Type") == "application/x-ndjson"


def test_a_jobs_own_user_agent_header_replaces_ours() -> None:
    h = Harness(make_job(headers={"User-Agent": "mine/1"}))
    h.runner.assigned([(T, 0)])
    h.arrive(h.message({"id": "a"}))
    assert h.agent.open()[0].header("User-Agent") == "mine/1"


def test_meta_headers_of_the_kafka_message_reach_the_datamap() -> None:
    job = validate({"id": "j", "owner": "o", "type": "POST", "topic": T,
                    "datamap": {"id": "$.msg.id", "trace": "$.meta.headers.trace",
                                "bin": "$.meta.headers.bin", "nul": "$.meta.headers.nul"},
                    "url": "http://sink.test/p/{id}", "json_body": ["id", "trace", "bin", "nul"]})
    h = Harness(job)
    h.runner.assigned([(T, 0)])
    h.arrive(h.message({"id": "a"}, headers=[("trace", b"t-1"), ("bin", b"\xff\xfe"),
                                              ("nul", None)]))
    [pending] = h.agent.open()
    # Text headers as text, a null header as null; one that is not UTF-8 is left out.
    assert json.loads(pending.body or b"") == {"id": "a", "trace": "t-1", "nul": None}


def test_start_from_sets_where_a_new_group_starts() -> None:
    assert Harness().loop.config["auto.offset.reset"] == "earliest"
    assert Harness(make_job(start_from="latest")).loop.config["auto.offset.reset"] == "latest"
    assert Harness(make_job(start_from="earliest")).loop.config["auto.offset.reset"] == "earliest"


def test_success_status_counts_those_answers_as_delivered() -> None:
    h = Harness(make_job(success_status=[409]))
    h.runner.assigned([(T, 0)])
    h.arrive(h.message({"id": "dup"}), h.message({"id": "bad"}), h.message({"id": "ok"}))
    h.agent.open()[0].answer(409, b"exists")
    h.agent.open()[0].answer(404, b"no")
    h.agent.open()[0].answer(200)
    assert h.runner.stats.delivered == 2
    assert [r for r in h.dead_letters.reasons()] == ["HTTP 404: no"]
    assert h.loop.commits == {(T, 0): 3}


def test_success_status_holds_for_a_batch() -> None:
    h = Harness(make_job(success_status=[409], url="http://sink.test/p/all",
                         batch={"max_messages": 2, "max_bytes": 1 << 20, "max_wait": 0.5,
                                "format": "json_array"}))
    h.runner.assigned([(T, 0)])
    h.arrive(h.message({"id": "a"}), h.message({"id": "b"}))
    h.agent.open()[0].answer(409)
    assert h.runner.stats.delivered == 2 and h.dead_letters.sent == []
    assert h.loop.commits == {(T, 0): 2}


def test_templated_headers_take_datamap_values_and_a_control_character_dead_letters() -> None:
    job = validate({"id": "j", "owner": "o", "type": "POST", "topic": T,
                    "datamap": {"id": "$.msg.id", "tenant": "$.msg.tenant"},
                    "url": "http://sink.test/p/{id}", "json_body": ["id"],
                    "headers": {"X-Tenant": "t-{tenant}", "X-Static": "s", "X-Id": "{id}"}})
    h = Harness(job)
    h.runner.assigned([(T, 0)])
    h.arrive(h.message({"id": "a", "tenant": "acme"}),
             h.message({"id": "b", "tenant": "evil\r\nX-Injected: 1"}),
             h.message({"id": "c", "tenant": "tab\there"}),
             h.message({"id": "d"}),
             h.message({"id": 7, "tenant": "ünï"}))
    first = h.agent.open()[0]
    assert (first.header("X-Tenant"), first.header("X-Static"), first.header("X-Id")) == \
        ("t-acme", "s", "a")
    first.answer(200)
    last = h.agent.open()[0]
    assert last.path == "p/7" and last.header("X-Id") == "7"
    assert last.headers.getRawHeaders(b"X-Tenant") == ["t-ünï".encode()]
    last.answer(200)
    assert len(h.agent.requests) == 2
    reasons = h.dead_letters.reasons()
    assert len(reasons) == 3
    assert "control character" in reasons[0] and "control character" in reasons[1]
    assert "needs 'tenant'" in reasons[2]
    assert h.loop.commits == {(T, 0): 5}


def test_the_idempotency_key_is_the_records_place_and_the_same_on_every_retry() -> None:
    h = Harness(make_job(idempotency_key=True))
    h.runner.assigned([(T, 0), (T, 1)])
    h.arrive(h.message({"id": "a"}, offset=41), h.message({"id": "b"}, partition=1, offset=7))
    a, b = h.agent.open()
    assert a.header("Idempotency-Key") == f"j:{T}:0:41:0"
    assert b.header("Idempotency-Key") == f"j:{T}:1:7:0"
    a.answer(503)
    b.answer(200)
    h.clock.advance(1)
    [again] = h.agent.open()
    assert again.header("Idempotency-Key") == f"j:{T}:0:41:0"
    # Without it, no key (and the job's shared headers are used).
    plain = Harness()
    plain.runner.assigned([(T, 0)])
    plain.arrive(plain.message({"id": "a"}))
    assert plain.agent.open()[0].header("Idempotency-Key") is None


def test_each_record_of_an_avro_container_has_its_own_idempotency_key() -> None:
    import io

    import fastavro
    out = io.BytesIO()
    schema = {"type": "record", "name": "P", "fields": [{"name": "id", "type": "string"}]}
    fastavro.writer(out, fastavro.parse_schema(schema), [{"id": "x"}, {"id": "y"}])
    h = Harness(make_job(idempotency_key=True, ordering="none"))
    h.runner.assigned([(T, 0)])
    h.arrive(h.message(out.getvalue(), offset=3))
    assert [r.header("Idempotency-Key") for r in h.agent.open()] == [f"j:{T}:0:3:0", f"j:{T}:0:3:1"]


def test_a_batch_idempotency_key_spans_its_offsets_and_each_half_has_its_own() -> None:
    h = Harness(make_job(idempotency_key=True, url="http://sink.test/p/all",
                         batch={"max_messages": 4, "max_bytes": 1 << 20, "max_wait": 0.5,
                                "format": "json_array"}))
    h.runner.assigned([(T, 0)])
    h.arrive(*[h.message({"id": f"m{i}"}, offset=10 + i) for i in range(4)])
    [batch] = h.agent.open()
    assert batch.header("Idempotency-Key") == f"j:{T}:0:10-13"
    batch.answer(400, b"one is bad")
    [half] = h.agent.open()
    assert half.header("Idempotency-Key") == f"j:{T}:0:10-11"


def filter_job(**more: Any) -> Job:
    return validate({"id": "j", "owner": "o", "type": "POST", "topic": T,
                     "datamap": {"id": "$.msg.id"}, "url": "http://sink.test/p/{id}",
                     "json_body": ["id"], "filter": "$[?(@.msg.n > 5)]", **more})


def test_filtered_records_are_not_sent_are_counted_and_committed() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    h = Harness(filter_job())
    h.runner.assigned([(T, 0)])
    h.arrive(h.message({"id": "small", "n": 1}), h.message({"id": "big", "n": 9}),
             h.message({"id": "small2", "n": 5}))
    [pending] = h.agent.open()
    assert pending.path == "p/big"
    assert h.loop.commits == {(T, 0): 1}, "a filtered record was committed past an unfinished one"
    pending.answer(200)
    assert h.loop.commits == {(T, 0): 3}
    assert (h.runner.stats.filtered, h.runner.stats.delivered) == (2, 1)
    assert h.dead_letters.sent == []
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(
                   h.runner._shared.metrics.exposition().decode())
               for s in family.samples}
    assert samples[("restconsumer_messages_total", (("job", "j"), ("outcome", "filtered")))] == 2


def test_a_filter_that_fails_on_a_record_dead_letters_it() -> None:
    h = Harness(filter_job())
    h.runner.assigned([(T, 0)])
    h.agent.auto = 200
    h.arrive(h.message({"id": "odd", "n": [1]}), h.message({"id": "ok", "n": 7}))
    [reason] = h.dead_letters.reasons()
    assert reason.startswith("the filter failed on this record: TypeError")
    assert h.agent.paths() == ["p/ok"]
    assert h.loop.commits == {(T, 0): 2}


def test_a_batched_job_leaves_filtered_records_out_of_its_batches() -> None:
    h = Harness(filter_job(url="http://sink.test/p/all",
                           batch={"max_messages": 2, "max_bytes": 1 << 20, "max_wait": 0.5}))
    h.runner.assigned([(T, 0)])
    h.arrive(*[h.message({"id": f"m{i}", "n": i}) for i in range(4, 9)])
    [batch] = h.agent.open()
    assert json.loads(batch.body or b"") == [{"id": "m6"}, {"id": "m7"}]
    batch.answer(200)
    h.clock.advance(0.5)
    [rest] = h.agent.open()
    assert json.loads(rest.body or b"") == [{"id": "m8"}]
    rest.answer(200)
    assert h.loop.commits == {(T, 0): 5}
    assert h.runner.stats.filtered == 2


SIGNING_KEY = b"signing-key-for-the-runner-tests!"
SIGNING_SECRET = "whsec_" + __import__("base64").b64encode(SIGNING_KEY).decode()


def verify_standard_webhook(secret: str, msg_id: str, timestamp: str, body: bytes,
                            signature: str) -> bool:
    """The receiver's check of the ``standardwebhooks`` package (the specification's own
    library), which also refuses a timestamp five minutes away from the wall clock's."""
    headers = {"webhook-id": msg_id, "webhook-timestamp": timestamp, "webhook-signature": signature}
    try:
        Webhook(secret).verify(body, headers, json_parse=False)
    except WebhookVerificationError:
        return False
    return True


def test_signed_requests_verify_and_a_retry_is_signed_again_with_the_same_id() -> None:
    h = Harness(make_job(signing={"secret": SIGNING_SECRET, "scheme": "standard-webhooks"},
                         idempotency_key=True))
    h.runner.assigned([(T, 0)])
    now = int(time.time())
    h.clock.advance(now)  # the receiver checks the timestamp against the wall clock
    h.arrive(h.message({"id": "a"}, offset=5))
    [first] = h.agent.open()
    msg_id = first.header("webhook-id")
    assert msg_id == first.header("Idempotency-Key") == f"j:{T}:0:5:0"
    assert first.header("webhook-timestamp") == str(now)
    assert verify_standard_webhook(SIGNING_SECRET, msg_id, str(now), first.body or b"",
                                   first.header("webhook-signature") or "")
    first.answer(503)
    h.clock.advance(1)
    [again] = h.agent.open()
    assert again.header("webhook-id") == msg_id
    assert again.header("webhook-timestamp") == str(now + 1)
    assert verify_standard_webhook(SIGNING_SECRET, msg_id, str(now + 1), again.body or b"",
                                   again.header("webhook-signature") or "")
    # The retry's signature is its own: not the first one's, which signed another timestamp.
    assert again.header("webhook-signature") != first.header("webhook-signature")
    assert not verify_standard_webhook(SIGNING_SECRET, msg_id, str(now), again.body or b"",
                                       again.header("webhook-signature") or "")
    assert not verify_standard_webhook("whsec_" + "b3RoZXI=", msg_id, str(now + 1),
                                       again.body or b"", again.header("webhook-signature") or "")


def test_a_signed_batch_has_its_offsets_as_id_and_no_idempotency_key_unless_asked() -> None:
    h = Harness(make_job(signing={"secret": SIGNING_SECRET, "scheme": "standard-webhooks"},
                         url="http://sink.test/p/all",
                         batch={"max_messages": 2, "max_bytes": 1 << 20, "max_wait": 0.5,
                                "format": "json_array"}))
    h.runner.assigned([(T, 0)])
    h.clock.advance(int(time.time()))  # the receiver checks the timestamp against the wall clock
    h.arrive(h.message({"id": "a"}), h.message({"id": "b"}))
    [batch] = h.agent.open()
    assert batch.header("webhook-id") == f"j:{T}:0:0-1"
    assert batch.header("Idempotency-Key") is None
    assert verify_standard_webhook(SIGNING_SECRET, f"j:{T}:0:0-1", batch.header("webhook-timestamp") or "",
                                   batch.body or b"", batch.header("webhook-signature") or "")


def test_each_finished_record_has_a_result_and_its_offset_waits_for_the_ack() -> None:
    h = Harness(make_job(result_topic="results.j"), dead_letters=FakeDeadLetters(auto=False))
    h.runner.assigned([(T, 0)])
    h.arrive(h.message({"id": "a"}, key=b"k1"), h.message({"id": "b"}, key=b"k2"))
    h.clock.advance(0.25)
    h.agent.open()[0].answer(201, b"created " + b"x" * 70_000)
    h.agent.open()[0].answer(404, b"\xff\xfe")
    assert h.loop.commits == {}, "an offset moved before Kafka had the result"
    results = [(topic, json.loads(value or b"")) for topic, value, _, _ in h.dead_letters.sent
               if topic == "results.j"]
    assert [r["source"] for _, r in results] == [{"topic": T, "partition": 0, "offset": 0, "record": 0},
                                                  {"topic": T, "partition": 0, "offset": 1, "record": 0}]
    first, second = (r for _, r in results)
    assert (first["job"], first["status"], first["outcome"]) == ("j", 201, "delivered")
    assert first["response"]["encoding"] == "text"
    assert len(first["response"]["body"]) == 64 * 1024
    assert first["duration_ms"] >= 0
    assert (second["status"], second["outcome"], second["response"]) == \
        (404, "dead_lettered", {"body": "//4=", "encoding": "base64"})
    assert "404" in second["reason"]
    held = h.budget.held_by("j") - h.runner._prefetch
    assert held > 64 * 1024, "a result waiting for Kafka counts in the byte budget"
    for _, _, _, ack in h.dead_letters.sent:
        ack.callback(None)
    assert h.loop.commits == {(T, 0): 2}
    assert h.runner.stats.dead_lettered == 1
    assert h.budget.held_by("j") == h.runner._prefetch, "all released once acknowledged"


def test_a_batch_gives_one_result_per_record_with_the_batchs_answer() -> None:
    h = Harness(make_job(result_topic="results.j", url="http://sink.test/p/all",
                         batch={"max_messages": 2, "max_bytes": 1 << 20, "max_wait": 0.5,
                                "format": "json_array"}))
    h.runner.assigned([(T, 0)])
    h.arrive(h.message({"id": "a"}), h.message({"id": "b"}))
    h.agent.open()[0].answer(200, b'{"ok": true}')
    results = [json.loads(value or b"") for topic, value, _, _ in h.dead_letters.sent]
    assert [(r["source"]["offset"], r["status"], r["response"]["body"]) for r in results] == \
        [(0, 200, '{"ok": true}'), (1, 200, '{"ok": true}')]
    assert h.loop.commits == {(T, 0): 2}


class FakeTokenEndpoint:
    """Answers token requests as the test says (each a Deferred it can fire)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str], Deferred[tuple[int, bytes]]]] = []

    def __call__(self, url: str, form: dict[str, str], timeout: float) -> Deferred[tuple[int, bytes]]:
        d: Deferred[tuple[int, bytes]] = Deferred()
        self.calls.append((url, form, d))
        return d

    def give(self, token: str, expires_in: int = 3600, status: int = 200) -> None:
        body = json.dumps({"access_token": token, "token_type": "Bearer",
                           "expires_in": expires_in}).encode()
        next(d for _, _, d in self.calls if not d.called).callback((status, body))


def oauth_harness() -> tuple[Harness, FakeTokenEndpoint]:
    settings = {"token_url": "https://auth.test/token", "client_id": "cid",
                "client_secret": "cs-unit", "scope": "write"}
    endpoint = FakeTokenEndpoint()
    h = Harness(make_job(oauth2=settings), token_fetch=endpoint)
    h.runner.assigned([(T, 0), (T, 1)])
    return h, endpoint


def test_oauth2_fetches_one_token_for_all_requests_and_again_before_it_expires() -> None:
    h, endpoint = oauth_harness()
    h.arrive(h.message({"id": "a"}), h.message({"id": "b"}, partition=1))
    [(url, form, _)] = endpoint.calls
    assert url == "https://auth.test/token"
    assert form == {"grant_type": "client_credentials", "client_id": "cid",
                    "client_secret": "cs-unit", "scope": "write"}
    endpoint.give("t1", expires_in=100)
    assert [r.header("Authorization") for r in h.agent.open()] == ["Bearer t1", "Bearer t1"]
    for r in h.agent.open():
        r.answer(200)
    h.clock.advance(69)
    h.arrive(h.message({"id": "c"}))
    assert len(endpoint.calls) == 1 and h.agent.open()[0].header("Authorization") == "Bearer t1"
    h.agent.open()[0].answer(200)
    h.clock.advance(2)  # within 30 s of expiry: fetched again
    h.arrive(h.message({"id": "d"}))
    assert len(endpoint.calls) == 2
    endpoint.give("t2")
    assert h.agent.open()[0].header("Authorization") == "Bearer t2"


def test_a_401_fetches_a_new_token_once_and_sends_again() -> None:
    h, endpoint = oauth_harness()
    h.arrive(h.message({"id": "a"}))
    endpoint.give("old")
    h.agent.open()[0].answer(401, b"expired")
    assert len(endpoint.calls) == 2
    endpoint.give("new")
    [again] = h.agent.open()
    assert again.header("Authorization") == "Bearer new"
    again.answer(200)
    assert h.runner.stats.delivered == 1 and h.dead_letters.sent == []


def test_a_token_endpoint_that_is_down_is_an_outage_not_a_dead_letter() -> None:
    h, endpoint = oauth_harness()
    h.arrive(h.message({"id": "a"}), h.message({"id": "b"}, partition=1))
    [(_, _, d)] = endpoint.calls
    d.callback((503, b"down"))
    for _ in range(6):
        h.clock.advance(4)
        for _, _, pending in endpoint.calls:
            if not pending.called:
                pending.errback(ConnectionRefusedError())
    assert h.dead_letters.sent == []
    assert h.runner.circuit.is_open
    assert "token endpoint" in h.runner.circuit_status()["reason"]
    h.clock.advance(4)
    endpoint.give("back")
    for r in h.agent.open():
        r.answer(200)
    h.clock.advance(4)
    for r in h.agent.open():
        r.answer(200)
    assert h.runner.stats.delivered == 2 and h.dead_letters.sent == []
