"""Serving the API: a site that knows its requests under way, a tidy stop order, and an
end to the process when a part of it cannot start (SPEC §9)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import IO, Any, cast

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from restconsumer.base.process import end_process

__all__ = ["APIServer", "DrainingSite", "OrderedServices", "StartupError",
           "end_process"]

log = Logger()


class StartupError(Exception):
    """A part of the service cannot start.

    Raised from ``privilegedStartService`` or ``startService``, it is twistd's own way to
    fail a start: twistd removes its pid file, reports the error (to the waiting parent
    when it daemonizes) and the process exits with status 1, before the reactor runs.
    """


def _report_briefly(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    if isinstance(value, StartupError):
        # Already logged; a traceback would read like a bug rather than a setting to fix.
        print(f"restconsumer: not started: {value}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, value, tb)


def _fail_start(message: str) -> StartupError:
    log.critical("{message}", message=message)
    sys.excepthook = _report_briefly
    return StartupError(message)


class _CountedRequest(Request):
    """A request the site counts, whose body is not kept past the site's ``max_body``."""

    too_large = False
    _received = 0

    @property
    def _site(self) -> DrainingSite:
        # Site.buildProtocol sets ``channel.site``; Twisted's HTTPChannel does not declare it.
        site: DrainingSite = self.channel.site  # type: ignore[attr-defined]
        return site

    def gotLength(self, length: int | None) -> None:
        limit = self._site.max_body
        if length is not None and length > limit:
            # Nothing of it is kept; the API answers 413 (before authenticating).
            self.too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self._site.max_body:
            self.too_large = True
            # Twisted declares ``content = None`` unannotated; gotLength has made it a file.
            content = cast(IO[bytes], self.content)
            content.seek(0)
            content.truncate()
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        site = self._site
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
    """Serves a site on an endpoint; on stop, closes the port and lets answers finish.

    An endpoint that cannot be bound ends the process with a non-zero status (SPEC §9):
    twistd binds in ``privilegedStartService``, before any other part has started, so a
    failure there raises :class:`StartupError`; one that only shows once the reactor runs
    (an endpoint that binds asynchronously) calls ``on_fatal`` (:func:`end_process`).
    """

    def __init__(self, endpoint: IStreamServerEndpoint, site: DrainingSite, clock: IReactorTime,
                 *, description: str = "", token_note: str | None = None, grace: float = 5.0,
                 endpoint_name: str | None = None,
                 on_fatal: Callable[[], object] | None = None) -> None:
        self._endpoint = endpoint
        self._site = site
        self._clock = clock
        self._description = description
        self._token_note = token_note
        self._grace = grace
        #: The endpoint as the operator wrote it (``--api``), for logs and errors.
        self.endpoint_name = endpoint_name or repr(endpoint)
        self._on_fatal = on_fatal
        self._port: Any = None
        self._listening: Deferred[Any] | None = None
        self._binding = False
        self._early_failure: Failure | None = None
        self.address: str | None = None

    def privilegedStartService(self) -> None:
        """Bind the endpoint (with privileges, if twistd has any); raise if it cannot be."""
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        """Say where the API listens (binding now if ``privilegedStartService`` did not)."""
        super().startService()
        if self._listening is None:
            self._listen()
        if self._port is not None:
            self._announce()

    def _listen(self) -> None:
        self._binding = True
        try:
            self._listening = self._endpoint.listen(self._site)
            self._listening.addCallbacks(self._bound, self._failed)
        finally:
            self._binding = False
        failure, self._early_failure = self._early_failure, None
        if failure is not None:
            raise _fail_start(self._cannot_listen(failure))

    def _bound(self, port: Any) -> None:
        self._port = port
        if self.running:
            self._announce()

    def _failed(self, failure: Failure) -> None:
        if self._binding:
            self._early_failure = failure
            return
        if not self.running:
            return  # stopped before the endpoint was bound: the attempt was cancelled
        log.critical("{message}; the process ends", message=self._cannot_listen(failure))
        if self._on_fatal is not None:
            self._on_fatal()
        else:
            reactor: Any = self._clock
            end_process(reactor)

    def _cannot_listen(self, failure: Failure) -> str:
        return f"cannot listen on the API endpoint {self.endpoint_name}: {failure.getErrorMessage()}"

    def _announce(self) -> None:
        host = self._port.getHost()
        self.address = f"http://{getattr(host, 'host', '?')}:{getattr(host, 'port', '?')}"
        log.info("restconsumer API listening on {address} ({description})",
                 address=self.address, description=self._description)
        if self._token_note:
            log.warn(self._token_note)

    def stopService(self) -> Deferred[None]:
        """Stop accepting, then wait (at most ``grace`` seconds) for requests under way."""
        super().stopService()
        port, self._port = self._port, None
        if self._listening is not None and not self._listening.called:
            self._listening.cancel()
        stopped = maybeDeferred(port.stopListening) if port is not None else succeed(None)
        drained = self._site.drained()

        def give_up() -> None:
            if not drained.called:
                drained.cancel()

        timer = self._clock.callLater(self._grace, give_up)
        drained.addErrback(lambda _: log.warn("stopping with {n} API requests unanswered",
                                              n=self._site.in_flight))
        drained.addBoth(lambda _: timer.cancel() if timer.active() else None)
        return stopped.addCallback(lambda _: drained)


def _stop_child(_: object, child: IService) -> Deferred[Any]:
    return maybeDeferred(child.stopService)


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
            d.addCallback(_stop_child, child)
            d.addErrback(lambda f: log.failure("error while stopping", f))
        return d.addCallback(lambda _: None)
