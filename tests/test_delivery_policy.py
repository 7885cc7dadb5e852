"""Unit tests of the retry policy (restconsumer.delivery.retry) and the HTTP client
(restconsumer.delivery.sender), SPEC §5: waits, retryable statuses, deliver(), HTTPSender.

deliver() runs on a :class:`twisted.internet.task.Clock` with fake senders; HTTPSender talks to a
twisted.web server on the loopback interface, in the test's own reactor (pytest-twisted).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError, Deferred, fail, gatherResults, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.error import (
    ConnectingCancelledError,
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
    TimeoutError,
)
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from restconsumer.delivery.retry import Outcome, RetryPolicy, deliver, is_retryable_status
from restconsumer.delivery.sender import Answer, HTTPSender
from restconsumer.jobs.mapping import Outgoing

Result = int | Answer | BaseException


# -- RetryPolicy -----------------------------------------------------------------------------


def test_default_policy() -> None:
    policy = RetryPolicy()
    assert (policy.max_attempts, policy.initial_wait, policy.max_wait) == (8, 1.0, 30.0)


def test_policy_of_job_settings() -> None:
    policy = RetryPolicy.of({"max_attempts": 3, "initial_wait": 0.5, "max_wait": 4})
    assert policy == RetryPolicy(3, 0.5, 4.0)
    assert isinstance(policy.max_wait, float)


def test_wait_doubles_from_the_initial_wait_up_to_the_cap() -> None:
    policy = RetryPolicy(initial_wait=1.0, max_wait=30.0)
    top = [policy.wait(attempt, None, lambda: 1.0) for attempt in range(1, 10)]
    assert top == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    bottom = [policy.wait(attempt, None, lambda: 0.0) for attempt in range(1, 10)]
    assert bottom == pytest.approx([0.8, 1.6, 3.2, 6.4, 12.8, 24.0, 24.0, 24.0, 24.0])


def test_wait_stays_capped_for_huge_attempt_numbers() -> None:
    policy = RetryPolicy(initial_wait=0.25, max_wait=7.0)
    for attempt in (50, 1000, 10**6):
        assert 5.6 <= policy.wait(attempt, None, random.random) <= 7.0


def test_jitter_stays_within_a_fifth_below_the_ceiling() -> None:
    policy = RetryPolicy(initial_wait=0.5, max_wait=20.0)
    rng = random.Random(1)
    for attempt in range(1, 12):
        ceiling = min(20.0, 0.5 * 2 ** (attempt - 1))
        waits = [policy.wait(attempt, None, rng.random) for _ in range(200)]
        assert all(ceiling * 0.8 <= w <= ceiling for w in waits)
        # it is jitter, not a constant
        assert max(waits) - min(waits) > ceiling / 10


def test_waits_grow_on_average() -> None:
    policy = RetryPolicy(initial_wait=1.0, max_wait=30.0)
    rng = random.Random(2)
    means = [sum(policy.wait(a, None, rng.random) for _ in range(100)) / 100 for a in range(1, 6)]
    assert means == sorted(means)


def test_retry_after_is_honoured() -> None:
    policy = RetryPolicy(initial_wait=1.0, max_wait=30.0)
    assert policy.wait(1, 2.0, lambda: 1.0) >= 2.0
    assert policy.wait(1, 7.0, lambda: 0.0) >= 7.0
    assert policy.wait(3, 25.0, lambda: 0.5) >= 25.0


def test_retry_after_longer_than_the_cap_is_still_honoured() -> None:
    assert RetryPolicy(initial_wait=1.0, max_wait=30.0).wait(1, 120.0, lambda: 0.5) >= 120.0


def test_short_retry_after_does_not_shorten_the_backoff() -> None:
    policy = RetryPolicy(initial_wait=1.0, max_wait=30.0)
    assert policy.wait(5, 0.0, lambda: 0.0) == pytest.approx(12.8)
    assert policy.wait(5, 1.0, lambda: 1.0) == 16.0


def test_exhausted() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert [policy.exhausted(n) for n in range(1, 6)] == [False, False, True, True, True]
    assert RetryPolicy(max_attempts=1).exhausted(1)


def test_max_attempts_zero_never_exhausts() -> None:
    policy = RetryPolicy(max_attempts=0)
    assert not any(policy.exhausted(n) for n in (0, 1, 8, 100, 10**9))


@pytest.mark.parametrize("status", [408, 429, 500, 501, 502, 503, 504, 599])
def test_retryable_statuses(status: int) -> None:
    assert is_retryable_status(status)


@pytest.mark.parametrize("status", [200, 201, 204, 301, 302, 304, 400, 401, 403, 404, 405, 409, 410,
                                    413, 422, 451])
def test_not_retryable_statuses(status: int) -> None:
    assert not is_retryable_status(status)


# -- deliver() on a Clock --------------------------------------------------------------------


class FakeSend:
    """A ``send`` answering from a script: a status, an :class:`Answer`, or an exception to fail with.

    The last entry repeats once the script is used up.
    """

    def __init__(self, *script: Result) -> None:
        self.script = list(script)
        self.calls = 0
        self.times: list[float] = []
        self.clock: Clock | None = None

    def __call__(self) -> Deferred[Answer]:
        item = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        if self.clock is not None:
            self.times.append(self.clock.seconds())
        if isinstance(item, BaseException):
            return fail(item)
        if isinstance(item, int):
            item = Answer(item, None, f"body of {item}".encode())
        return succeed(item)


class Retries:
    """deliver()'s ``on_retry``: keeps what it was told of each retry (attempt, reason, wait)."""

    def __init__(self) -> None:
        self.told: list[tuple[int, str, float]] = []

    def __call__(self, attempt: int, reason: str, wait: float) -> None:
        self.told.append((attempt, reason, wait))

    @property
    def waits(self) -> list[float]:
        """The wait before each retry, in order."""
        return [wait for _, _, wait in self.told]


