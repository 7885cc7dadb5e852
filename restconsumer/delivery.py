"""Delivery policy (SPEC §5): send a request, retry what may succeed later, dead-letter the rest.

:class:`HTTPSender` issues requests over one persistent connection pool;
:func:`deliver` applies the retry policy of a job to one request; :class:`DeadLetters`
produces what can never be delivered to the job's dead-letter topic, acknowledged by Kafka.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urljoin, urlsplit

from confluent_kafka import KafkaError, Producer
from twisted.application.service import Service
from twisted.internet import ssl
from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionLost,
    DNSLookupError,
    TimeoutError,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from restconsumer.mapping import Outgoing
from restconsumer.model import is_secret_header
from restconsumer.threads import ThreadService

__all__ = [
    "Answer",
    "DeadLetters",
    "DestinationRefused",
    "HTTPSender",
    "Outcome",
    "RetryPolicy",
    "deliver",
    "is_retryable_status",
]

log = Logger()

_NETWORK_ERRORS = (ConnectError, ConnectingCancelledError, ConnectionLost, DNSLookupError,
                   TimeoutError, ResponseFailed, RequestTransmissionFailed, RequestNotSent,
                   CancelledError)


@implementer(IBodyProducer)
class _Body:
    """A request body already in memory, written in one go."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@dataclass(frozen=True)
class Answer:
    """What the endpoint answered: status, ``Retry-After`` seconds if any, start of the body."""

    status: int
    retry_after: float | None = None
    body: bytes = b""


def _retry_after(response: IResponse, clock: IReactorTime) -> float | None:
    values = response.headers.getRawHeaders(b"Retry-After")
    if not values:
        return None
    text = values[0].decode("latin-1").strip()
    if text.isascii() and text.isdigit():
        return float(text)
    try:
        return max(0.0, parsedate_to_datetime(text).timestamp() - clock.seconds())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """One endpoint per (scheme, host, port), made once and reused for every request.

    Agent's own factory makes a new one per request, IDNA-encoding the host each time:
    a tenth of the reactor's time when requests are small and the endpoint is near.
    """

    def __init__(self, reactor: Any, tls: IPolicyForHTTPS, connect_timeout: float = 10.0) -> None:
        self._reactor = reactor
        self._tls = tls
        self._timeout = connect_timeout
        self._cache: dict[tuple[bytes, bytes, int], Any] = {}

    def endpointForURI(self, uri: Any) -> Any:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._cache.get(key)
        if endpoint is None:
            host = uri.host.decode("ascii")
            endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
            elif uri.scheme != b"http":
                raise ValueError(f"unsupported scheme {uri.scheme!r}")
            if len(self._cache) > 1000:
                self._cache.clear()
            self._cache[key] = endpoint
        return endpoint


class DestinationRefused(Exception):
    """The request may not go where it would go (a redirect outside the allowed hosts, a
    CA that cannot be used); never retried."""


_REDIRECTS = (301, 302, 303, 307, 308)
_MAX_HOPS = 10


@dataclass
class _Route:
    """The pool and agent of one trust setting."""

    pool: HTTPConnectionPool
    agent: IAgent


def _origin(url: bytes) -> tuple[str, str, int | None]:
    parts = urlsplit(url.decode("ascii", "replace"))
    return parts.scheme, (parts.hostname or "").lower(), parts.port


