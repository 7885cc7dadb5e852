"""The HTTP client of the delivery path: one request out, its :class:`Answer` back.

:class:`HTTPSender` issues requests over persistent connection pools, HTTPS always
verified, redirects followed only when a job asks. It uses Twisted's ``Agent`` (on which
treq is built) directly: the request builder has already built and encoded the URL, and
treq's per-request URL parsing and wrapping cost a third of the throughput here
(``bench/run.py`` keeps that measured).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urljoin

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.application.service import Service
from twisted.internet import ssl
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from restconsumer.base.pem import read_certificates, system_certificates
from restconsumer.base.types import Answer, DestinationRefused, Outgoing
from restconsumer.base.urls import host_of, origin
from restconsumer.delivery.agent import OriginAgent
from restconsumer.delivery.guard import CheckedEndpoint
from restconsumer.jobs.destinations import Destinations
from restconsumer.jobs.secrets import is_secret_header

__all__ = ["Answer", "DestinationRefused", "HTTPSender"]

log = Logger()


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

    def __init__(self, reactor: Any, tls: IPolicyForHTTPS, connect_timeout: float = 10.0,
                 granted: Destinations | None = None) -> None:
        self._reactor = reactor
        self._tls = tls
        self._timeout = connect_timeout
        self._granted = granted
        self._cache: dict[tuple[bytes, bytes, int], Any] = {}

    def endpointForURI(self, uri: Any) -> Any:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._cache.get(key)
        if endpoint is None:
            host = uri.host.decode("ascii")
            if uri.scheme not in (b"http", b"https"):
                raise ValueError(f"unsupported scheme {uri.scheme!r}")
            tls = self._tls.creatorForNetloc(uri.host, uri.port) if uri.scheme == b"https" else None
            if self._granted is not None:
                # A limited owner's job: connected to checked addresses only (SPEC §8).
                endpoint = CheckedEndpoint(self._reactor, host, uri.port, self._granted,
                                           timeout=self._timeout, tls=tls)
            else:
                endpoint = _connect_to(self._reactor, host, uri.port, self._timeout)
                if tls is not None:
                    endpoint = wrapClientTLS(tls, endpoint)
            if len(self._cache) > 1000:
                self._cache.clear()
            self._cache[key] = endpoint
        return endpoint


def _connect_to(reactor: Any, host: str, port: int, timeout: float) -> Any:
    """An endpoint for a host: an IP literal is connected to straight away (no name lookup,
    no happy-eyeballs delay before a refused connection fails)."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    if address.version == 6:
        return TCP6ClientEndpoint(reactor, str(address), port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, str(address), port, timeout=timeout)


