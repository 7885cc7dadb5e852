"""A service with a thread of its own, for a blocking client (a Kafka admin or producer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

__all__ = ["ThreadService"]

T = TypeVar("T")


class ThreadService(Service):
    """Owns a one-thread pool: started with the service, stopped (and joined off the reactor
    thread) when it stops. Never the reactor's shared pool, which also resolves names."""

    def __init__(self, reactor: Any, thread_name: str) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=thread_name)

    def startService(self) -> None:
        """Start the thread."""
        super().startService()
        self._pool.start()

    def stopService(self) -> Deferred[None]:
        """Stop the thread once the work handed to it is done."""
        super().stopService()
        return self._stop_thread()

    def _stop_thread(self) -> Deferred[None]:
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._pool.stop)

    def in_thread(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run ``f(*args)`` on the service's thread."""
        return deferToThreadPool(self._reactor, self._pool, f, *args)
