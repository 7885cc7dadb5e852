"""Job control across instances (SPEC §6): the ``msg/job:*`` channel, and reconciling with Redis.

Pub/sub is fire-and-forget, so the supervisor also reconciles on every (re)connect of the
subscriber and every ``every`` seconds.
"""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from restconsumer.control.keys import CHANNEL_PATTERN
from restconsumer.control.redis import RedisAddress, RedisLink
from restconsumer.control.supervisor import Supervisor

__all__ = ["JobControl"]

log = Logger()


class _Subscriber(txredisapi.SubscriberProtocol):
    factory: Any

    def connectionMade(self) -> Deferred[Any]:
        # SubscriberProtocol.connectionMade authenticates first; subscribe after it.
        d = txredisapi.SubscriberProtocol.connectionMade(self)
        d.addCallback(lambda _: self._listen())
        return d

    def _listen(self) -> Deferred[None]:
        control: JobControl = self.factory.control
        d = self.psubscribe(CHANNEL_PATTERN)
        # txredisapi sends PSUBSCRIBE without a reply timeout.
        d.addTimeout(control.subscribe_timeout, control.clock)
        d.addCallbacks(lambda _: control.subscribed(), self._failed)
        return d

    def _failed(self, failure: Failure) -> None:
        self.factory.control.subscribe_failed(failure.getErrorMessage() or repr(failure.value))
        # Without the subscription this connection is useless: drop it, and txredisapi
        # reconnects (with its backoff) and subscribes again in connectionMade.
        if self.transport is not None:
            self.transport.abortConnection()

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.factory.control.announced(_text(channel), _text(message))

    def connectionLost(self, reason: Any) -> None:
        txredisapi.SubscriberProtocol.connectionLost(self, reason)
        self.factory.control.unsubscribed()


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class JobControl(Service):
    """Listens on ``msg/job:*`` and reconciles the supervisor with the store."""

    def __init__(self, reactor: Any, address: RedisAddress, supervisor: Supervisor, *,
                 every: float = 30.0, subscribe_timeout: float = 10.0) -> None:
        self._reactor = reactor
        self.clock: IReactorTime = reactor
        self.subscribe_timeout = subscribe_timeout
        self._subscribe_failing = False
        self._link = RedisLink(reactor, address, self._subscriber, what="the job channel's subscriber")
        self._supervisor = supervisor
        self._every = every
        self._timer = LoopingCall(self._reconcile)
        self._timer.clock = reactor
        self.connected = False

    def startService(self) -> None:
        """Subscribe (reconnecting by itself) and start the periodic reconcile."""
        super().startService()
        self._link.start()
        self._timer.start(self._every, now=True).addErrback(
            lambda f: log.failure("periodic reconcile stopped", f))

    def _subscriber(self) -> txredisapi.SubscriberFactory:
        a = self._link.address
        factory = txredisapi.SubscriberFactory()
        factory.protocol = _Subscriber
        factory.control = self
        factory.password = a.password
        factory.username = a.username
        factory.replyTimeout = 10
        return factory

    def stopService(self) -> Deferred[Any]:
        """Unsubscribe and stop reconciling."""
        super().stopService()
        if self._timer.running:
            self._timer.stop()
        return self._link.stop()

    def _reconcile(self) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._supervisor.reconcile())
        return d.addErrback(lambda f: log.failure("reconcile failed", f))

    def subscribed(self) -> None:
        """(Re)subscribed: changes made while away are caught up by a reconcile."""
        if not self.connected:
            log.info("job control: listening on {pattern}", pattern=CHANNEL_PATTERN)
        self.connected = True
        self._subscribe_failing = False
        self._reconcile()

    def subscribe_failed(self, reason: str) -> None:
        """PSUBSCRIBE was refused or not answered; the subscriber reconnects and tries again."""
        if not self._subscribe_failing and self.running:
            log.warn("job control: subscribing to {pattern} failed: {reason}; retrying until "
                     "it works", pattern=CHANNEL_PATTERN, reason=reason)
        self._subscribe_failing = True

    def unsubscribed(self) -> None:
        """The subscriber connection is gone; it reconnects by itself."""
        if self.connected and self.running:
            log.warn("job control: lost the Redis subscription; reconnecting")
        self.connected = False

    def announced(self, channel: str, action: str) -> None:
        """A message on ``msg/job:{id}``."""
        job_id = channel.partition("msg/job:")[2]
        if not job_id:
            return
        log.debug("job {job_id}: {action} announced", job_id=job_id, action=action)
        self._supervisor.changed(job_id)
