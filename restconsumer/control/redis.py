"""Reaching Redis: where it is (:class:`RedisAddress`), and :class:`RedisLink`, the
connections of one txredisapi factory kept alive — to one Redis, or to the master that
Redis Sentinel names, followed through a failover.

txredisapi is used through its public names only: its factories (``RedisFactory``,
``SubscriberFactory``), their ``startConnecting``, ``handler``, ``maxDelay``, ``stopped``,
``size`` and ``pool``; its ``Sentinel`` (``discover_master``, ``sentinels``,
``discovery_timeout``). Its own ``Sentinel.master_for`` is not used: it connects to the
master without TLS and checks no certificate. ``setup.py`` bounds txredisapi below the next
release not yet tested.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from zope.interface import implementer

__all__ = ["MASTER_NOT_FOUND", "RedisAddress", "RedisLink", "StoreUnavailable", "redact"]

#: What a Sentinel link says while no sentinel names a master that answers as one.
MASTER_NOT_FOUND = "Redis master not found"
SENTINEL_PORT = 26379
_SCHEMES = ("redis", "rediss", "redis+sentinel", "rediss+sentinel")
_QUERY = ("sentinel_password", "tls_server_name")


def redact(url: str) -> str:
    """The URL with its passwords (userinfo, ``sentinel_password``) shown as ``***``."""
    url = re.sub(r"^([a-z+]+://[^:@/]*):[^@/]*@", r"\1:***@", url)
    return re.sub(r"(sentinel_password=)[^&]*", r"\1***", url)


def _host_port(text: str, default: int, url: str) -> tuple[str, int]:
    parts = urlsplit(f"//{text}")
    try:
        port = parts.port or default
    except ValueError:
        raise ValueError(f"bad port in {redact(url)!r}: {text!r}") from None
    if not parts.hostname:
        raise ValueError(f"a host is missing in {redact(url)!r}")
    return parts.hostname, port


class StoreUnavailable(Exception):
    """Redis cannot be reached right now (or refuses to work); the caller should answer 503."""


@dataclass(frozen=True)
class RedisAddress:
    """Where Redis is, parsed from a ``redis://``, ``rediss://``, ``redis+sentinel://`` or
    ``rediss+sentinel://`` URL (SPEC §6). Behind Sentinel, ``host`` and ``port`` are the
    first sentinel's, ``sentinels`` all of them and ``master`` the name they know it by."""

    host: str
    port: int
    db: int
    username: str | None
    password: str | None = field(repr=False)
    tls: bool
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    #: The name a TLS certificate must carry (else the address connected to).
    tls_server_name: str | None = None

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        """Parse ``redis[s]://[[user]:password@]host[:port][/db]`` or
        ``redis[s]+sentinel://[[user]:password@]HOST:PORT[,HOST:PORT…]/MASTER[/DB][?…]``;
        raise ValueError (passwords redacted) if bad."""
        parts = urlsplit(url)
        if parts.scheme not in _SCHEMES:
            raise ValueError(f"not a redis://, rediss://, redis+sentinel:// or rediss+sentinel:// URL: "
                             f"{redact(url)!r}")
        userinfo, _, hosts = parts.netloc.rpartition("@")
        user, colon, password = userinfo.partition(":")
        username = unquote(user) or None
        secret = unquote(password) if colon and password else None
        tls = parts.scheme.startswith("rediss")
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = sorted(set(query) - set(_QUERY))
        if unknown or (query and not parts.scheme.endswith("+sentinel")):
            raise ValueError(f"unknown parameter {', '.join(unknown or sorted(query))} in {redact(url)!r}")
        path = parts.path.strip("/")
        if not parts.scheme.endswith("+sentinel"):
            if path and not path.isdigit():
                raise ValueError(f"the database in {redact(url)!r} must be a number")
            host, port = _host_port(hosts, 6379, url) if hosts else ("localhost", 6379)
            return cls(host, port, int(path or 0), username, secret, tls)
        sentinels = tuple(_host_port(h, SENTINEL_PORT, url) for h in hosts.split(",") if h)
        if not sentinels:
            raise ValueError(f"no sentinel in {redact(url)!r}")
        master, _, db = path.partition("/")
        if not master:
            raise ValueError(f"the master's name is missing in {redact(url)!r} (…/MASTER[/DB])")
        if db and not db.isdigit():
            raise ValueError(f"the database in {redact(url)!r} must be a number")
        return cls(sentinels[0][0], sentinels[0][1], int(db or 0), username, secret, tls,
                   sentinels=sentinels, master=master,
                   sentinel_password=(query.get("sentinel_password") or [""])[-1] or None,
                   tls_server_name=(query.get("tls_server_name") or [""])[-1] or None)

    def __str__(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        if self.sentinels:
            hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.sentinels)
            return f"{scheme}+sentinel://{hosts}/{self.master}/{self.db}"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"


