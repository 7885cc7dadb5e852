"""``set_offset``: moving a job's committed offsets while no instance consumes it.

Kafka only lets a group's offsets be changed while the group is empty, so the job is
halted everywhere first (a mark in Redis, announced on its channel: every instance stops
its consumer, committing what it finished), the offsets are moved once the group is
empty, and the mark is lifted so that every instance starts again from there.

Before anything is halted, the broker is asked to describe the group once: a Kafka that
cannot (librdkafka's mock cluster of ``--embedded``) could never say when the group is
empty, so set_offset is refused there with 501 and nothing changes. Every refusal or
failure of a move is logged with its reason.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    ConsumerGroupState,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from restconsumer.base.threads import ThreadService
from restconsumer.control.store import JobStore
from restconsumer.jobs.model import Job

__all__ = ["OffsetError", "OffsetMover", "OffsetRequest"]

log = Logger()


class OffsetError(Exception):
    """A set_offset that cannot be done: ``status`` says why (400, 409, 501, 503)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class OffsetRequest:
    """Where to move: ``beginning``, ``end`` or an offset; all partitions or one."""

    where: str | int
    topic: str | None = None
    partition: int | None = None

    @classmethod
    def parse(cls, offset: str, topic: str | None, partition: str | None, job: Job) -> OffsetRequest:
        """Check the route's arguments against the job; raise OffsetError(400) if wrong."""
        problems = []
        where: str | int = offset
        if offset not in ("beginning", "end"):
            if not (offset.isascii() and offset.isdigit()):
                problems.append(f"offset must be a number, 'beginning' or 'end', not {offset!r}")
            else:
                where = int(offset)
        if topic is not None and topic not in job.topics:
            problems.append(f"topic {topic!r} is not one the job reads ({', '.join(job.topics)})")
        number = None
        if partition is not None:
            if not (partition.isascii() and partition.isdigit()):
                problems.append(f"partition must be a number, not {partition!r}")
            else:
                number = int(partition)
            if topic is None:
                if len(job.topics) == 1:
                    topic = job.topics[0]
                else:
                    problems.append("partition needs topic: the job reads several topics")
        if problems:
            raise OffsetError(400, "; ".join(problems))
        return cls(where, topic, number)


