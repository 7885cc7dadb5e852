"""What restconsumer relies on in its dependencies beyond their documented API, pinned.

``restconsumer.delivery.agent`` calls two private methods of Twisted's ``Agent``; these tests
fail on a Twisted where they changed, and ``setup.py`` keeps untested releases out.
``restconsumer.control.redis`` sets and reads public fields of txredisapi's factories, whose
meaning these tests check against a real redis-server elsewhere (tests/test_control.py).
"""

from __future__ import annotations

import inspect
import re
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import txredisapi
from packaging.requirements import Requirement
from packaging.version import Version
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.http_headers import Headers

from restconsumer.delivery.agent import PRIVATE_NAMES, OriginAgent
from restconsumer.delivery.sender import _Endpoints, _read_body
from tests.test_delivery_policy import Server, with_server

SETUP = (Path(__file__).resolve().parent.parent / "setup.py").read_text()


def requirement(name: str) -> Requirement:
    """The requirement ``setup.py`` states for ``name``."""
    found = re.search(rf'"({re.escape(name)}(\[[^\]]*\])?[<>=!~][^"]*)"', SETUP)
    assert found, name
    return Requirement(found.group(1))


@pytest.mark.parametrize("name", ["twisted", "txredisapi"])
def test_setup_bounds_the_pinned_dependencies_above_what_is_tested(name: str) -> None:
    """An upper bound, and the version these tests run on inside it."""
    wanted = requirement(name)
    assert any(spec.operator == "<" for spec in wanted.specifier), wanted
    assert Version(version(name)) in wanted.specifier


def test_twisted_is_bounded_below_its_next_release() -> None:
    """Twisted's calendar versions: the bound is the month after the release tested."""
    tested = Version(version("twisted"))
    bound = next(Version(s.version) for s in requirement("twisted").specifier if s.operator == "<")
    year, month = tested.major, tested.minor
    assert bound == Version(f"{year + month // 12}.{month % 12 + 1}")


def test_agents_private_methods_are_as_used() -> None:
    """The names OriginAgent calls, with the arguments it passes them."""
    assert PRIVATE_NAMES == ("_getEndpoint", "_requestWithEndpoint")
    assert list(inspect.signature(Agent._getEndpoint).parameters) == ["self", "uri"]
    assert list(inspect.signature(Agent._requestWithEndpoint).parameters) == [
        "self", "key", "endpoint", "method", "parsedURI", "headers", "bodyProducer", "requestPath"]


def test_txredisapi_factories_have_the_fields_used() -> None:
    """The public fields restconsumer.control.redis sets and reads."""
    for factory in (txredisapi.RedisFactory("h:1", None, 1, isLazy=True), txredisapi.SubscriberFactory()):
        assert factory.stopped is False and factory.size == 0
        assert isinstance(factory.maxDelay, int | float)
        assert callable(factory.startConnecting) and factory.handler is not None


@pytest_twisted.ensureDeferred
async def test_the_senders_agent_sends_what_twisted_agent_sends() -> None:
    """The sender's agent parses a URL's origin once (a fast path); what goes on the wire, and
    the URI the response carries, are the same as Twisted's own ``Agent.request`` makes."""

    async def test(server: Server) -> None:
        pools = [HTTPConnectionPool(server.reactor), HTTPConnectionPool(server.reactor)]
        plain = Agent(server.reactor, pool=pools[0])
        fast = OriginAgent.over(server.reactor, _Endpoints(server.reactor, BrowserLikePolicyForHTTPS()),
                                pools[1])
        origin = server.url("").decode()
        paths = ["/ok", "/people/p%C3%A9-1", "/ok?a=1&b=x%20y", "/ok?", "/ok?a=/b?c",
                 "", "/ok;v=1?a", "/ok#part"]
        try:
            for path in paths:
                seen: list[Any] = []
                for agent in (plain, fast):
                    response = await agent.request(b"POST", f"{origin}{path}".encode(),
                                                   Headers({b"X-Id": [b"1"]}), None)
                    await _read_body(response)
                    seen.append((server.endpoint.seen.pop(), response.request.absoluteURI))
                assert seen[0] == seen[1], path
            # The plain form took the fast path: its origin is known.
            assert list(fast._origins) == [origin.encode()]
            with pytest.raises(ValueError):
                await fast.request(b"GET", f"{origin}/a b".encode())
        finally:
            for pool in pools:
                await pool.closeCachedConnections()

    await with_server(test)