class RoleChecked:
    """A protocol mixin: behind Sentinel, a connection is put to use only once ``ROLE`` says
    it reaches a master (a sentinel's answer can be a failover late)."""

    factory: Any
    transport: Any
    password: str | None
    username: str | None

    def connectionMade(self) -> Any:
        """AUTH, ROLE, then what the protocol itself does on a new connection."""
        link: RedisLink | None = getattr(self.factory, "link", None)
        if link is None or not link.address.sentinels:
            return super().connectionMade()  # type: ignore[misc]
        if self.password is not None:
            self.auth(self.password, self.username)  # type: ignore[attr-defined]
        d = self.role()  # type: ignore[attr-defined]
        return d.addCallbacks(self._role, self._no_role, errbackArgs=(link,), callbackArgs=(link,))

    def _role(self, role: Any, link: RedisLink) -> Any:
        if isinstance(role, list) and role and str(role[0]) == "master":
            return super().connectionMade()  # type: ignore[misc]
        link.not_master(f"{self.transport.getPeer().host}:{self.transport.getPeer().port} answers "
                        f"ROLE with {role[0] if isinstance(role, list) and role else role!r}")
        self.transport.loseConnection()
        return None

    def _no_role(self, failure: Any, link: RedisLink) -> None:
        link.not_master(f"ROLE failed: {failure.getErrorMessage()}")
        self.transport.loseConnection()


@functools.cache
def _role_checked(protocol: type) -> type:
    return type(f"RoleChecked{protocol.__name__}", (RoleChecked, protocol), {})


@implementer(IStreamClientEndpoint)
class _MasterEndpoint:
    """Asks the sentinels for the master before each connection attempt."""

    def __init__(self, link: RedisLink) -> None:
        self._link = link

    def connect(self, protocol_factory: IProtocolFactory) -> Deferred[Any]:
        d = self._link.find_master()
        return d.addCallback(self._to, protocol_factory)

    def _to(self, address: tuple[str, int], protocol_factory: IProtocolFactory) -> Deferred[Any]:
        self._link.connecting_to(address)
        d = self._link.endpoint(*address).connect(protocol_factory)
        return d.addErrback(self._unreachable, address)  # type: ignore[no-any-return]

    def _unreachable(self, failure: Any, address: tuple[str, int]) -> Any:
        self._link.not_master(f"{address[0]}:{address[1]}, which the sentinels name, does not answer "
                              f"({failure.getErrorMessage()})")
        return failure