def start(send: FakeSend, policy: RetryPolicy, clock: Clock, **kwargs: Any) -> Deferred[Outcome]:
    """deliver() as a Deferred, on ``clock``."""
    send.clock = clock
    kwargs.setdefault("rand", lambda: 1.0)
    return Deferred.fromCoroutine(deliver(send, policy, clock, **kwargs))


def run(send: FakeSend, policy: RetryPolicy, clock: Clock | None = None, *, limit: int = 10_000,
        **kwargs: Any) -> Outcome:
    """Drive deliver() to its end by advancing the clock one pending wait at a time."""
    clock = clock or Clock()
    d = start(send, policy, clock, **kwargs)
    results: list[Outcome] = []
    d.addCallback(results.append)
    for _ in range(limit):
        if results:
            break
        calls = clock.getDelayedCalls()
        assert calls, "deliver() is neither finished nor waiting"
        clock.advance(min(c.getTime() for c in calls) - clock.seconds())
    assert results, "deliver() did not finish"
    assert not clock.getDelayedCalls()
    return results[0]


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_delivered_after_one_attempt(status: int) -> None:
    send = FakeSend(status)
    clock = Clock()
    retries = Retries()
    d = start(send, RetryPolicy(), clock, on_retry=retries)
    # No waiting at all: it is over before the clock moves.
    results: list[Outcome] = []
    d.addCallback(results.append)
    assert results, "a 2xx must finish without any wait"
    [outcome] = results
    assert outcome.delivered
    assert outcome.attempts == 1
    assert outcome.retried == 0
    assert outcome.status == status
    assert retries.told == []
    assert send.calls == 1
    assert not clock.getDelayedCalls()


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422, 300, 301, 302, 304, 307])
def test_other_4xx_and_3xx_are_not_delivered_and_not_retried(status: int) -> None:
    send = FakeSend(Answer(status, None, b"the reason"), 200)
    retries: list[Any] = []
    outcome = run(send, RetryPolicy(), on_retry=lambda *a: retries.append(a))
    assert not outcome.delivered
    assert outcome.attempts == 1
    assert outcome.retried == 0
    assert outcome.status == status
    assert f"HTTP {status}" in outcome.reason
    assert "the reason" in outcome.reason
    assert send.calls == 1
    assert retries == []


