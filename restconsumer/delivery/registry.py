"""Confluent Schema Registry (SPEC §12): the schemas of wire-format messages, fetched and cached.

:class:`SchemaCache` is plain data, no Twisted: the jobs' Kafka threads read it while they
decode (:func:`restconsumer.jobs.decode.decode`). :class:`SchemaRegistry` fills it on the reactor:
``GET {url}/schemas/ids/{id}`` with treq, once per id however many records wait for it. An id
the registry does not know (404, error code 40403) is a bad message: its records are
dead-lettered, and the id is asked again a minute later (it may have been registered since).
A registry that cannot be reached, does not answer in time, or answers anything else
(5xx, 401, …) is an outage (:class:`RegistryUnavailable`): the job's circuit holds its records.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import fastavro
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from restconsumer.base.threads import ThreadService
from restconsumer.base.types import USER_AGENT
from restconsumer.delivery.retry import Unavailable
from restconsumer.jobs.decode import UnknownSchema, WireSchema

__all__ = ["ACCEPT", "OPTIONS", "UNKNOWN_TTL", "Fetch", "RegistryUnavailable", "SchemaCache",
           "SchemaRegistry", "call_now", "check_url", "parse_option", "registry_headers"]

log = Logger()
T = TypeVar("T")

#: The media type of the registry's API.
ACCEPT = b"application/vnd.schemaregistry.v1+json"
#: Seconds an unknown id is remembered as unknown before it is asked again.
UNKNOWN_TTL = 60.0
#: ``--schema-registry-option`` keys (the Confluent clients' names) and what each is.
OPTIONS = {"basic.auth.user.info": "USER:PASSWORD for HTTP Basic auth",
           "bearer.auth.token": "a static bearer token"}
#: How deep schema references may nest.
MAX_REFERENCE_DEPTH = 16

#: ``fetch(url, headers, timeout)`` → (status, body) of the registry's answer to a GET.
Fetch = Callable[[str, dict[bytes, list[bytes]], float], Awaitable[tuple[int, bytes]]]


class RegistryUnavailable(Unavailable):
    """The Schema Registry is down or answers as it should not: an outage, not a bad message."""


def check_url(url: str) -> str:
    """The registry's base URL without a trailing slash; ValueError unless http(s) with a host."""
    parts = urlsplit(url)
    if "@" in parts.netloc:  # checked first: an error must never show a password
        raise ValueError("put credentials in --schema-registry-option basic.auth.user.info=USER:PASSWORD, "
                         "not in the URL")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    return url.rstrip("/")


