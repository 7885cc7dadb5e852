"""Producing test messages to, and reading them back from, the real broker."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable

from confluent_kafka import Consumer, Message, Producer


def produce(bootstrap: str, topic: str, values: Iterable[bytes], *, partitions: int = 1,
            key: bytes | None = None, headers: list[tuple[str, bytes]] | None = None) -> int:
    """Produce ``values`` round-robin over ``partitions``; how many were acknowledged."""
    # Idempotence keeps the order of retried batches, so each partition holds them as given.
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all",
                         "enable.idempotence": True})
    acked = []
    for i, value in enumerate(values):
        while True:
            try:
                producer.produce(topic, value=value, key=key, partition=i % partitions, headers=headers,
                                 on_delivery=lambda err, msg: acked.append(err is None))
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    producer.flush(60)
    assert all(acked), "some test messages were not acknowledged"
    return len(acked)


def read_all(bootstrap: str, topic: str, *, expect: int, timeout: float = 30) -> list[Message]:
    """Read a topic from the start until ``expect`` messages came (or ``timeout``)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    found: list[Message] = []
    deadline = time.monotonic() + timeout
    try:
        while len(found) < expect and time.monotonic() < deadline:
            for message in consumer.consume(500, 0.5):
                if message.error() is None:
                    found.append(message)
    finally:
        consumer.close()
    return found


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> list[int]:
    """The group's committed offset of each partition (-1001 where none)."""
    from confluent_kafka import TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        offsets = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return [tp.offset for tp in offsets]
    finally:
        consumer.close()