@pytest.mark.parametrize("status", [503, 408, 500, 502])
def test_retryable_statuses_are_retried_with_growing_waits_until_success(status: int) -> None:
    send = FakeSend(status, status, status, 200)
    retries = Retries()
    outcome = run(send, RetryPolicy(max_attempts=8, initial_wait=1.0, max_wait=30.0), on_retry=retries)
    assert outcome.delivered
    assert outcome.attempts == 4
    assert outcome.retried == 3
    assert outcome.status == 200
    assert send.times == [0.0, 1.0, 3.0, 7.0]
    assert [(a, w) for a, _, w in retries.told] == [(1, 1.0), (2, 2.0), (3, 4.0)]
    assert all(f"HTTP {status}" in reason for _, reason, _ in retries.told)


@pytest.mark.parametrize("error", [
    ConnectionRefusedError("nobody listens"),
    ResponseNeverReceived([Failure(ConnectionLost("gone"))]),
    TimeoutError("slow"),
    DNSLookupError("no.such.host"),
    ConnectionLost("reset"),
    DeferredTimeoutError(),
], ids=lambda e: type(e).__name__)
def test_connection_errors_are_retried_until_success(error: Exception) -> None:
    send = FakeSend(error, error, 204)
    retries = Retries()
    outcome = run(send, RetryPolicy(initial_wait=0.5, max_wait=10.0), on_retry=retries)
    assert outcome.delivered
    assert outcome.attempts == 3
    assert outcome.status == 204
    assert retries.waits == [0.5, 1.0]
    assert send.times == [0.0, 0.5, 1.5]
    assert len(retries.told) == 2
    assert all(type(error).__name__ in reason for _, reason, _ in retries.told)


def test_no_resend_before_the_wait_is_over() -> None:
    send = FakeSend(503, 200)
    clock = Clock()
    d = start(send, RetryPolicy(initial_wait=2.0), clock)
    results: list[Outcome] = []
    d.addCallback(results.append)
    assert send.calls == 1
    clock.advance(1.99)
    assert send.calls == 1
    assert not results
    clock.advance(0.01)
    assert send.calls == 2
    assert results
    assert results[0].delivered


def test_retries_exhausted_by_statuses() -> None:
    send = FakeSend(503)
    retries = Retries()
    outcome = run(send, RetryPolicy(max_attempts=5, initial_wait=1.0, max_wait=3.0), on_retry=retries)
    assert not outcome.delivered
    assert outcome.attempts == 5
    assert send.calls == 5
    assert outcome.retried == 4
    assert outcome.status == 503
    assert "retries exhausted" in outcome.reason
    assert "HTTP 503" in outcome.reason
    assert retries.waits == [1.0, 2.0, 3.0, 3.0]
    assert send.times == [0.0, 1.0, 3.0, 6.0, 9.0]


def test_retries_exhausted_by_connection_errors() -> None:
    send = FakeSend(ConnectionRefusedError())
    outcome = run(send, RetryPolicy(max_attempts=3, initial_wait=0.1, max_wait=1.0))
    assert not outcome.delivered
    assert outcome.attempts == 3
    assert outcome.status is None
    assert "retries exhausted" in outcome.reason
    assert "ConnectionRefusedError" in outcome.reason


