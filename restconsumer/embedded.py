"""``--embedded``: an in-process Kafka (librdkafka's mock cluster) and a private redis-server.

For trying the service out only: the mock cluster keeps everything in memory and the
Redis child saves nothing; both vanish when the service stops.
"""

from __future__ import annotations

import itertools
import json
import shutil
import socket
from typing import Any

from confluent_kafka import Producer
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["DemoFeed", "EmbeddedKafka", "EmbeddedRedis", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedKafka(Service):
    """librdkafka's mock cluster, living as long as the client that created it."""

    log = Logger()

    def __init__(self, brokers: int = 1) -> None:
        # The cluster is created here, before the reactor runs, so its address is known
        # when the rest of the service is built.
        self._client: Producer | None = Producer({"test.mock.num.brokers": brokers,
                                                  "log_level": 3})
        metadata = self._client.list_topics(timeout=10)
        broker = next(iter(metadata.brokers.values()))
        self.bootstrap = f"{broker.host}:{broker.port}"

    def stopService(self) -> None:
        """Let the mock cluster go."""
        super().stopService()
        if self._client is not None:
            self._client.flush(1)
            self._client = None


class _RedisChild(ProcessProtocol):
    log = Logger()

    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()
        self.stopping = False

    def processEnded(self, reason: Failure) -> None:
        if not self.stopping:
            self.log.error("the embedded redis-server ended: {reason}", reason=reason.value)
        self.ended.callback(None)


class EmbeddedRedis(Service):
    """A private ``redis-server`` child on a free loopback port that saves nothing."""

    log = Logger()

    def __init__(self, reactor: IReactorProcess, port: int | None = None) -> None:
        self._reactor = reactor
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._child: _RedisChild | None = None
        self._process: Any = None

    @staticmethod
    def binary() -> str | None:
        """Where ``redis-server`` is, or None."""
        return shutil.which("redis-server")

    def startService(self) -> None:
        """Start the redis-server child."""
        super().startService()
        binary = self.binary()
        if binary is None:
            raise RuntimeError("--embedded needs redis-server (apt-get install redis-server)")
        self._child = _RedisChild()
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--protected-mode", "yes", "--loglevel", "warning"]
        self._process = self._reactor.spawnProcess(self._child, binary, args, env=None)

    def stopService(self) -> Deferred[None]:
        """Stop the child; fires when it has ended."""
        super().stopService()
        child, self._child = self._child, None
        if child is None or child.ended.called:
            return succeed(None)
        child.stopping = True
        try:
            self._process.signalProcess("TERM")
        except Exception:  # already gone
            return succeed(None)
        return child.ended




class DemoFeed(Service):
    """Produces a made-up person to ``demo.people`` every few seconds, for the example job."""

    log = Logger()
    names = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Tony")

    def __init__(self, reactor: Any, bootstrap: str, topic: str = "demo.people",
                 every: float = 3.0) -> None:
        self._producer = Producer({"bootstrap.servers": bootstrap, "log_level": 3})
        self._topic = topic
        self._every = every
        self._count = itertools.count(1)
        self._timer = LoopingCall(self._produce)
        self._timer.clock = reactor

    def startService(self) -> None:
        """Start producing."""
        super().startService()
        self.log.info("demo feed: a message to {topic} every {every} s", topic=self._topic,
                      every=self._every)
        self._timer.start(self._every, now=False)

    def stopService(self) -> None:
        """Stop producing."""
        super().stopService()
        if self._timer.running:
            self._timer.stop()

    def _produce(self) -> None:
        n = next(self._count)
        person = {"id": f"person-{n}", "name": self.names[n % len(self.names)], "age": 20 + n % 50}
        # produce() only queues the message and poll(0) never waits: fine on the reactor.
        self._producer.produce(self._topic, json.dumps(person).encode())
        self._producer.poll(0)