class HTTPSender(Service):
    """Sends requests over persistent connection pools; HTTPS is always verified.

    Certificates are checked against the system's CAs, or ``ca_file``, or a job's own
    ``ca_cert``; each trust setting has its own pool, so a connection verified for one
    job is never reused by a job that trusts differently.

    Redirects are followed only when a job asks: 307 and 308 keep the method and body,
    301, 302 and 303 turn into a GET without body (as curl does); credentials are not
    sent on to another origin; with ``allow_hosts``, a hop outside it ends the request
    (:class:`DestinationRefused`); after 10 hops the last 3xx is the answer.

    Twisted's ``Agent`` (on which treq is built) is used directly: the URL was already built
    and encoded by the request builder, and treq's per-request URL re-parsing, cookie and
    redirect wrapping would cost a third of the throughput on this hot path.
    """

    def __init__(self, reactor: Any, *, ca_file: str | None = None,
                 allow_hosts: frozenset[str] | None = None, per_host: int = 32) -> None:
        self._reactor = reactor
        self._per_host = per_host
        self._allow_hosts = allow_hosts
        default_trust = None
        if ca_file:
            with open(ca_file, "rb") as f:
                default_trust = _trust(f.read())
        self._routes: dict[str | None, _Route] = {None: self._route(default_trust)}
        self._headers: dict[int, tuple[dict[bytes, list[bytes]], Headers]] = {}

    def _headers_of(self, raw: dict[bytes, list[bytes]]) -> Headers:
        # A job's requests share one header dict (Host included): one Headers object for
        # all of them saves building one, and Agent's copy to add Host, per request.
        cached = self._headers.get(id(raw))
        if cached is not None and cached[0] is raw:
            return cached[1]
        if len(self._headers) > 1000:
            self._headers.clear()
        headers = Headers(raw)
        self._headers[id(raw)] = (raw, headers)
        return headers

    def _route(self, trust: Any) -> _Route:
        pool = HTTPConnectionPool(self._reactor, persistent=True)
        pool.maxPersistentPerHost = self._per_host
        pool.retryAutomatically = False
        agent: IAgent = Agent.usingEndpointFactory(
            self._reactor, _Endpoints(self._reactor, BrowserLikePolicyForHTTPS(trust)), pool=pool)
        return _Route(pool, agent)

    def stopService(self) -> Deferred[Any]:
        """Close the pooled connections."""
        super().stopService()
        return DeferredList([r.pool.closeCachedConnections() for r in self._routes.values()])

    def send(self, request: Outgoing, timeout: float, follow_redirects: bool = False,
             ca_cert: str | None = None) -> Deferred[Answer]:
        """Send one request; fires with the :class:`Answer`, fails on network errors."""
        route = self._routes.get(ca_cert)
        if route is None:
            try:
                trust = _trust(ca_cert.encode("ascii"))  # type: ignore[union-attr]
            except Exception as e:  # a PEM cryptography read but pyOpenSSL will not
                return fail(DestinationRefused(f"the job's ca_cert cannot be used: {e}"))
            route = self._routes[ca_cert] = self._route(trust)
        if follow_redirects:
            d = Deferred.fromCoroutine(self._follow(route.agent, request))
        else:
            body = _Body(request.body) if request.body is not None else None
            d = route.agent.request(request.method, request.url, self._headers_of(request.headers),
                                    body)
            d.addCallback(self._answer)
        timer = self._reactor.callLater(timeout, d.cancel)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(done)

    def _answer(self, response: IResponse) -> Deferred[Answer]:
        retry_after = _retry_after(response, self._reactor)
        return _read_body(response).addCallback(lambda data: Answer(response.code, retry_after, data))

    async def _follow(self, agent: IAgent, request: Outgoing) -> Answer:
        method, url, body = request.method, request.url, request.body
        # Agent works out Host for each hop.
        headers = {k: list(v) for k, v in request.headers.items() if k.lower() != b"host"}
        for hop in range(_MAX_HOPS + 1):
            producer = _Body(body) if body is not None else None
            response = await agent.request(method, url, Headers(headers), producer)
            location = response.headers.getRawHeaders(b"Location")
            if response.code not in _REDIRECTS or not location or hop == _MAX_HOPS:
                return await self._answer(response)
            await _read_body(response)  # so that the connection can be reused
            target = urljoin(url.decode("ascii", "replace"), location[0].decode("latin-1")).encode()
            scheme, host, _ = _origin(target)
            if scheme not in ("http", "https"):
                raise DestinationRefused(f"redirect to a {scheme!r} URL")
            if self._allow_hosts is not None and host not in self._allow_hosts:
                raise DestinationRefused(f"redirect to {host!r}, which is not an allowed host")
            if _origin(target) != _origin(url):
                headers = {k: v for k, v in headers.items()
                           if not is_secret_header(k.decode("latin-1"))}
            if response.code in (301, 302, 303) and method not in (b"GET", b"HEAD"):
                method, body = b"GET", None
                headers.pop(b"Content-Type", None)
            url = target
        raise AssertionError("unreachable")