def test_default_policy_gives_up_after_eight_attempts() -> None:
    send = FakeSend(500)
    retries = Retries()
    outcome = run(send, RetryPolicy(), rand=random.Random(3).random, on_retry=retries)
    assert outcome.attempts == 8
    assert "retries exhausted" in outcome.reason
    assert len(retries.waits) == 7
    # Ceilings 1, 2, 4, 8, 16, 30, 30 s; each wait is between 80 % of its ceiling and the ceiling.
    ceilings = [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert all(c * 0.8 <= w <= c for c, w in zip(ceilings, retries.waits, strict=True))
    assert 72.8 <= sum(retries.waits) <= 91.0
    assert send.times[-1] == pytest.approx(sum(retries.waits))


def test_one_attempt_policy_never_waits() -> None:
    send = FakeSend(503)
    retries = Retries()
    outcome = run(send, RetryPolicy(max_attempts=1), on_retry=retries)
    assert (outcome.delivered, outcome.attempts, retries.told) == (False, 1, [])
    assert "retries exhausted" in outcome.reason


def test_max_attempts_zero_retries_until_it_succeeds() -> None:
    send = FakeSend(*([503] * 40), 200)
    retries = Retries()
    outcome = run(send, RetryPolicy(max_attempts=0, initial_wait=1.0, max_wait=5.0), on_retry=retries)
    assert outcome.delivered
    assert outcome.attempts == 41
    assert max(retries.waits) == 5.0
    assert retries.waits[:4] == [1.0, 2.0, 4.0, 5.0]


def test_retry_after_two_seconds_waits_at_least_two_seconds() -> None:
    send = FakeSend(Answer(503, 2.0, b"busy"), 200)
    clock = Clock()
    retries = Retries()
    outcome = run(send, RetryPolicy(initial_wait=0.1, max_wait=30.0), clock, on_retry=retries)
    assert outcome.delivered
    assert retries.waits[0] >= 2.0
    assert send.times[1] - send.times[0] >= 2.0


def test_retry_after_on_429() -> None:
    send = FakeSend(Answer(429, 9.0, b"slow down"), 200)
    retries = Retries()
    run(send, RetryPolicy(initial_wait=0.1, max_wait=30.0), rand=lambda: 0.0, on_retry=retries)
    assert retries.waits[0] >= 9.0
    assert send.times[1] >= 9.0


@pytest.mark.parametrize("throttled", [Answer(429, None, b"slow down"), Answer(429, 2.0, b""),
                                       Answer(503, 2.0, b"busy")])
def test_a_throttled_answer_uses_up_no_attempt(throttled: Answer) -> None:
    """SPEC §5: a 429 (or a 503 with Retry-After) is back-pressure, not the record's fault:
    twenty of them do not use up two attempts."""
    send = FakeSend(*[throttled] * 20, 200)
    outcome = run(send, RetryPolicy(max_attempts=2, initial_wait=0.1, max_wait=1.0))
    assert outcome.delivered and send.calls == 21
    assert outcome.attempts == 1


def test_a_throttled_answer_then_failures_counts_only_the_failures() -> None:
    send = FakeSend(Answer(429, 1.0, b""), 500, Answer(429, 1.0, b""), 500)
    outcome = run(send, RetryPolicy(max_attempts=2, initial_wait=0.1, max_wait=1.0))
    assert not outcome.delivered and outcome.exhausted and outcome.attempts == 2 and send.calls == 4


def test_a_record_throttled_past_max_throttled_ends_as_throttled() -> None:
    send = FakeSend(Answer(429, 5.0, b"slow down"))
    clock = Clock()
    outcome = run(send, RetryPolicy(max_attempts=2, initial_wait=0.1, max_wait=1.0, max_throttled=60.0),
                  clock)
    assert not outcome.delivered and not outcome.exhausted
    assert outcome.reason.startswith("throttled for 60 s") and outcome.status == 429
    assert 60.0 <= clock.seconds() < 66.0 and send.calls == 13


def test_cancelled_abandons_instead_of_retrying() -> None:
    send = FakeSend(503, 200)
    clock = Clock()
    d = start(send, RetryPolicy(), clock, cancelled=lambda: True)
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(CancelledError)
    assert send.calls == 1
    assert not clock.getDelayedCalls()


def test_cancelled_does_not_stop_a_success() -> None:
    outcome = run(FakeSend(200), RetryPolicy(), cancelled=lambda: True)
    assert outcome.delivered


def test_cancelling_deliver_during_a_wait_abandons_it() -> None:
    send = FakeSend(503, 200)
    clock = Clock()
    d = start(send, RetryPolicy(initial_wait=5.0), clock)
    failures: list[Any] = []
    d.addErrback(failures.append)
    clock.advance(1.0)
    assert not failures and clock.getDelayedCalls()
    d.cancel()
    assert failures and failures[0].check(CancelledError)
    assert not clock.getDelayedCalls()
    clock.advance(100)
    assert send.calls == 1


def test_cancelling_deliver_during_a_request_cancels_the_request() -> None:
    pending: list[Deferred[Answer]] = []

    def send() -> Deferred[Answer]:
        d: Deferred[Answer] = Deferred()
        pending.append(d)
        return d

    clock = Clock()
    d = Deferred.fromCoroutine(deliver(send, RetryPolicy(), clock))
    failures: list[Any] = []
    d.addErrback(failures.append)
    d.cancel()
    assert pending[0].called
    assert failures and failures[0].check(CancelledError)
    assert not clock.getDelayedCalls()


# -- HTTPSender against a loopback twisted.web server ----------------------------------------


class Endpoint(Resource):
    """Answers by path: /ok, /echo, /busy, /date, /flaky, /missing, /big, /hang (never answers)."""

    isLeaf = True

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.seen: list[tuple[bytes, bytes, dict[bytes, list[bytes]], bytes]] = []
        self.hanging: list[Any] = []
        self.flaky = 0

    def render(self, request: Any) -> bytes | int:
        body = request.content.read()
        headers = {k.lower(): v for k, v in request.requestHeaders.getAllRawHeaders()}
        self.seen.append((request.method, request.uri, headers, body))
        path = request.path
        if path == b"/ok":
            return b"fine"
        if path == b"/echo":
            request.setResponseCode(201)
            return body
        if path == b"/busy":
            request.setResponseCode(503)
            request.setHeader(b"Retry-After", b"7")
            return b"busy"
        if path == b"/date":
            request.setResponseCode(429)
            request.setHeader(b"Retry-After", formatdate(self.reactor.seconds() + 10, usegmt=True).encode())
            return b"later"
        if path == b"/flaky":
            self.flaky += 1
            request.setResponseCode(200 if self.flaky > 2 else 503)
            return b"flaky"
        if path == b"/missing":
            request.setResponseCode(404)
            return b"nope"
        if path == b"/big":
            return b"x" * 5000
        if path == b"/hang":
            self.hanging.append(request)
            return NOT_DONE_YET
        if path == b"/stall":
            # Headers and the start of the body, then nothing more.
            self.hanging.append(request)
            request.setHeader(b"Content-Length", b"1000")
            request.write(b"partial")
            return NOT_DONE_YET
        request.setResponseCode(500)
        return b"unexpected path"


class TrackingSite(Site):
    """A Site that knows its open connections, so a test can wait until all are closed."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.open: set[Any] = set()

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        lost = protocol.connectionLost

        def connection_lost(reason: Failure) -> None:
            self.open.discard(protocol)
            lost(reason)

        protocol.connectionLost = connection_lost
        self.open.add(protocol)
        return protocol


class Server:
    """A loopback twisted.web server and an HTTPSender talking to it."""

    def __init__(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.endpoint = Endpoint(reactor)
        self.site = TrackingSite(self.endpoint)
        self.port: Any = None
        self.sender = HTTPSender(reactor)

    async def start(self) -> Server:
        from twisted.internet.endpoints import serverFromString

        self.port = await serverFromString(self.reactor, "tcp:0:interface=127.0.0.1").listen(self.site)
        self.sender.startService()
        return self

    def url(self, path: str) -> bytes:
        return f"http://127.0.0.1:{self.port.getHost().port}{path}".encode()

    def get(self, path: str) -> Outgoing:
        return Outgoing(b"GET", self.url(path), {}, None)

    async def sleep(self, seconds: float) -> None:
        await deferLater(self.reactor, seconds, lambda: None)

    async def close(self) -> None:
        await self.sender.stopService()
        await self.port.stopListening()
        deadline = time.monotonic() + 5
        while self.site.open and time.monotonic() < deadline:
            await self.sleep(0.01)
        assert not self.site.open, "server connections still open"


async def with_server(test: Callable[[Server], Any]) -> None:
    """Run ``test`` against a fresh server, always closing it."""
    server = await Server().start()
    try:
        await test(server)
    finally:
        await server.close()


@pytest_twisted.ensureDeferred
async def test_sender_gets_a_200_with_its_body() -> None:
    async def test(server: Server) -> None:
        answer = await server.sender.send(server.get("/ok"), timeout=5)
        assert answer == Answer(200, None, b"fine")
        # The connection is reused for the next request.
        again = await server.sender.send(server.get("/ok"), timeout=5)
        assert again.status == 200
        assert len(server.endpoint.seen) == 2

    await with_server(test)


@pytest_twisted.ensureDeferred
async def test_sender_sends_method_url_headers_and_body() -> None:
    async def test(server: Server) -> None:
        request = Outgoing(b"POST", server.url("/echo?a=1&b=x%20y"),
                           {b"Content-Type": [b"application/json"], b"X-Api-Key": [b"k-1"]},
                           '{"name":"Zoë"}'.encode())
        answer = await server.sender.send(request, timeout=5)
        assert answer.status == 201
        assert answer.body == '{"name":"Zoë"}'.encode()
        [(method, uri, headers, body)] = server.endpoint.seen
        assert method == b"POST"
        assert uri == b"/echo?a=1&b=x%20y"
        assert headers[b"content-type"] == [b"application/json"]
        assert headers[b"x-api-key"] == [b"k-1"]
        assert headers[b"content-length"] == [str(len(body)).encode()]
        assert body == '{"name":"Zoë"}'.encode()

    await with_server(test)


@pytest_twisted.ensureDeferred
async def test_sender_reads_retry_after_seconds() -> None:
    async def test(server: Server) -> None:
        answer = await server.sender.send(server.get("/busy"), timeout=5)
        assert answer.status == 503
        assert answer.retry_after == 7.0
        assert answer.body == b"busy"

    await with_server(test)


@pytest_twisted.ensureDeferred
async def test_sender_reads_retry_after_as_an_http_date() -> None:
    async def test(server: Server) -> None:
        answer = await server.sender.send(server.get("/date"), timeout=5)
        assert answer.status == 429
        assert answer.retry_after is not None
        assert 7.0 <= answer.retry_after <= 10.5

    await with_server(test)


@pytest_twisted.ensureDeferred
async def test_sender_gets_a_404() -> None:
    async def test(server: Server) -> None:
        answer = await server.sender.send(server.get("/missing"), timeout=5)
        assert answer == Answer(404, None, b"nope")

    await with_server(test)


@pytest_twisted.ensureDeferred
async def test_sender_keeps_only_the_start_of_a_long_body() -> None:
    async def test(server: Server) -> None:
        answer = await server.sender.send(server.get("/big"), timeout=5)
        assert answer.status == 200
        # Only the start of the body is kept (it is for logs and dead-letter reasons).
        assert 0 < len(answer.body) < 5000
        assert answer.body == b"x" * len(answer.body)

    await with_server(test)


@pytest_twisted.ensureDeferred
async def test_sender_times_out_when_the_server_never_answers() -> None:
    async def test(server: Server) -> None:
        began = time.monotonic()
        # Before any header came: Twisted's agent fails the cancelled request with
        # ResponseNeverReceived, yet the time limit was what ended it (SPEC §4 "every
        # request has a timeout"), as Deferred.addTimeout would say.
        with pytest.raises(DeferredTimeoutError) as caught:
            await server.sender.send(server.get("/hang"), timeout=0.3)
        elapsed = time.monotonic() - began
        assert elapsed >= 0.25, "given up before its time limit"
        assert len(server.endpoint.hanging) == 1

        # deliver() treats that failure as a timeout worth retrying.
        error = caught.value
        retried: list[str] = []
        outcome = await Deferred.fromCoroutine(deliver(
            lambda: fail(error), RetryPolicy(max_attempts=2, initial_wait=0.01, max_wait=0.01),
            server.reactor, on_retry=lambda a, reason, w: retried.append(reason)))
        assert not outcome.delivered
        assert outcome.status is None
        assert outcome.reason == "retries exhausted after 2 attempts; last: TimeoutError: timed out"
        assert retried == ["TimeoutError: timed out"]

    await with_server(test)


@pytest_twisted.ensureDeferred
async def test_deliver_retries_a_hanging_server_through_the_sender() -> None:
    async def test(server: Server) -> None:
        began = time.monotonic()
        outcome = await Deferred.fromCoroutine(deliver(
            lambda: server.sender.send(server.get("/hang"), timeout=0.2),
            RetryPolicy(max_attempts=3, initial_wait=0.05, max_wait=0.05), server.reactor))
        assert not outcome.delivered
        assert outcome.attempts == 3
        assert outcome.status is None
        assert "retries exhausted" in outcome.reason
        assert len(server.endpoint.hanging) == 3
        assert time.monotonic() - began >= 0.6

    await with_server(test)


@pytest_twisted.ensureDeferred
async def test_deliver_through_the_sender_stops_on_404_and_retries_503() -> None:
    async def test(server: Server) -> None:
        outcome = await Deferred.fromCoroutine(deliver(
            lambda: server.sender.send(server.get("/missing"), timeout=5), RetryPolicy(), server.reactor))
        assert (outcome.delivered, outcome.attempts, outcome.status) == (False, 1, 404)
        assert "nope" in outcome.reason

        retries = Retries()
        outcome = await Deferred.fromCoroutine(deliver(
            lambda: server.sender.send(server.get("/flaky"), timeout=5),
            RetryPolicy(initial_wait=0.02, max_wait=0.05), server.reactor, on_retry=retries))
        assert (outcome.delivered, outcome.attempts, outcome.status) == (True, 3, 200)
        assert [(attempt, reason) for attempt, reason, _ in retries.told] == \
            [(1, "HTTP 503: flaky"), (2, "HTTP 503: flaky")]

    await with_server(test)


@pytest_twisted.ensureDeferred
async def test_sender_timeout_during_the_body_closes_the_connection() -> None:
    async def test(server: Server) -> None:
        with pytest.raises(DeferredTimeoutError):
            await server.sender.send(server.get("/stall"), timeout=0.3)
        deadline = time.monotonic() + 3
        while server.site.open and time.monotonic() < deadline:
            await server.sleep(0.02)
        assert not server.site.open, "the stalled connection was left open"

    await with_server(test)


def test_a_request_cancelled_at_its_deadline_fails_with_a_timeout_whatever_the_cancel_raised() -> None:
    """Twisted's agent fails a request cancelled before its headers with ResponseNeverReceived
    and one cancelled while connecting with ConnectingCancelledError; one waiting on another
    Deferred (its body) fails as that one does. Cancelled at the deadline, each fails with
    twisted's TimeoutError; cancelled by its owner, each keeps its own failure."""
    from restconsumer.delivery.sender import _Deadlines

    def never_received(d: Deferred[Any]) -> None:
        d.errback(ResponseNeverReceived([Failure(CancelledError())]))

    def connecting(d: Deferred[Any]) -> None:
        d.errback(ConnectingCancelledError(("127.0.0.1", 1)))

    def waiting_on_a_body() -> Deferred[Any]:
        body: Deferred[Any] = Deferred(never_received)
        d: Deferred[Any] = Deferred()
        d.addCallback(lambda _: body)
        return d

    for owner_cancels in (False, True):
        clock = Clock()
        deadlines = _Deadlines(clock)
        made = [Deferred(never_received), Deferred(connecting), waiting_on_a_body()]
        failures: list[Failure] = []
        for d in made:
            deadlines.add(d, 5).addErrback(failures.append)
        made[2].callback("headers")  # now it waits on its body
        clock.advance(4.9)
        assert failures == []
        if owner_cancels:
            for d in made:
                d.cancel()
        clock.advance(0.1)
        expected = [ResponseNeverReceived, ConnectingCancelledError, ResponseNeverReceived] \
            if owner_cancels else [DeferredTimeoutError] * 3
        assert [type(f.value) for f in failures] == expected
        assert clock.getDelayedCalls() == [] and deadlines._limits == {} and not deadlines._timed_out


def test_request_time_limits_are_kept_by_one_timer() -> None:
    """The sender's time limits: each request is cancelled at its own deadline and then fails
    with TimeoutError; one that fired first is left alone; a cancel from elsewhere stays a
    CancelledError; a shorter limit added later still fires first; one timer at a time."""
    from restconsumer.delivery.sender import _Deadlines

    clock = Clock()
    deadlines = _Deadlines(clock)
    results: dict[str, list[Any]] = {}

    def start(name: str, timeout: float) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        deadlines.add(d, timeout)
        d.addBoth(results.setdefault(name, []).append)
        return d

    a = start("a", 10)
    clock.advance(4)
    start("b", 10)          # due at 14
    c = start("c", 10)      # due at 14, cancelled by someone else first
    start("d", 3)           # due at 7: earlier than a's 10
    assert len(clock.getDelayedCalls()) == 1
    a.callback("answer")    # before its deadline
    clock.advance(2.9)
    assert results["d"] == []
    clock.advance(0.1)      # 7
    [d_failure] = results["d"]
    assert isinstance(d_failure.value, DeferredTimeoutError)
    results_c = results["c"]
    assert results_c == []
    # c is cancelled by its owner: not a timeout.
    c.cancel()
    assert isinstance(results_c[0].value, CancelledError)
    assert not isinstance(results_c[0].value, DeferredTimeoutError)
    clock.advance(6.9)      # 13.9
    assert results["b"] == []
    clock.advance(0.1)      # 14
    assert isinstance(results["b"][0].value, DeferredTimeoutError)
    assert results["a"] == ["answer"]
    assert clock.getDelayedCalls() == [] and deadlines._limits == {} and not deadlines._timed_out


@pytest.mark.parametrize(("connections", "kept"), [(0, 32), (40, 40)])
@pytest_twisted.ensureDeferred
async def test_connections_kept_follow_the_limit(connections: int, kept: int) -> None:
    """SPEC §11: a job with 40 requests under way keeps 40 connections open between them
    (the pool's default keeps 32 and closes the rest as they come back)."""
    async def test(server: Server) -> None:
        sends = [server.sender.send(server.get("/ok"), timeout=5, connections=connections) for _ in range(40)]
        answers = await gatherResults(sends)
        assert all(a.status == 200 for a in answers)
        assert len(server.site.open) <= 40
        deadline = time.monotonic() + 5
        while len(server.site.open) > kept and time.monotonic() < deadline:
            await server.sleep(0.01)
        await server.sleep(0.1)
        assert len(server.site.open) == kept

    await with_server(test)