def parse_option(text: str) -> tuple[str, str]:
    """One ``KEY=VALUE`` of ``--schema-registry-option``; ValueError naming an unknown key."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError("takes KEY=VALUE")  # never the text: it may hold a secret
    if key not in OPTIONS:
        raise ValueError(f"unknown key {key!r} (known: {', '.join(sorted(OPTIONS))})")
    return key, value.strip()


def registry_headers(options: dict[str, str]) -> dict[bytes, list[bytes]]:
    """The headers of every request to the registry; ValueError for options that do not go together."""
    headers = {b"Accept": [ACCEPT]}
    user_info = options.get("basic.auth.user.info")
    token = options.get("bearer.auth.token")
    if user_info is not None and token is not None:
        raise ValueError("basic.auth.user.info and bearer.auth.token do not go together")
    if user_info is not None:
        if ":" not in user_info:
            raise ValueError("basic.auth.user.info takes USER:PASSWORD")
        headers[b"Authorization"] = [b"Basic " + base64.b64encode(user_info.encode("utf-8"))]
    elif token is not None:
        if not token:
            raise ValueError("bearer.auth.token is empty")
        headers[b"Authorization"] = [b"Bearer " + token.encode("utf-8")]
    return headers


#: The most unknown ids remembered at once.
MAX_UNKNOWN = 1024


class SchemaCache:
    """Schemas by id, and ids known to be unknown (for :data:`UNKNOWN_TTL`); thread-safe."""

    def __init__(self, unknown_ttl: float = UNKNOWN_TTL,
                 now: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._known: dict[int, WireSchema] = {}
        self._unknown: dict[int, tuple[UnknownSchema, float]] = {}
        self._ttl = unknown_ttl
        self._now = now

    def get(self, schema_id: int) -> WireSchema | UnknownSchema | None:
        """The schema of ``schema_id``, that it is unknown, or None when it must be fetched."""
        with self._lock:
            known = self._known.get(schema_id)
            if known is not None:
                return known
            unknown = self._unknown.get(schema_id)
            if unknown is None:
                return None
            if self._now() >= unknown[1]:
                del self._unknown[schema_id]
                return None
            return unknown[0]

    def put(self, schema_id: int, entry: WireSchema | UnknownSchema) -> None:
        """Remember what the registry said of ``schema_id``."""
        with self._lock:
            if isinstance(entry, WireSchema):
                self._known[schema_id] = entry
                self._unknown.pop(schema_id, None)
            else:
                unknown = self._unknown
                if len(unknown) >= MAX_UNKNOWN and schema_id not in unknown:
                    # Binary payloads that start with 0x00 make up ids at will: the oldest go.
                    del unknown[next(iter(unknown))]
                unknown[schema_id] = (entry, self._now() + self._ttl)

    def __len__(self) -> int:
        with self._lock:
            return len(self._known)


class SchemaRegistry(ThreadService):
    """The process's client of one Schema Registry, and its cache.

    Also owns a thread on which the jobs decode again the messages that waited for a schema
    (``in_thread``), so that neither the reactor nor its shared pool does that work.
    """

    def __init__(self, reactor: Any, url: str, options: dict[str, str] | None = None, *,
                 fetch: Fetch | None = None, http: Any = None, clock: IReactorTime | None = None,
                 timeout: float = 10.0, cache: SchemaCache | None = None,
                 run: Callable[..., Deferred[Any]] | None = None, tls: Any = None) -> None:
        super().__init__(reactor, "schema-registry")
        #: How an https registry is checked (an ``IPolicyForHTTPS``; None: the system's CAs).
        self._tls = tls
        self.url = check_url(url)
        self._headers = registry_headers(options or {})
        self._clock: IReactorTime = clock or reactor
        self._timeout = timeout
        self.cache = cache or SchemaCache()
        self._fetch: Fetch = fetch or self._treq_fetch
        self._http = http
        self._connections: Any = None
        self._run = run
        self._waiters: dict[int, list[Deferred[WireSchema | UnknownSchema]]] = {}
        #: Schemas asked of the registry so far (tests and status).
        self.fetched = 0

    def stopService(self) -> Deferred[None]:
        """Stop the thread and close the registry's connections."""
        d = super().stopService()
        if self._connections is not None:
            pool, self._connections = self._connections, None
            d.addBoth(lambda _: pool.closeCachedConnections())
        return d

    def in_thread(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run ``f(*args)`` off the reactor, on the registry's own thread."""
        if self._run is not None:
            return self._run(f, *args)
        return super().in_thread(f, *args)

    def fetch(self, schema_id: int) -> Deferred[WireSchema | UnknownSchema]:
        """What the registry says of ``schema_id`` (cached); one request serves every caller
        waiting for the same id. Fails with :class:`RegistryUnavailable` in an outage."""
        cached = self.cache.get(schema_id)
        if cached is not None:
            return succeed(cached)
        waiters = self._waiters.setdefault(schema_id, [])

        def cancel(d: Deferred[WireSchema | UnknownSchema]) -> None:
            if d in waiters:
                waiters.remove(d)

        waiter: Deferred[WireSchema | UnknownSchema] = Deferred(cancel)
        waiters.append(waiter)
        if len(waiters) == 1:
            loading = Deferred.fromCoroutine(self._load(schema_id))
            loading.addTimeout(self._timeout, self._clock)
            loading.addBoth(self._loaded, schema_id)
        return waiter

    def _loaded(self, result: Any, schema_id: int) -> None:
        error: Exception | None = None
        if isinstance(result, (WireSchema, UnknownSchema)):
            self.cache.put(schema_id, result)
        else:
            failure = result
            if failure.check(RegistryUnavailable):
                error = failure.value
            elif failure.check(CancelledError, DeferredTimeout):
                error = RegistryUnavailable(f"the schema registry did not answer within "
                                            f"{self._timeout:g} s")
            else:  # never the headers in the reason: they may hold credentials
                error = RegistryUnavailable(f"cannot reach the schema registry: "
                                            f"{failure.type.__name__}: {failure.getErrorMessage()}")
        waiters = self._waiters.pop(schema_id, [])
        for waiter in waiters:
            if error is None:
                waiter.callback(result)
            else:
                waiter.errback(error)

    async def _load(self, schema_id: int) -> WireSchema | UnknownSchema:
        self.fetched += 1
        status, data = await self._get(f"/schemas/ids/{schema_id}", (40403,))
        if status == 404:
            return UnknownSchema(f"the registry answered 404 ({_message(data)})")
        kind = data.get("schemaType") or "AVRO"
        if kind not in ("AVRO", "JSON"):
            return UnknownSchema(f"unsupported schema type {kind} (Avro and JSON are)")
        try:
            writer = json.loads(data["schema"])
        except (KeyError, TypeError, ValueError) as e:
            return UnknownSchema(f"the registry's schema is not JSON: {type(e).__name__}: {e}")
        if kind == "JSON":
            return WireSchema("JSON", writer)
        named: dict[str, Any] = {}
        problem = await self._references(data.get("references") or [], named, 0)
        if problem is not None:
            return UnknownSchema(problem)
        try:
            parsed = fastavro.parse_schema(writer, named_schemas=named)
        except Exception as e:  # fastavro's own kinds for a schema it cannot use
            return UnknownSchema(f"not a valid Avro schema: {type(e).__name__}: {e}")
        return WireSchema("AVRO", writer, parsed)

    async def _references(self, references: list[Any], named: dict[str, Any], depth: int) -> str | None:
        """Parse the Avro schemas ``references`` name (other subjects' versions) into
        ``named``, theirs first; why they cannot be used, or None."""
        if depth > MAX_REFERENCE_DEPTH:
            return f"schema references nest more than {MAX_REFERENCE_DEPTH} deep"
        for reference in references:
            try:
                subject, version = str(reference["subject"]), int(reference["version"])
            except (KeyError, TypeError, ValueError):
                return f"a schema reference without subject and version: {reference!r}"
            status, data = await self._get(f"/subjects/{quote(subject, safe='')}/versions/{version}",
                                           (40401, 40402))
            if status == 404:
                return f"referenced subject {subject!r} version {version} not found ({_message(data)})"
            problem = await self._references(data.get("references") or [], named, depth + 1)
            if problem is not None:
                return problem
            try:
                fastavro.parse_schema(json.loads(data["schema"]), named_schemas=named)
            except Exception as e:
                return (f"referenced subject {subject!r} version {version} is not a valid Avro "
                        f"schema: {type(e).__name__}: {e}")
        return None

    async def _get(self, path: str, not_found: tuple[int, ...]) -> tuple[int, dict[str, Any]]:
        """GET ``path``: (200, its JSON) or (404, its JSON) when the registry's error code is
        one of ``not_found``; anything else raises :class:`RegistryUnavailable`."""
        status, body = await self._fetch(self.url + path, self._headers, self._timeout)
        data: Any = None
        with contextlib.suppress(ValueError):
            data = json.loads(body)
        if status == 200 and isinstance(data, dict):
            return status, data
        if status == 404 and isinstance(data, dict) and data.get("error_code") in not_found:
            return status, data
        text = body[:200].decode("utf-8", "replace")
        if status == 200:
            raise RegistryUnavailable(f"the schema registry answered {path} with no JSON object: {text}")
        # A 404 without the registry's own error code: the URL is not a registry's (wrong path?).
        raise RegistryUnavailable(f"the schema registry answered HTTP {status} to GET {path}: {text}")

    async def _treq_fetch(self, url: str, headers: dict[bytes, list[bytes]],
                          timeout: float) -> tuple[int, bytes]:
        from twisted.web.http_headers import Headers


        http = self._http
        if http is None:
            from treq.client import HTTPClient
            from twisted.web.client import Agent, HTTPConnectionPool

            self._connections = HTTPConnectionPool(self._reactor, persistent=True)
            agent = Agent(self._reactor, pool=self._connections) if self._tls is None else \
                Agent(self._reactor, contextFactory=self._tls, pool=self._connections)
            http = self._http = HTTPClient(agent)
        response = await http.get(url, headers=Headers({**headers, b"User-Agent": [USER_AGENT]}),
                                  timeout=timeout)
        return response.code, await response.content()


def _message(data: dict[str, Any]) -> str:
    message = data.get("message")
    return str(message) if message else f"error code {data.get('error_code')}"


def call_now(f: Callable[..., T], *args: Any) -> Deferred[T]:
    """Run ``f(*args)`` at once (tests: a registry whose ``in_thread`` needs no thread)."""
    return maybeDeferred(f, *args)
