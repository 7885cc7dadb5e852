"""What a job's consumer group shows on the real broker: its members, how far it committed.

Tests wait on these instead of sleeping: a job has finished every message of a topic once
its group committed each partition to the partition's end (SPEC §5: an offset is committed
only after its message was delivered or dead-lettered), and a job that was deleted or
stopped has left its group.
"""

from __future__ import annotations

import uuid

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from tests.infra.kafka_io import committed

__all__ = ["ends", "finished", "members"]


def members(bootstrap: str, group: str) -> int:
    """How many consumers are members of ``group`` now."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    description = admin.describe_consumer_groups([group])[group].result(timeout=10)
    return len(description.members)


def ends(bootstrap: str, topic: str, partitions: int) -> list[int]:
    """The end offset (high watermark) of each partition of ``topic``."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"ends-{uuid.uuid4()}"})
    try:
        return [consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in range(partitions)]
    finally:
        consumer.close()


def finished(bootstrap: str, group: str, topic: str, partitions: int) -> bool:
    """Whether ``group`` committed every partition of ``topic`` to its end: each message
    there was delivered or dead-lettered, and nothing of it is under way any more."""
    return committed(bootstrap, group, topic, partitions) == ends(bootstrap, topic, partitions)
