"""The topics the service writes to (dead letters, results), created before their first write.

Left to the broker's auto-creation, such a topic would get ``default.replication.factor``
(1 unless the operator changed it) and ``min.insync.replicas`` 1: one broker lost could
lose what it holds. So the first write to a topic this process has not made sure of waits
for a ``CreateTopics`` with replication min(3, brokers) and ``min.insync.replicas``
min(2, brokers), and the broker's default number of partitions; a topic already there is
left as it is. The brokers counted are those the cluster's metadata lists at that moment
(one down then: a replication of 2). Creating runs on a thread of its own, never the
reactor's.

What then happens to the write:

- created, or already there: it goes on;
- a passing failure (no broker reachable, a timeout, the controller moving): it fails, and
  its caller tries again later (a dead letter is retried, never dropped);
- refused for good (no right to create topics, a creation policy, a broker without
  ``CreateTopics``, such as librdkafka's mock cluster): said once, and the write goes on,
  to an existing topic or one the broker auto-creates.
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from restconsumer.base.threads import ThreadService

__all__ = ["OutputTopics", "TopicNotReady", "replication_for"]

log = Logger()

#: What Kafka answers that will not change by asking again: the write goes on without creating.
REFUSED = frozenset({
    KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.POLICY_VIOLATION, KafkaError.INVALID_REPLICATION_FACTOR, KafkaError.INVALID_CONFIG,
    KafkaError.TOPIC_EXCEPTION, KafkaError.INVALID_PARTITIONS,
    KafkaError.UNSUPPORTED_VERSION, KafkaError._UNSUPPORTED_FEATURE, KafkaError.INVALID_REQUEST,
})


class TopicNotReady(Exception):
    """The topic could not be made sure of yet (a passing failure): try the write again later."""


def replication_for(brokers: int) -> tuple[int, int]:
    """(replication factor, ``min.insync.replicas``) of a topic the service creates on a
    cluster of ``brokers``: min(3, brokers) and min(2, brokers), at least 1."""
    brokers = max(1, brokers)
    return min(3, brokers), min(2, brokers)


def _code(e: BaseException) -> int | None:
    error = e.args[0] if isinstance(e, KafkaException) and e.args else None
    return error.code() if isinstance(error, KafkaError) else None


class OutputTopics(ThreadService):
    """Creates the topics the service writes to, once each per process (see the module)."""

    def __init__(self, reactor: Any, config: dict[str, Any], *,
                 admin_factory: Any = AdminClient, timeout: float = 5.0) -> None:
        super().__init__(reactor, "output-topics")
        self._config = config
        self._factory = admin_factory
        self._timeout = timeout
        self._admin: Any = None
        #: Topics made sure of (or whose creation Kafka refused for good).
        self._ready: set[str] = set()
        #: Creations under way, with the writes waiting for each.
        self._making: dict[str, list[Deferred[None]]] = {}

    def ensure(self, topic: str) -> Deferred[None]:
        """Fires once ``topic`` may be written to; fails with :class:`TopicNotReady` after a
        passing failure (the next call tries again)."""
        if topic in self._ready:
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        waiters = self._making.get(topic)
        if waiters is None:
            waiters = self._making[topic] = []
            self.in_thread(self._make, topic).addBoth(self._made, topic)
        waiters.append(waiting)
        return waiting

    def _made(self, result: Failure | None, topic: str) -> None:
        if not isinstance(result, Failure):
            self._ready.add(topic)
        for waiting in self._making.pop(topic, []):
            if not waiting.called:  # cancelled meanwhile (its write was given up)
                waiting.callback(result)

    def _client(self) -> Any:
        if self._admin is None:
            self._admin = self._factory(self._config)
        return self._admin

    def _make(self, topic: str) -> None:
        """On the thread: create ``topic`` unless it is there (see the module for the outcomes)."""
        try:
            admin = self._client()
            metadata = admin.list_topics(timeout=self._timeout)
            there = metadata.topics.get(topic)
            if there is not None and there.error is None:
                return
            if metadata.controller_id not in metadata.brokers:
                # No controller to create it (librdkafka's mock cluster names none of its brokers).
                log.warn("cannot create the topic {topic}: Kafka names no controller; writing to it "
                         "as the broker auto-creates it", topic=topic)
                return
            replication, min_insync = replication_for(len(metadata.brokers))
            new = NewTopic(topic, -1, replication, config={"min.insync.replicas": str(min_insync)})
            [future] = admin.create_topics([new], request_timeout=self._timeout).values()
            future.result(self._timeout + 5)
        except Exception as e:
            code = _code(e)
            if code == KafkaError.TOPIC_ALREADY_EXISTS:
                return
            if code in REFUSED:
                log.warn("cannot create the topic {topic} ({error}): writing to it as it is, or as "
                         "the broker auto-creates it (see README, Kafka settings)", topic=topic, error=str(e))
                return
            raise TopicNotReady(f"cannot create the topic {topic} yet: {e}") from e
        log.info("created the topic {topic}: replication {replication}, min.insync.replicas {isr}",
                 topic=topic, replication=replication, isr=min_insync)
