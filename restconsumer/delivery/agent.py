"""The one module that uses private names of Twisted: ``Agent._getEndpoint`` and
``Agent._requestWithEndpoint``, for an agent that parses each URL's origin once.

They are worth their speed on the per-message path (``bench/run.py``), so they are pinned
rather than avoided: ``setup.py`` bounds Twisted below its next release not yet tested,
and ``tests/test_pinned.py`` checks that these names still exist with the arguments used
here and that a request sent through :class:`OriginAgent` is on the wire what
``Agent.request`` sends. Nothing else of ours may use a private name of Twisted or
txredisapi (``tests/test_layout.py`` looks).
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse

__all__ = ["OriginAgent"]

#: The private methods of ``Agent`` used here (the pin test checks they are there).
PRIVATE_NAMES = ("_getEndpoint", "_requestWithEndpoint")

#: What Agent accepts in a URL: printable ASCII, no space (its own check, on the whole URL).
_PRINTABLE = re.compile(rb"[\x21-\x7e]+")


class OriginAgent(Agent):
    """Twisted's ``Agent``, with the origin of each URL parsed once.

    The request builder makes every URL of a job from one template, so the scheme, host,
    port and endpoint of its requests are always the same; ``Agent.request`` parses the
    whole URL again for each request, a tenth of the reactor's time on the delivery path
    (``bench/run.py``). Here the origin (up to the path's first ``/``) is parsed by
    ``URI.fromBytes`` once and the request goes on as ``Agent.request`` would send it: same
    key, endpoint, request path and ``URI`` (a test compares the two on the wire). A URL
    outside the plain form (no path, a fragment, ``;`` parameters) takes ``Agent.request``.
    """

    _origins: dict[bytes, tuple[URI, Any, tuple[bytes, bytes, int]]]

    @classmethod
    def over(cls, reactor: Any, endpoints: IAgentEndpointFactory, pool: HTTPConnectionPool) -> OriginAgent:
        """An agent connecting through ``endpoints``, its connections kept in ``pool``."""
        agent = cls.usingEndpointFactory(reactor, endpoints, pool=pool)
        assert isinstance(agent, OriginAgent)
        agent._origins = {}
        return agent

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None) -> Deferred[IResponse]:  # noqa: N803  # IAgent's name
        start = uri.find(b"://") + 3
        slash = uri.find(b"/", start) if start > 2 else -1
        if slash < 0 or b"#" in uri or b";" in uri or b"?" in uri[:slash] \
                or _PRINTABLE.fullmatch(uri) is None:
            return super().request(method, uri, headers, bodyProducer)
        origin = uri[:slash]
        try:
            known = self._origins[origin]
        except KeyError:
            parsed = URI.fromBytes(origin + b"/")
            try:
                endpoint = self._getEndpoint(parsed)
            except Exception:
                return super().request(method, uri, headers, bodyProducer)
            if len(self._origins) > 1000:
                self._origins.clear()
            known = self._origins[origin] = (parsed, endpoint, (parsed.scheme, parsed.host, parsed.port))
        parsed, endpoint, key = known
        target = uri[slash:]
        path, _, query = target.partition(b"?")
        if not query:
            target = path  # Agent sends "/x?" as "/x"
        full = URI(parsed.scheme, parsed.netloc, parsed.host, parsed.port, path, b"", query, b"")
        return self._requestWithEndpoint(key, endpoint, method, full, headers, bodyProducer, target)
