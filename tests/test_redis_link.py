"""RedisLink (restconsumer.control.redis): txredisapi's factory made anew when it gives up.

A server on loopback stands in for a proxy that accepts while Redis is down: it drops the
first connection as soon as the AUTH arrives, which makes txredisapi stop trying for good;
later connections answer every command ``+OK`` (enough for txredisapi to count them up).
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

from restconsumer.control.redis import RedisAddress, RedisLink


class _Server(Protocol):
    factory: Any

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.drop = self.factory.connections <= self.factory.drop_first

    def dataReceived(self, data: bytes) -> None:
        if self.drop:
            self.transport.loseConnection()
        else:
            commands = data.count(b"\r\n*") + data.startswith(b"*")  # each an array: *N\r\n...
            self.transport.write(b"+OK\r\n" * commands)


async def until(check: Any, timeout: float = 10.0) -> None:
    """Wait (on the reactor) until ``check()`` is true."""
    for _ in range(int(timeout / 0.05)):
        if check():
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("condition not met in time")


async def serving(drop_first: int) -> tuple[Any, Any, RedisAddress]:
    """The loopback server (dropping its first ``drop_first`` connections), its port, its address."""
    factory = Factory.forProtocol(_Server)
    factory.connections, factory.drop_first = 0, drop_first  # type: ignore[attr-defined]
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    return factory, port, RedisAddress("127.0.0.1", port.getHost().port, 0, None, "secret", False)


def pool() -> txredisapi.RedisFactory:
    return txredisapi.RedisFactory("x", None, 1, isLazy=True, password="secret")


@pytest_twisted.ensureDeferred
async def test_a_pool_that_gave_up_is_made_anew() -> None:
    factory, port, address = await serving(drop_first=1)
    link = RedisLink(reactor, address, pool, what="the test's pool", every=0.1)
    try:
        link.start()
        first = link.factory
        assert first is not None
        await until(lambda: first.stopped)  # txredisapi gave up on the dropped AUTH
        await until(lambda: link.connected)
        assert link.factory is not first and not link.factory.stopped
        assert factory.connections >= 2  # type: ignore[attr-defined]
    finally:
        await link.stop()
        await port.stopListening()
    assert link.factory is None and not link.connected


@pytest_twisted.ensureDeferred
async def test_a_link_keeps_a_pool_that_did_not_give_up() -> None:
    _, port, address = await serving(drop_first=0)
    ticks: list[int] = []
    link = RedisLink(reactor, address, pool, what="the test's pool", every=0.05,
                     on_tick=lambda: ticks.append(1))
    try:
        link.start()
        first = link.factory
        await until(lambda: link.connected)
        await until(lambda: len(ticks) >= 5)
        assert link.factory is first
        done: Deferred[Any] = link.commands.ping()
        assert await done == "OK"
    finally:
        await link.stop()
        await port.stopListening()
