"""Behind Sentinel, in-process (restconsumer.control.redis and the store's WAIT).

A loopback server speaking enough of the Redis protocol plays a sentinel and a data node:
what each command answers is the test's. The real thing (a failover of real servers) is
tests/test_sentinel.py; these pin the rules one at a time: a connection is used only once
``ROLE`` says master, a write waits for a replica while the master has one, the URL form.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
import txredisapi
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol

from restconsumer.control.redis import MASTER_NOT_FOUND, RedisAddress, RedisLink, redact
from restconsumer.control.store import JobStore, StoreUnavailable
from restconsumer.jobs.model import load
from tests.test_redis_link import until

Answer = Callable[[list[str]], Any]


def encode(value: Any) -> bytes:
    """One RESP reply."""
    if isinstance(value, Exception):
        return f"-{value}\r\n".encode()
    if isinstance(value, int):
        return f":{value}\r\n".encode()
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, list):
        return f"*{len(value)}\r\n".encode() + b"".join(encode(v) for v in value)
    data = str(value).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


class _Server(Protocol):
    factory: Any

    def connectionMade(self) -> None:
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while (command := self._command()) is not None:
            self.factory.seen.append(command)
            self.transport.write(encode(self.factory.answer(command)))

    def _command(self) -> list[str] | None:
        lines = self.buffer.split(b"\r\n")
        if len(lines) < 2 or not lines[0].startswith(b"*"):
            return None
        count, words, at = int(lines[0][1:]), [], 1
        for _ in range(count):
            if at + 1 >= len(lines):
                return None
            words.append(lines[at + 1].decode())
            at += 2
        if at >= len(lines):
            return None
        self.buffer = b"\r\n".join(lines[at:])
        return words


async def serve(answer: Answer) -> tuple[Any, int]:
    """A loopback server answering each command with ``answer(command)``; (its factory, port)."""
    factory = Factory.forProtocol(_Server)
    factory.seen, factory.answer = [], answer  # type: ignore[attr-defined]
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    factory.port = port  # type: ignore[attr-defined]
    return factory, port.getHost().port


def node(role: list[Any], acknowledged: int = 1) -> Answer:
    """A data node whose ROLE is ``role`` and whose WAIT says ``acknowledged``."""
    def answer(command: list[str]) -> Any:
        name = command[0].upper()
        if name == "ROLE":
            return role
        if name == "WAIT":
            return acknowledged
        if name in ("EVAL", "EVALSHA"):
            return 1
        if name == "GET":
            return None
        return "OK"
    return answer


def sentinel(master_port: int) -> Answer:
    """A sentinel naming the master ``main`` at ``127.0.0.1:master_port``."""
    def answer(command: list[str]) -> Any:
        if command[:2] == ["SENTINEL", "MASTERS"]:
            return [["name", "main", "ip", "127.0.0.1", "port", str(master_port), "flags", "master",
                     "num-other-sentinels", "2"]]
        return "OK"
    return answer


def behind(sentinel_port: int) -> RedisAddress:
    """The address of master ``main`` behind one sentinel."""
    return RedisAddress.from_url(f"redis+sentinel://:pw@127.0.0.1:{sentinel_port}/main/0")


def pool() -> txredisapi.RedisFactory:
    return txredisapi.RedisFactory("x", None, 1, isLazy=True, password="pw")


@pytest_twisted.ensureDeferred
async def test_a_server_that_is_not_the_master_is_not_used() -> None:
    replica, replica_port = await serve(node(["slave", "127.0.0.1", 1, "connected", 10]))
    sentinels, sentinel_port = await serve(sentinel(replica_port))
    link = RedisLink(reactor, behind(sentinel_port), pool, what="the test's pool", every=0.1)
    try:
        link.start()
        await until(lambda: sum(c[0] == "ROLE" for c in replica.seen) >= 2)
        assert not link.connected
        assert link.problem is not None and link.problem.startswith(MASTER_NOT_FOUND)
        assert "ROLE" in link.problem and "slave" in link.problem
        assert ["AUTH", "pw"] in replica.seen
    finally:
        await link.stop()
        await replica.port.stopListening()
        await sentinels.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_master_the_sentinels_name_is_used_and_left_when_they_name_another() -> None:
    first, first_port = await serve(node(["master", 0, []]))
    second, second_port = await serve(node(["master", 0, []]))
    names = {"port": first_port}
    sentinels, sentinel_port = await serve(lambda c: sentinel(names["port"])(c))
    link = RedisLink(reactor, behind(sentinel_port), pool, what="the test's pool", every=0.1)
    try:
        link.start()
        await until(lambda: link.connected)
        assert link.master_at == ("127.0.0.1", first_port)
        assert await link.commands.ping() == "OK"
        names["port"] = second_port  # a failover that left the first one running
        await until(lambda: link.master_at == ("127.0.0.1", second_port) and link.connected)
        assert any(c[0] == "ROLE" for c in second.seen)
    finally:
        await link.stop()
        for server in (first, second, sentinels):
            await server.port.stopListening()


async def store_behind(role: list[Any], acknowledged: int) -> tuple[JobStore, Any, list[Any]]:
    master, master_port = await serve(node(role, acknowledged))
    sentinels, sentinel_port = await serve(sentinel(master_port))
    store = JobStore(behind(sentinel_port), clock=reactor, on_refused=lambda _: None)
    store.startService()
    await until(lambda: store.connected)
    return store, master, [master.port, sentinels.port]


JOB = load({"id": "a", "owner": "o", "type": "POST", "topic": "t", "url": "http://x.example/",
                     "datamap": {}})


@pytest_twisted.ensureDeferred
async def test_a_job_write_waits_for_a_replica_while_the_master_has_one() -> None:
    store, master, ports = await store_behind(["master", 10, [["127.0.0.1", "7001", "10"]]], 1)
    try:
        await store.put(JOB)
        names = [c[0].upper() for c in master.seen]
        write = max(i for i, n in enumerate(names) if n in ("EVAL", "EVALSHA"))
        assert names[write + 1:write + 3] == ["ROLE", "WAIT"]
        assert master.seen[write + 2][1:] == ["1", "1000"]
    finally:
        await store.stopService()
        for port in ports:
            await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_write_no_replica_confirms_is_not_answered_as_done() -> None:
    store, _master, ports = await store_behind(["master", 10, [["127.0.0.1", "7001", "10"]]], 0)
    try:
        with pytest.raises(StoreUnavailable, match="no replica confirmed it"):
            await store.put(JOB)
    finally:
        await store.stopService()
        for port in ports:
            await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_without_replicas_a_write_does_not_wait() -> None:
    store, master, ports = await store_behind(["master", 10, []], 0)
    try:
        await store.put(JOB)
        assert not any(c[0].upper() == "WAIT" for c in master.seen)
    finally:
        await store.stopService()
        for port in ports:
            await port.stopListening()


def test_the_sentinel_url_form() -> None:
    a = RedisAddress.from_url("rediss+sentinel://u:p%40ss@s1:1,s2,[::1]:3/main/4"
                              "?sentinel_password=sp&tls_server_name=redis.example")
    assert a.sentinels == (("s1", 1), ("s2", 26379), ("::1", 3))
    assert (a.master, a.db, a.username, a.password, a.tls) == ("main", 4, "u", "p@ss", True)
    assert (a.sentinel_password, a.tls_server_name) == ("sp", "redis.example")
    assert "p@ss" not in repr(a) and "sp" not in str(a)
    assert str(a) == "rediss+sentinel://s1:1,s2:26379,[::1]:3/main/4"


@pytest.mark.parametrize(("url", "reason"), [
    ("redis+sentinel://:pw@s1:1", "the master's name is missing"),
    ("redis+sentinel://:pw@s1/main/x", "the database"),
    ("redis+sentinel://:pw@/main", "no sentinel"),
    ("redis+sentinel://:pw@s1/main?sentinel_pasword=x", "unknown parameter sentinel_pasword"),
    ("redis://:pw@h/0?sentinel_password=x", "unknown parameter"),
    ("sentinel://:pw@h/main", "not a redis://"),
])
def test_a_bad_url_says_why_and_shows_no_password(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as raised:
        RedisAddress.from_url(url)
    assert "pw" not in str(raised.value)


def test_redact() -> None:
    assert redact("redis+sentinel://u:secret@h:1/m?sentinel_password=s2&tls_server_name=x") == \
        "redis+sentinel://u:***@h:1/m?sentinel_password=***&tls_server_name=x"
    assert redact("redis://h:1/0") == "redis://h:1/0"