class RedisLink:
    """A txredisapi factory connected to one Redis, made anew when txredisapi gives up.

    txredisapi reconnects by itself with a backoff, but gives up for good (its factory
    ``stopped``) when a connection is lost during its AUTH or SELECT — a proxy that accepts
    while Redis is down does that. Every ``every`` seconds the link looks, and starts a new
    factory if so (``on_tick`` is called on the same beat). The store's pool and job
    control's subscriber both connect through one.

    Behind Sentinel, every connection attempt asks the sentinels for the master first, and a
    connection is used only once ``ROLE`` says master; on the same beat the link asks again
    and drops its connections when the sentinels name another master (a failover that left
    the old one running). While there is none, :attr:`problem` says so.
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
        #: Why there is no connection, when the link knows better than "not connected".
        self.problem: str | None = None
        #: Behind Sentinel: the master the last connection attempt went to.
        self.master_at: tuple[str, int] | None = None
        self._sentinels: list[txredisapi.RedisFactory] = []
        self._sentinel = txredisapi.Sentinel([])
        # txredisapi waits 10 s for an answer naming a master; the API's 15 s budget after a
        # promotion needs a quicker second look.
        self._sentinel.discovery_timeout = 2
        self._looking = False

    def start(self) -> None:
        """Start connecting, and watching."""
        for host, port in self.address.sentinels:
            sentinel = txredisapi.RedisFactory(f"{host}:{port}", None, 1, isLazy=True,
                                               password=self.address.sentinel_password, replyTimeout=2)
            sentinel.maxDelay = 2
            sentinel.deferred.addErrback(lambda _: None)
            sentinel.startConnecting(self.endpoint(host, port))
            self._sentinels.append(sentinel)
        self._connect()
        self._watch.start(self._every, now=False)

    def endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        """The endpoint of one Redis server (or sentinel), with TLS for ``rediss``."""
        a = self.address
        endpoint: Any = HostnameEndpoint(self._reactor, host, port, timeout=self._connect_timeout)
        if a.tls:
            # txredisapi's own TLS (ssl_context_factory=True) does not verify the server.
            endpoint = wrapClientTLS(optionsForClientTLS(a.tls_server_name or host), endpoint)
        return endpoint  # type: ignore[no-any-return]

    def _connect(self) -> None:
        a = self.address
        factory = self._make()
        # Come back within a couple of seconds of Redis (txredisapi's default waits up to 10 s).
        factory.maxDelay = 2
        factory.noisy = False  # no "Starting factory" line at every reconnect
        factory.link = self
        endpoint: IStreamClientEndpoint
        if a.sentinels:
            factory.protocol = _role_checked(factory.protocol)
            endpoint = _MasterEndpoint(self)
        else:
            endpoint = self.endpoint(a.host, a.port)
        # A lazy factory fails this Deferred when a connection attempt is refused (AUTH...);
        # nothing waits on it here: the watch and ``connected`` say how things stand.
        factory.deferred.addErrback(lambda _: None)
        factory.startConnecting(endpoint)
        self.factory = factory

    def find_master(self) -> Deferred[tuple[str, int]]:
        """The master's address as the sentinels that answer name it (each attempt asks)."""
        return Deferred.fromCoroutine(self._find_master())

    async def _find_master(self) -> tuple[str, int]:
        # Only those connected: a question to one that is down would wait for it for ever. At
        # start (or when all were away) give them the discovery time to connect.
        for _ in range(int(self._sentinel.discovery_timeout / 0.1)):
            live = [s.handler for s in self._sentinels if s.size > 0]
            if live:
                break
            await deferLater(self._reactor, 0.1, lambda: None)
        else:
            self.problem = f"{MASTER_NOT_FOUND}: no sentinel answers"
            raise txredisapi.MasterNotFoundError(self.problem)
        self._sentinel.sentinels = live
        try:
            address: tuple[str, int] = await self._sentinel.discover_master(self.address.master)
        except txredisapi.MasterNotFoundError:
            self.problem = (f"{MASTER_NOT_FOUND}: no sentinel names a master {self.address.master!r} "
                            f"that is up")
            raise
        return address

    def connecting_to(self, address: tuple[str, int]) -> None:
        """Behind Sentinel: a connection attempt goes to the master at ``address``."""
        if self.master_at is not None and self.master_at != address:
            self.log.warn("Redis {what}: the master {master!r} is now at {host}:{port}",
                          what=self._what, master=self.address.master, host=address[0], port=address[1])
        self.master_at = address

    def not_master(self, reason: str) -> None:
        """Behind Sentinel: a server the sentinels named is not (or no longer) the master."""
        self.problem = f"{MASTER_NOT_FOUND}: {reason}"

    def _check(self) -> Deferred[Any] | None:
        if self._on_tick is not None:
            self._on_tick()
        old = self.factory
        if old is None:
            return None
        if not old.stopped:
            if self.address.sentinels and self.connected and not self._looking:
                self._looking = True
                self.find_master().addCallbacks(self._still_master, lambda _: None).addBoth(
                    self._looked)
            return None
        self.log.warn("Redis at {address}: {what} gave up reconnecting; starting afresh",
                      address=str(self.address), what=self._what)
        self._connect()
        return old.disconnect().addErrback(lambda _: None)

    def _looked(self, _: object) -> None:
        self._looking = False

    def _still_master(self, address: tuple[str, int]) -> None:
        factory = self.factory
        if factory is None or self.master_at is None or address == self.master_at:
            return
        self.log.warn("Redis {what}: the sentinels name {host}:{port} the master now; leaving "
                      "{old[0]}:{old[1]}", what=self._what, host=address[0], port=address[1],
                      old=self.master_at)
        for connection in list(factory.pool):
            connection.transport.loseConnection()

    def stop(self) -> Deferred[Any]:
        """Stop watching and close every connection; fires when they are closed."""
        if self._watch.running:
            self._watch.stop()
        factory, self.factory = self.factory, None
        sentinels, self._sentinels = self._sentinels, []
        for sentinel in sentinels:
            sentinel.disconnect().addErrback(lambda _: None)
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
