"""Serving the API: a site that knows its requests under way, and a tidy stop order."""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

__all__ = ["APIServer", "DrainingSite", "OrderedServices"]

log = Logger()


class _CountedRequest(Request):
    """A request the site counts, whose body is not kept past the site's ``max_body``."""

    too_large = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        limit = self.channel.site.max_body
        if length is not None and length > limit:
            # Nothing of it is kept; the API answers 413 (before authenticating).
            self.too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self.channel.site.max_body:
            self.too_large = True
            self.content.seek(0)
            self.content.truncate()
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        site: DrainingSite = self.channel.site
        site.started()
        self.notifyFinish().addBoth(lambda _: site.finished())
        super().process()


class DrainingSite(Site):
    """A site that counts the requests it is answering, so a stop can wait for them."""

    requestFactory = _CountedRequest
    displayTracebacks = False

    def __init__(self, resource: IResource, *, max_body: int = 1024 * 1024, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.max_body = max_body
        self.in_flight = 0
        self._idle: list[Deferred[None]] = []

    def started(self) -> None:
        """A request began."""
        self.in_flight += 1

    def finished(self) -> None:
        """A request ended (answered or its connection lost)."""
        self.in_flight -= 1
        if self.in_flight == 0:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def drained(self) -> Deferred[None]:
        """Fires once no request is under way."""
        if self.in_flight == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d


class APIServer(Service):
    """Serves a site on an endpoint; on stop, closes the port and lets answers finish."""

    def __init__(self, endpoint: IStreamServerEndpoint, site: DrainingSite, clock: IReactorTime,
                 *, description: str = "", token_note: str | None = None, grace: float = 5.0) -> None:
        self._endpoint = endpoint
        self._site = site
        self._clock = clock
        self._description = description
        self._token_note = token_note
        self._grace = grace
        self._port: Any = None
        self.address: str | None = None

    def startService(self) -> Deferred[None]:
        """Start listening, and say where (with the generated token, if any)."""
        super().startService()

        def listening(port: Any) -> None:
            self._port = port
            host = port.getHost()
            self.address = f"http://{getattr(host, 'host', '?')}:{getattr(host, 'port', '?')}"
            log.info("restconsumer API listening on {address} ({description})",
                     address=self.address, description=self._description)
            if self._token_note:
                log.warn(self._token_note)

        def failed(failure: Any) -> None:
            log.failure("cannot listen on the API endpoint; stopping", failure)
            from twisted.internet import reactor

            reactor.stop()  # type: ignore[attr-defined]

        return self._endpoint.listen(self._site).addCallbacks(listening, failed)

    def stopService(self) -> Deferred[None]:
        """Stop accepting, then wait (at most ``grace`` seconds) for requests under way."""
        super().stopService()
        port, self._port = self._port, None
        stopped = maybeDeferred(port.stopListening) if port is not None else succeed(None)
        drained = self._site.drained()
        timer = self._clock.callLater(self._grace, lambda: drained.called or drained.cancel())
        drained.addErrback(lambda _: log.warn("stopping with {n} API requests unanswered",
                                              n=self._site.in_flight))
        drained.addBoth(lambda _: timer.cancel() if timer.active() else None)
        return stopped.addCallback(lambda _: drained)


class OrderedServices(MultiService):
    """A MultiService that stops its children one by one, last started first.

    MultiService stops them all at once; the API must finish answering before the
    store it answers from goes away.
    """

    def stopService(self) -> Deferred[None]:
        """Stop each child after the one started after it has stopped."""
        Service.stopService(self)
        d: Deferred[Any] = succeed(None)
        for child in reversed(list(self)):
            d.addCallback(lambda _, c=child: maybeDeferred(c.stopService))
            d.addErrback(lambda f: log.failure("error while stopping", f))
        return d.addCallback(lambda _: None)