def _trust(pem: bytes) -> Any:
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(c) for c in _split_pem(pem)])


class _BodyReader(Protocol):
    """Reads a whole response body (so the connection can be reused), keeping its start."""

    keep = 500

    def __init__(self, done: Deferred[bytes]) -> None:
        self.done = done
        self.data = bytearray()

    def dataReceived(self, data: bytes) -> None:
        if len(self.data) < self.keep:
            self.data += data[: self.keep - len(self.data)]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(bytes(self.data))
        else:
            self.done.errback(reason)


def _read_body(response: IResponse) -> Deferred[bytes]:
    """The start of the body; cancelling it closes the connection (a stalled body)."""
    reader: _BodyReader

    def cancel(_: Deferred[bytes]) -> None:
        # The body's transport is a push producer: stopping it drops the connection.
        if reader.transport is not None:
            reader.transport.stopProducing()

    done: Deferred[bytes] = Deferred(cancel)
    reader = _BodyReader(done)
    response.deliverBody(reader)
    return done


def _split_pem(data: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    return [part + marker for part in data.split(marker) if b"BEGIN CERTIFICATE" in part]


def is_retryable_status(status: int) -> bool:
    """Whether an HTTP status may succeed later: 408, 429 and 5xx."""
    return status in (408, 429) or status >= 500


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, capped; ``max_attempts`` 0 means no limit."""

    max_attempts: int = 8
    initial_wait: float = 1.0
    max_wait: float = 30.0

    @classmethod
    def of(cls, settings: dict[str, float]) -> RetryPolicy:
        """The policy of a job's merged ``retry`` settings."""
        return cls(int(settings["max_attempts"]), float(settings["initial_wait"]),
                   float(settings["max_wait"]))

    def wait(self, attempt: int, retry_after: float | None, rand: Callable[[], float]) -> float:
        """Seconds before attempt ``attempt + 1``, after ``attempt`` failed ones."""
        ceiling = min(self.max_wait, self.initial_wait * (2 ** min(attempt - 1, 30)))
        # Within 20 % below the doubling schedule: instances do not retry in step, and
        # the default policy still spans its ~1.5 minutes of waits.
        wait = ceiling * (0.8 + 0.2 * rand())
        if retry_after is not None:
            wait = max(wait, min(retry_after, max(self.max_wait, retry_after)))
        return wait

    def exhausted(self, attempts: int) -> bool:
        """Whether no attempt is left after ``attempts``."""
        return self.max_attempts != 0 and attempts >= self.max_attempts


@dataclass
class Outcome:
    """How one request ended: delivered, or to be dead-lettered with the reason."""

    delivered: bool
    attempts: int
    status: int | None
    reason: str
    retried: int = 0
    waits: list[float] = field(default_factory=list)


async def deliver(send: Callable[[], Deferred[Answer]], policy: RetryPolicy, clock: IReactorTime,
                  *, on_retry: Callable[[int, str, float], None] | None = None,
                  cancelled: Callable[[], bool] = lambda: False,
                  rand: Callable[[], float] = random.random,
                  sleeping: Callable[[Deferred[None] | None], None] | None = None) -> Outcome:
    """Send until it succeeds (2xx), cannot succeed (other 4xx/3xx), or the attempts run out.

    ``on_retry(attempt, reason, wait)`` is told of each retry; ``cancelled()`` ends the
    retrying early (the job is stopping), and ``sleeping`` is handed each wait so that
    the caller can cancel it.
    """
    attempts = 0
    waits: list[float] = []
    while True:
        attempts += 1
        status: int | None = None
        retry_after = None
        try:
            answer = await send()
        except DestinationRefused as e:
            return Outcome(False, attempts, None, str(e), attempts - 1, waits)
        except _NETWORK_ERRORS as e:
            reason = f"{type(e).__name__}: {_describe(e)}"
        else:
            status = answer.status
            if 200 <= status < 300:
                return Outcome(True, attempts, status, "delivered", attempts - 1, waits)
            reason = f"HTTP {status}: {answer.body[:200].decode('utf-8', 'replace')}".strip()
            if not is_retryable_status(status):
                return Outcome(False, attempts, status, reason, attempts - 1, waits)
            retry_after = answer.retry_after
        if policy.exhausted(attempts) or cancelled():
            why = "retries exhausted" if policy.exhausted(attempts) else "job stopped"
            return Outcome(False, attempts, status, f"{why} after {attempts} attempts; last: {reason}",
                           attempts - 1, waits)
        wait = policy.wait(attempts, retry_after, rand)
        waits.append(wait)
        if on_retry is not None:
            on_retry(attempts, reason, wait)
        pause = deferLater(clock, wait, lambda: None)
        if sleeping is not None:
            sleeping(pause)
        try:
            await pause
        except CancelledError:
            return Outcome(False, attempts, status, f"job stopped while waiting to retry; last: {reason}",
                           attempts - 1, waits)
        finally:
            if sleeping is not None:
                sleeping(None)


def _describe(e: BaseException) -> str:
    if isinstance(e, (ResponseFailed, RequestTransmissionFailed)):
        return "; ".join(str(r.value) for r in e.reasons) or "response failed"
    if isinstance(e, CancelledError):
        return "timed out"
    return str(e) or type(e).__name__


class DeadLetters(ThreadService):
    """Produces dead letters to Kafka; each send fires once Kafka has acknowledged it.

    The producer's delivery reports are served by a thread of its own.
    """

    def __init__(self, reactor: Any, config: dict[str, Any]) -> None:
        super().__init__(reactor, "dead-letters")
        self._config = {**config, "acks": "all", "linger.ms": 5, "enable.idempotence": True}
        self._producer: Producer | None = None
        self._polling = False
        self._loop: Deferred[None] | None = None

    def startService(self) -> None:
        """Create the producer and start serving its delivery reports."""
        super().startService()
        self._producer = Producer(self._config)
        self._polling = True
        self._loop = self.in_thread(self._serve)

    def _serve(self) -> None:
        assert self._producer is not None
        while self._polling:
            self._producer.poll(0.2)
        self._producer.flush(10)

    def stopService(self) -> Deferred[None]:
        """Flush what is queued, then stop the thread."""
        Service.stopService(self)  # the thread stops below, once its loop has flushed
        self._polling = False
        d = self._loop if self._loop is not None else succeed(None)
        return d.addBoth(lambda _: self._stop_thread())

    def send(self, topic: str, key: bytes | None, value: bytes | None,
             headers: list[tuple[str, bytes]]) -> Deferred[None]:
        """Produce one dead letter; fires when Kafka has it, fails with the Kafka error."""
        done: Deferred[None] = Deferred()

        def report(err: KafkaError | None, _msg: Any) -> None:
            # Runs on the delivery-report thread.
            if err is None:
                self._reactor.callFromThread(done.callback, None)
            else:
                self._reactor.callFromThread(done.errback, Failure(RuntimeError(str(err))))

        if self._producer is None:
            return fail(RuntimeError("dead letters are not running"))
        try:
            self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=report)
        except Exception as e:  # BufferError when the queue is full, KafkaException otherwise
            return fail(RuntimeError(f"cannot produce to {topic}: {e}"))
        return done
