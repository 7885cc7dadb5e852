"""One clear line when Redis or Kafka goes away and one when it is back (SPEC §9).

The clients reconnect by themselves and would say so at every attempt; this service asks
each part every few seconds and speaks only when the answer changes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

__all__ = ["Availability", "DependencyWatch"]

log = Logger()


class Availability:
    """Whether one part is reachable, logging each change once."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.up: bool | None = None

    def seen(self, up: bool, detail: str = "") -> None:
        """The part answered (``up``) or not, with why."""
        if up == self.up:
            return
        if up:
            if self.up is not None:
                log.info("{part} is reachable again", part=self.name)
        else:
            log.warn("{part} is unreachable: {detail} (jobs go on where they can; this is said "
                     "again only when it is back)", part=self.name, detail=detail or "no answer")
        self.up = up


class DependencyWatch(MultiService):
    """Asks Redis and Kafka every ``every`` seconds."""

    def __init__(self, redis_ping: Callable[[], Awaitable[Any]],
                 kafka_check: Callable[[], Deferred[dict[str, Any]]], *, every: float = 5.0) -> None:
        super().__init__()
        self.redis = Availability("Redis")
        self.kafka = Availability("Kafka")
        self._redis_ping = redis_ping
        self._kafka_check = kafka_check
        TimerService(every, self._look).setServiceParent(self)

    def _look(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._ask())

    async def _ask(self) -> None:
        try:
            await self._redis_ping()
        except Exception as e:
            self.redis.seen(False, str(e))
        else:
            self.redis.seen(True)
        try:
            state = await self._kafka_check()
        except Exception as e:
            self.kafka.seen(False, str(e))
        else:
            self.kafka.seen(bool(state.get("ok")), str(state.get("error") or ""))