class OffsetMover(ThreadService):
    """Moves consumer-group offsets with Kafka's admin API, on a thread of its own."""

    def __init__(self, reactor: Any, clock: IReactorTime, kafka: dict[str, Any], store: JobStore, *,
                 empty_timeout: float = 45.0) -> None:
        super().__init__(reactor, "kafka-admin")
        self._clock = clock
        self._kafka = kafka
        self._store = store
        self._empty_timeout = empty_timeout
        self._admin: AdminClient | None = None

    async def move(self, job: Job, request: OffsetRequest) -> list[dict[str, Any]]:
        """Halt the job everywhere, move its offsets, let it run again; the new offsets.

        Raises :class:`OffsetError` (logged with its reason); 501 and 503 from the first
        look at the group come before the job is halted, so nothing has changed then.
        """
        try:
            return await self._move(job, request)
        except OffsetError as e:
            log.warn("job {job_id}: set_offset to {where} not done ({status}): {reason}",
                     job_id=job.id, where=request.where, status=e.status, reason=str(e))
            raise

    async def _move(self, job: Job, request: OffsetRequest) -> list[dict[str, Any]]:
        # A broker that cannot describe the group is found out before the job is halted.
        try:
            await self.in_thread(self._members, f"restconsumer.{job.id}")
        except OffsetError as e:
            raise OffsetError(e.status, f"{e}; nothing was changed" if e.status == 503 else str(e)) from e
        token = uuid.uuid4().hex
        ttl = int(self._empty_timeout + 60)
        if not await self._store.begin_offset_move(job.id, token, ttl):
            raise OffsetError(409, f"a set_offset of job {job.id} is under way")
        try:
            moved = await self._move_when_empty(job, request)
        finally:
            try:
                await self._store.end_offset_move(job.id, token)
            except Exception as e:
                # The mark expires by itself; the offsets (if moved) stay moved.
                log.warn("job {job_id}: set_offset could not lift its mark ({error}); the job "
                         "resumes when it expires", job_id=job.id, error=str(e))
        log.info("job {job_id}: offsets moved to {where}: {offsets}", job_id=job.id,
                 where=request.where, offsets=", ".join(f"{o['topic']}[{o['partition']}]={o['offset']}"
                                                        for o in moved))
        return moved

    async def _move_when_empty(self, job: Job, request: OffsetRequest) -> list[dict[str, Any]]:
        group = f"restconsumer.{job.id}"
        deadline = self._clock.seconds() + self._empty_timeout
        while True:
            members = await self.in_thread(self._members, group)
            if members == 0:
                break
            if self._clock.seconds() > deadline:
                raise OffsetError(503, f"{members} consumers of group {group} did not let go "
                                       f"within {self._empty_timeout:.0f} s; nothing was moved")
            await deferLater(self._clock, 0.25, lambda: None)
        return await self.in_thread(self._move_offsets, group, job.topics, request)

    # -- admin thread --------------------------------------------------------------------

    def _client(self) -> AdminClient:
        if self._admin is None:
            self._admin = AdminClient(self._kafka)
        return self._admin

    def _members(self, group: str) -> int:
        try:
            description = self._client().describe_consumer_groups([group])[group].result(timeout=10)
        except KafkaException as e:
            error = e.args[0] if e.args and isinstance(e.args[0], KafkaError) else None
            if error is not None and error.code() == KafkaError._UNSUPPORTED_FEATURE:
                raise OffsetError(501, f"this Kafka cannot describe consumer groups ({error.str()}), "
                                       f"so set_offset could never tell when group {group} has let "
                                       f"go of its partitions; librdkafka's mock cluster (--embedded) "
                                       f"is such a Kafka. Nothing was changed") from e
            raise OffsetError(503, f"cannot describe group {group}: {e}") from e
        if description.state in (ConsumerGroupState.EMPTY, ConsumerGroupState.DEAD):
            return 0
        return max(1, len(description.members))

    def _move_offsets(self, group: str, topics: list[str],
                      request: OffsetRequest) -> list[dict[str, Any]]:
        admin = self._client()
        partitions: list[TopicPartition] = []
        for topic in [request.topic] if request.topic else topics:
            metadata = admin.list_topics(topic, timeout=10).topics.get(topic)
            if metadata is None or metadata.error is not None or not metadata.partitions:
                raise OffsetError(400, f"topic {topic} does not exist")
            numbers = sorted(metadata.partitions)
            if request.partition is not None:
                if request.partition not in numbers:
                    raise OffsetError(400, f"topic {topic} has no partition {request.partition}")
                numbers = [request.partition]
            partitions += [TopicPartition(topic, n) for n in numbers]
        low = self._watermarks(admin, partitions, OffsetSpec.earliest())
        high = self._watermarks(admin, partitions, OffsetSpec.latest())
        targets = []
        for tp in partitions:
            key = (tp.topic, tp.partition)
            if request.where == "beginning":
                offset = low[key]
            elif request.where == "end":
                offset = high[key]
            else:
                # Within what the partition holds: below is deleted, beyond is not written yet.
                offset = min(max(int(request.where), low[key]), high[key])
            targets.append(TopicPartition(tp.topic, tp.partition, offset))
        try:
            futures = admin.alter_consumer_group_offsets([ConsumerGroupTopicPartitions(group, targets)])
            futures[group].result(timeout=10)
        except KafkaException as e:
            raise OffsetError(503, f"Kafka refused the new offsets of {group}: {e}") from e
        return [{"topic": t.topic, "partition": t.partition, "offset": t.offset} for t in targets]

    @staticmethod
    def _watermarks(admin: AdminClient, partitions: list[TopicPartition],
                    spec: OffsetSpec) -> dict[tuple[str, int], int]:
        try:
            futures = admin.list_offsets({tp: spec for tp in partitions}, request_timeout=10)
            return {(tp.topic, tp.partition): f.result(timeout=10).offset for tp, f in futures.items()}
        except KafkaException as e:
            raise OffsetError(503, f"cannot read the partitions' offsets: {e}") from e
