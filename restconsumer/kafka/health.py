"""Readiness checks of what the service depends on: Kafka (on its own thread) and Redis."""

from __future__ import annotations

from typing import Any

from confluent_kafka.admin import AdminClient
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.python.failure import Failure

from restconsumer.base.threads import ThreadService

__all__ = ["KafkaProbe"]


class KafkaProbe(ThreadService):
    """Asks the Kafka cluster for its brokers, on a thread of its own, at most every few seconds."""

    def __init__(self, reactor: IReactorThreads, clock: IReactorTime, config: dict[str, Any], *,
                 timeout: float = 3.0, cache_for: float = 5.0) -> None:
        super().__init__(reactor, "kafka-health")
        self._clock = clock
        self._config = {**config, "socket.timeout.ms": int(timeout * 1000)}
        self._timeout = timeout
        self._cache_for = cache_for
        self._admin: AdminClient | None = None
        self._last: tuple[float, dict[str, Any]] | None = None
        self._running: Deferred[dict[str, Any]] | None = None

    def _probe(self) -> dict[str, Any]:
        try:
            if self._admin is None:
                self._admin = AdminClient(self._config)
            metadata = self._admin.list_topics(timeout=self._timeout)
        except Exception as e:  # KafkaException, or a config error
            return {"ok": False, "error": str(e)}
        if not metadata.brokers:
            return {"ok": False, "error": "no broker reachable"}
        return {"ok": True, "brokers": len(metadata.brokers)}

    def check(self) -> Deferred[dict[str, Any]]:
        """The cluster's state: ``{"ok": bool, ...}``, from a recent probe or a new one."""
        now = self._clock.seconds()
        if self._last is not None and now - self._last[0] < self._cache_for:
            return succeed(self._last[1])
        if self._running is None:
            self._running = self.in_thread(self._probe)

            def remember(result: dict[str, Any]) -> dict[str, Any]:
                self._last = (self._clock.seconds(), result)
                self._running = None
                return result

            self._running.addCallback(remember)
        # Several callers may wait on one probe; each gets its own Deferred.
        waiting: Deferred[dict[str, Any]] = Deferred()

        def pass_on(result: dict[str, Any] | Failure) -> dict[str, Any] | Failure:
            waiting.callback(result)
            return result

        self._running.addBoth(pass_on)
        return waiting