class _Deadlines:
    """The time limits of the requests under way, kept by one timer instead of one each.

    What ``Deferred.addTimeout`` does (cancel at the deadline; the failure of that cancel
    becomes a ``twisted.internet.defer.TimeoutError``), without a ``DelayedCall`` made and
    cancelled per request. Unlike ``addTimeout``, every failure of a request cancelled at
    its deadline becomes the ``TimeoutError``, not only a bare ``CancelledError``: Twisted's
    agent fails a request cancelled before its headers came with ``ResponseNeverReceived``
    and one cancelled while connecting with ``ConnectingCancelledError``, yet it was its
    time limit that ended each. Requests of one time limit end their time in the order they were sent,
    so the oldest of each limit is the next due: the timer is set for the earliest of
    those and, when it fires, cancels what is due and is set again.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        #: Per time limit: what is under way, oldest first (key -> deadline, Deferred).
        self._limits: dict[float, dict[int, tuple[float, Deferred[Any]]]] = {}
        self._timed_out: set[int] = set()
        self._next = 0
        self._timer: Any = None

    def add(self, d: Deferred[Any], timeout: float) -> Deferred[Any]:
        """Cancel ``d`` if it has not fired in ``timeout`` seconds (then it fails with
        ``TimeoutError``); ``d``, for chaining."""
        key = self._next = self._next + 1
        deadline = self._clock.seconds() + timeout
        under_way = self._limits.get(timeout)
        if under_way is None:
            under_way = self._limits[timeout] = {}
        under_way[key] = (deadline, d)
        timer = self._timer
        if timer is None or not timer.active():
            self._timer = self._clock.callLater(timeout, self._expire)
        elif deadline < timer.getTime():
            timer.reset(timeout)
        return d.addBoth(self._ended, under_way, key, timeout)

    def _ended(self, result: Any, under_way: dict[int, Any], key: int, timeout: float) -> Any:
        under_way.pop(key, None)
        if self._timed_out and key in self._timed_out:
            self._timed_out.discard(key)
            if isinstance(result, Failure):
                # Whatever the cancel made of it (see the class), its time was up.
                return Failure(DeferredTimeout(timeout, "Deferred"))
        return result

    def _expire(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        due: list[tuple[int, Deferred[Any]]] = []
        earliest: float | None = None
        for limit, under_way in list(self._limits.items()):
            first = len(due)
            following = None
            for key, (deadline, d) in under_way.items():
                if deadline > now:
                    following = deadline
                    break
                due.append((key, d))
            for key, _ in due[first:]:
                del under_way[key]
            if following is None:
                del self._limits[limit]
            elif earliest is None or following < earliest:
                earliest = following
        for key, d in due:
            # A Deferred waiting on another one (the response) has "called" set: cancel
            # reaches what it waits on, as addTimeout's would.
            self._timed_out.add(key)
            d.cancel()
        if earliest is not None:
            timer = self._timer  # one a cancel's callbacks may have set, sending again
            if timer is None:
                self._timer = self._clock.callLater(max(0.0, earliest - now), self._expire)
            elif earliest < timer.getTime():
                timer.reset(max(0.0, earliest - now))


_REDIRECTS = (301, 302, 303, 307, 308)
#: Connection pools kept for jobs' own ``ca_cert`` trusts at once.
MAX_ROUTES = 64
_MAX_HOPS = 10


#: The route of requests with neither a job's ca_cert nor an owner's limits.
_PLAIN: tuple[None, None] = (None, None)


@dataclass
class _Route:
    """The pool and agent of one trust setting."""

    pool: HTTPConnectionPool
    agent: IAgent


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
                 allow_hosts: frozenset[str] | None = None, per_host: int = 32,
                 agent: IAgent | None = None) -> None:
        self._reactor = reactor
        #: An agent given in place of the pooled ones (tests: an in-memory endpoint).
        self._agent = agent
        self._per_host = per_host
        self._allow_hosts = allow_hosts
        #: The certificates of --ca-file, trusted instead of the system's CAs.
        self._base: list[ssl.Certificate] | None = None
        self._system: list[ssl.Certificate] | None = None
        if ca_file:
            with open(ca_file, "rb") as f:
                self._base = _certificates(f.read())
        #: How HTTPS servers are checked: the system's CAs, or ``--ca-file``'s (the Schema
        #: Registry client checks its server so too).
        trust = ssl.platformTrust() if self._base is None else ssl.trustRootFromCertificates(self._base)
        self.tls_policy: IPolicyForHTTPS = BrowserLikePolicyForHTTPS(trust)
        self._trust = trust
        #: A pool per trust setting and owner's destinations: (ca_cert, granted).
        self._routes: dict[tuple[str | None, Destinations | None], _Route] = {_PLAIN: self._route(trust)}
        self._headers: dict[int, tuple[dict[bytes, list[bytes]], Headers]] = {}
        self._deadlines = _Deadlines(reactor)

    def _trusted(self) -> list[ssl.Certificate]:
        """The CAs every request trusts: ``--ca-file``'s, else the system's (read once, when
        a job's ``ca_cert`` is to be trusted besides them)."""
        if self._base is not None:
            return self._base
        if self._system is None:
            self._system = _certificates_of(system_certificates())
        return self._system

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

    def _route(self, trust: Any, granted: Destinations | None = None) -> _Route:
        pool = HTTPConnectionPool(self._reactor, persistent=True)
        pool.maxPersistentPerHost = self._per_host
        pool.retryAutomatically = False
        endpoints = _Endpoints(self._reactor, BrowserLikePolicyForHTTPS(trust), granted=granted)
        agent: IAgent = self._agent or OriginAgent.over(self._reactor, endpoints, pool)
        return _Route(pool, agent)

    def agent(self, granted: Destinations | None = None) -> IAgent:
        """The agent of the plain route, or of ``granted``'s (a limited owner's checked
        connections), for requests made elsewhere (the OAuth2 token endpoint)."""
        key = (None, granted)
        route = self._routes.get(key)
        if route is None:
            route = self._routes[key] = self._route(self._trust, granted)
        return route.agent

    def stopService(self) -> Deferred[Any]:
        """Close the pooled connections."""
        super().stopService()
        return DeferredList([r.pool.closeCachedConnections() for r in self._routes.values()])

    def send(self, request: Outgoing, timeout: float, follow_redirects: bool = False,
             ca_cert: str | None = None, keep: int = 500,
             granted: Destinations | None = None, connections: int = 0) -> Deferred[Answer]:
        """Send one request; fires with the :class:`Answer` (the first ``keep`` bytes of its
        body), fails on network errors. ``granted``: the request is a limited owner's,
        sent to public addresses and those granted only (:class:`DestinationRefused`).
        ``connections``: how many the sending job may have under way (its concurrency
        limit): the pool keeps at least that many per endpoint open between requests."""
        if self._allow_hosts is not None:
            host = host_of(request.url)
            if host not in self._allow_hosts:
                # Checked at send time too: a job stored before the allowlist, or by another
                # instance, sends nothing outside it.
                return fail(DestinationRefused(f"host {host!r} is not an allowed host (--allow-hosts)"))
        routes = self._routes
        key = (ca_cert, granted)
        route = routes.get(key)
        if route is None:
            trust = self._trust
            if ca_cert is not None:
                try:
                    # A job's CAs are trusted besides the system's (or --ca-file's), not instead.
                    trust = ssl.trustRootFromCertificates(
                        self._trusted() + _certificates(ca_cert.encode("ascii")))
                except Exception as e:  # a PEM cryptography read but pyOpenSSL will not
                    return fail(DestinationRefused(f"the job's ca_cert cannot be used: {e}"))
            route = routes[key] = self._route(trust, granted)
            if len(routes) > MAX_ROUTES:
                # The route least recently used goes (its idle connections closed; requests
                # under way end on theirs): edited ca_certs add no pool for ever.
                stale = next(k for k in routes if k != _PLAIN)
                routes.pop(stale).pool.closeCachedConnections()
        elif key != _PLAIN:
            routes[key] = routes.pop(key)  # the most recently used last
        if connections > route.pool.maxPersistentPerHost:
            # Connections kept follow the limit (SPEC §11): a job at 200 in flight would
            # otherwise open and close 168 of them per round.
            route.pool.maxPersistentPerHost = connections
        if follow_redirects:
            d = Deferred.fromCoroutine(self._follow(route.agent, request, keep))
        else:
            body = _Body(request.body) if request.body is not None else None
            headers = Headers(request.headers) if request.own_headers else \
                self._headers_of(request.headers)
            sent = route.agent.request(request.method, request.url, headers, body)
            d = sent.addCallback(self._answer, keep)  # type: ignore[call-overload]  # keep passes through
        return self._deadlines.add(d, timeout)

    def _answer(self, response: IResponse, keep: int = 500) -> Deferred[Answer]:
        retry_after = _retry_after(response, self._reactor)
        return _read_body(response, keep).addCallback(lambda data: Answer(response.code, retry_after, data))

    async def _follow(self, agent: IAgent, request: Outgoing, keep: int = 500) -> Answer:
        method, url, body = request.method, request.url, request.body
        # Agent works out Host for each hop.
        headers = {k: list(v) for k, v in request.headers.items() if k.lower() != b"host"}
        for hop in range(_MAX_HOPS + 1):
            producer = _Body(body) if body is not None else None
            response = await agent.request(method, url, Headers(headers), producer)
            location = response.headers.getRawHeaders(b"Location")
            if response.code not in _REDIRECTS or not location or hop == _MAX_HOPS:
                return await self._answer(response, keep)
            await _read_body(response)  # so that the connection can be reused
            target = urljoin(url.decode("ascii", "replace"), location[0].decode("latin-1")).encode()
            scheme, host, _ = origin(target)
            if scheme not in ("http", "https"):
                raise DestinationRefused(f"redirect to a {scheme!r} URL")
            if self._allow_hosts is not None and host not in self._allow_hosts:
                raise DestinationRefused(f"redirect to {host!r}, which is not an allowed host")
            if origin(target) != origin(url):
                headers = {k: v for k, v in headers.items()
                           if not is_secret_header(k.decode("latin-1"))}
            if response.code in (301, 302, 303) and method not in (b"GET", b"HEAD"):
                method, body = b"GET", None
                headers.pop(b"Content-Type", None)
            url = target
        raise AssertionError("unreachable")


def _certificates(pem: bytes) -> list[ssl.Certificate]:
    return _certificates_of(read_certificates(pem))


def _certificates_of(certificates: list[x509.Certificate]) -> list[ssl.Certificate]:
    return [ssl.Certificate.loadPEM(c.public_bytes(Encoding.PEM)) for c in certificates]


class _BodyReader(Protocol):
    """Reads a whole response body (so the connection can be reused), keeping its start."""

    keep = 500

    def __init__(self, done: Deferred[bytes], keep: int = 500) -> None:
        self.done = done
        self.keep = keep
        self.data = bytearray()

    def dataReceived(self, data: bytes) -> None:
        if len(self.data) < self.keep:
            self.data += data[: self.keep - len(self.data)]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            self.done.callback(bytes(self.data))
        else:
            self.done.errback(reason)


def _read_body(response: IResponse, keep: int = 500) -> Deferred[bytes]:
    """The start of the body; cancelling it closes the connection (a stalled body)."""
    reader: _BodyReader

    def cancel(_: Deferred[bytes]) -> None:
        # The body's transport is a push producer: stopping it drops the connection.
        if reader.transport is not None:
            reader.transport.stopProducing()  # type: ignore[attr-defined]  # a producer, untyped

    done: Deferred[bytes] = Deferred(cancel)
    reader = _BodyReader(done, keep)
    response.deliverBody(reader)
    return done
