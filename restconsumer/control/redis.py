"""Reaching Redis: where it is (:class:`RedisAddress`), and :class:`RedisLink`, the
connections of one txredisapi factory kept alive.

txredisapi is used through its public names only: its factories (``RedisFactory``,
``SubscriberFactory``), their ``startConnecting``, ``handler``, ``maxDelay``, ``stopped``
and ``size``; ``setup.py`` bounds it below the next release not yet tested.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

__all__ = ["RedisAddress", "RedisLink", "StoreUnavailable"]


class StoreUnavailable(Exception):
    """Redis cannot be reached right now (or refuses to work); the caller should answer 503."""


@dataclass(frozen=True)
class RedisAddress:
    """Where Redis is, parsed from a ``redis://`` or ``rediss://`` URL."""

    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    tls: bool

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        """Parse ``redis[s]://[[user]:password@]host[:port][/db]``; raise ValueError if bad."""
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"not a redis:// or rediss:// URL: {url!r}")
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"the database in {url!r} must be a number")
        return cls(
            host=parts.hostname or "localhost",
            port=parts.port or 6379,
            db=int(path or 0),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=parts.scheme == "rediss",
        )

    def __str__(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"
class RedisLink:
    """A txredisapi factory connected to one Redis, made anew when txredisapi gives up.

    txredisapi reconnects by itself with a backoff, but gives up for good (its factory
    ``stopped``) when a connection is lost during its AUTH or SELECT — a proxy that accepts
    while Redis is down does that. Every ``every`` seconds the link looks, and starts a new
    factory if so (``on_tick`` is called on the same beat). The store's pool and job
    control's subscriber both connect through one.
    """

    log = Logger()

    def __init__(self, reactor: Any, address: RedisAddress, make: Callable[[], txredisapi.RedisFactory],
                 *, what: str, connect_timeout: float = 5.0, every: float = 2.0,
                 on_tick: Callable[[], object] | None = None) -> None:
        self._reactor = reactor
        self.address = address
        self._make = make
        self._what = what
        self._connect_timeout = connect_timeout
        self._on_tick = on_tick
        self._watch = LoopingCall(self._check)
        self._watch.clock = reactor
        self._every = every
        #: The factory of the connections now (None before start and after stop).
        self.factory: txredisapi.RedisFactory | None = None

    def start(self) -> None:
        """Start connecting, and watching."""
        self._connect()
        self._watch.start(self._every, now=False)

    def _connect(self) -> None:
        a = self.address
        factory = self._make()
        # Come back within a couple of seconds of Redis (txredisapi's default waits up to 10 s).
        factory.maxDelay = 2
        factory.noisy = False  # no "Starting factory" line at every reconnect
        endpoint: Any = HostnameEndpoint(self._reactor, a.host, a.port, timeout=self._connect_timeout)
        if a.tls:
            # txredisapi's own TLS (ssl_context_factory=True) does not verify the server.
            endpoint = wrapClientTLS(optionsForClientTLS(a.host), endpoint)
        # A lazy factory fails this Deferred when a connection attempt is refused (AUTH...);
        # nothing waits on it here: the watch and ``connected`` say how things stand.
        factory.deferred.addErrback(lambda _: None)
        factory.startConnecting(endpoint)
        self.factory = factory

    def _check(self) -> Deferred[Any] | None:
        if self._on_tick is not None:
            self._on_tick()
        old = self.factory
        if old is None or not old.stopped:
            return None
        self.log.warn("Redis at {address}: {what} gave up reconnecting; starting afresh",
                      address=str(self.address), what=self._what)
        self._connect()
        return old.disconnect().addErrback(lambda _: None)

    def stop(self) -> Deferred[Any]:
        """Stop watching and close every connection; fires when they are closed."""
        if self._watch.running:
            self._watch.stop()
        factory, self.factory = self.factory, None
        return factory.disconnect() if factory is not None else succeed(None)

    @property
    def connected(self) -> bool:
        """Whether at least one connection is up."""
        return self.factory is not None and self.factory.size > 0

    @property
    def commands(self) -> Any:
        """What Redis commands are called on (txredisapi's connection handler)."""
        if self.factory is None:
            raise txredisapi.ConnectionError("not connected")
        return self.factory.handler
