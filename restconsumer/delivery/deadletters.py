"""Dead letters (SPEC §5): what can never be delivered goes to the job's dead-letter topic.

The original key, value and headers, plus headers saying which job, where it came from,
how many attempts, the last status and the reason — built here, in one place.
"""

from __future__ import annotations

import base64
import datetime
import time
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from restconsumer.base.threads import ThreadService
from restconsumer.jobs.work import Incoming
from restconsumer.kafka.topics import OutputTopics

__all__ = ["DeadLetterReader", "DeadLetters", "dead_letter_headers", "describe_letter", "original"]

log = Logger()


def dead_letter_headers(job_id: str, incoming: Incoming, reason: str, *, record: int | None = None,
                        status: int | None = None, attempts: int = 0) -> list[tuple[str, bytes]]:
    """The headers of a dead letter: where it came from and why, then the original ones."""
    headers = [
        ("restconsumer.job", job_id.encode()),
        ("restconsumer.topic", incoming.topic.encode()),
        ("restconsumer.partition", str(incoming.partition).encode()),
        ("restconsumer.offset", str(incoming.offset).encode()),
        ("restconsumer.attempts", str(attempts).encode()),
        ("restconsumer.control.status", b"" if status is None else str(status).encode()),
        ("restconsumer.reason", reason.encode("utf-8", "replace")),
    ]
    if record is not None:
        headers.append(("restconsumer.record", str(record).encode()))
    headers.extend((k, v if v is not None else b"") for k, v in incoming.headers)
    return headers


class DeadLetters(ThreadService):
    """Produces dead letters (and results) to Kafka; each send fires once Kafka has
    acknowledged it (``acks=all``, idempotent: a leader change loses or repeats nothing).

    The producer's delivery reports are served by a thread of its own. A topic's first send
    waits until the topic is made sure of (:class:`~restconsumer.kafka.topics.OutputTopics`:
    created with replication min(3, brokers) unless it exists), on another thread.
    """

    def __init__(self, reactor: Any, config: dict[str, Any], *, topics: OutputTopics | None = None) -> None:
        super().__init__(reactor, "dead-letters")
        self._topics = topics if topics is not None else OutputTopics(reactor, config)
        # A dead letter carries the source message whole, plus its headers: allow more than
        # Kafka's 1 MB default (the broker may still refuse; see send()). Letters wait for a
        # 20 ms linger: a refused stream then goes in batches (the partition does not wait).
        self._config = {"message.max.bytes": 64 * 1024 * 1024, **config, "acks": "all",
                        "linger.ms": 20, "enable.idempotence": True}
        self._producer: Producer | None = None
        self._polling = False
        self._loop: Deferred[None] | None = None

    def startService(self) -> None:
        """Create the producer and start serving its delivery reports."""
        super().startService()
        self._topics.startService()
        self._producer = Producer(self._config)
        self._polling = True
        self._loop = self.in_thread(self._serve)

    def _serve(self) -> None:
        assert self._producer is not None
        while self._polling:
            self._producer.poll(0.2)
        self._producer.flush(10)

    def stopService(self) -> Deferred[None]:
        """Flush what is queued, then stop the thread."""
        Service.stopService(self)  # the thread stops below, once its loop has flushed
        self._polling = False
        d = self._loop if self._loop is not None else succeed(None)
        d.addBoth(lambda _: self._topics.stopService())
        return d.addBoth(lambda _: self._stop_thread())

    def send(self, topic: str, key: bytes | None, value: bytes | None,
             headers: list[tuple[str, bytes]]) -> Deferred[None]:
        """Produce one dead letter; fires when Kafka has it, fails with the Kafka error.

        One the broker refuses as too large goes again without its value, a header saying why.
        The topic's first send waits for it to be made sure of (it fails if that cannot be done
        yet: its caller tries again).
        """
        if self._producer is None:
            return fail(RuntimeError("dead letters are not running"))
        ready = self._topics.ensure(topic)
        return ready.addCallback(lambda _: self._produce(topic, key, value, headers))

    def _produce(self, topic: str, key: bytes | None, value: bytes | None,
                 headers: list[tuple[str, bytes]]) -> Deferred[None]:
        done: Deferred[None] = Deferred()

        def fire(result: Failure | None) -> None:
            if not done.called:  # cancelled meanwhile: its partition let go of it
                done.callback(result)

        def report(err: KafkaError | None, _msg: Any) -> None:
            # Runs on the delivery-report thread.
            if err is None:
                self._reactor.callFromThread(fire, None)
            elif value is not None and err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                slim = [*headers, ("restconsumer.value_dropped",
                                   f"the broker refused the original value: {err.str()}".encode())]
                self._reactor.callFromThread(
                    lambda: self.send(topic, key, None, slim).addBoth(fire))
            else:
                self._reactor.callFromThread(fire, Failure(RuntimeError(err.str())))

        if self._producer is None:
            return fail(RuntimeError("dead letters are not running"))
        # A list is invariant: Producer.produce declares its values as str | bytes | None.
        kafka_headers: list[tuple[str, str | bytes | None]] = list(headers)
        try:
            self._producer.produce(topic, value=value, key=key, headers=kafka_headers, on_delivery=report)
        except Exception as e:  # BufferError when the queue is full, KafkaException otherwise
            return fail(RuntimeError(f"cannot produce to {topic}: {e}"))
        return done


def _text_or_base64(data: bytes | None) -> Any:
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def _iso(ms: int | None) -> str | None:
    if ms is None or ms < 0:
        return None
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def _job_of(message: Message) -> str:
    """The job a dead letter came from, as its ``restconsumer.job`` header says ("" if none)."""
    job = dict(message.headers() or []).get("restconsumer.job") or b""
    return job if isinstance(job, str) else job.decode("utf-8", "replace")


def describe_letter(message: Any) -> dict[str, Any] | None:
    """A dead letter as ``GET /job/{id}/deadletters`` shows it (None: not a dead letter)."""
    headers = {k: (v or b"") for k, v in (message.headers() or [])}
    if "restconsumer.job" not in headers:
        return None
    text = {k: v.decode("utf-8", "replace") for k, v in headers.items() if k.startswith("restconsumer.")}

    def number(name: str) -> int | None:
        value = text.get(name, "")
        return int(value) if value.lstrip("-").isdigit() else None

    kind, stamp = message.timestamp()
    return {
        "partition": message.partition(), "offset": message.offset(),
        "timestamp": _iso(stamp if kind else None),
        "source": {"topic": text.get("restconsumer.topic"), "partition": number("restconsumer.partition"),
                   "offset": number("restconsumer.offset")},
        "record": number("restconsumer.record"),
        "reason": text.get("restconsumer.reason"), "status": number("restconsumer.control.status"),
        "attempts": number("restconsumer.attempts"),
        "key": _text_or_base64(message.key()), "value": _text_or_base64(message.value()),
    }


def original(message: Any) -> Incoming | None:
    """The source message a dead letter carries, at its original coordinates."""
    headers = [(k, v) for k, v in (message.headers() or [])]
    ours = {k: (v or b"").decode("utf-8", "replace") for k, v in headers if k.startswith("restconsumer.")}
    try:
        partition = int(ours["restconsumer.partition"])
        offset = int(ours["restconsumer.offset"])
        topic = ours["restconsumer.topic"]
    except (KeyError, ValueError):
        return None
    kind, stamp = message.timestamp()
    return Incoming(topic, partition, offset, message.key(), message.value(),
                    [(k, v) for k, v in headers if not k.startswith("restconsumer.")],
                    stamp if kind else None)


class DeadLetterReader(ThreadService):
    """Reads a job's dead letters from Kafka, on a thread of its own."""

    def __init__(self, reactor: Any, config: dict[str, Any], *, scan: int = 20_000) -> None:
        super().__init__(reactor, "dead-letter-reader")
        self._config = config
        self._scan = scan

    def latest(self, job_id: str, topic: str, limit: int) -> Deferred[list[dict[str, Any]]]:
        """The job's newest ``limit`` dead letters, newest last."""
        return self.in_thread(self._latest, job_id, topic, limit)

    def _consumer(self, group: str) -> Consumer:
        return Consumer({**self._config, "group.id": group, "enable.auto.commit": False,
                         "enable.partition.eof": True, "auto.offset.reset": "earliest"})

    def _partitions(self, consumer: Consumer, topic: str) -> list[int]:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return []
        return sorted(metadata.partitions)

    def _latest(self, job_id: str, topic: str, limit: int) -> list[dict[str, Any]]:
        consumer = self._consumer(f"restconsumer.{job_id}.reader")
        try:
            found: list[dict[str, Any]] = []
            for partition in self._partitions(consumer, topic):
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
                # Newest first: read back in windows until enough of this job's letters are seen.
                end = high
                mine: list[dict[str, Any]] = []
                while end > low and len(mine) < limit and high - end < self._scan:
                    start = max(low, end - max(limit, 100))
                    mine = [m for m in self._read(consumer, topic, partition, start, end)
                            if m["job"] == job_id] + mine
                    end = start
                found.extend(m["letter"] for m in mine[-limit:])
            found.sort(key=lambda letter: (letter["timestamp"] or "", letter["partition"], letter["offset"]))
            return found[-limit:]
        finally:
            consumer.close()

    def _read(self, consumer: Consumer, topic: str, partition: int, start: int,
              end: int) -> list[dict[str, Any]]:
        consumer.assign([TopicPartition(topic, partition, start)])
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + 20
        position = start
        while position < end and time.monotonic() < deadline:
            for message in consumer.consume(500, 1.0):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        position = end
                    continue
                offset = message.offset()
                assert offset is not None  # a consumed message (not an error) has one
                position = offset + 1
                if offset >= end:
                    continue
                letter = describe_letter(message)
                if letter is not None:
                    out.append({"job": _job_of(message), "letter": letter, "message": message})
        return out

    def replay_plan(self, job_id: str, topic: str) -> Deferred[dict[int, tuple[int, int]]]:
        """Per partition: from where the last replay stopped (or the start) to the end now."""
        return self.in_thread(self._plan, job_id, topic)

    def _plan(self, job_id: str, topic: str) -> dict[int, tuple[int, int]]:
        consumer = self._consumer(f"restconsumer.{job_id}.replay")
        try:
            partitions = self._partitions(consumer, topic)
            committed = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
            plan = {}
            for tp in committed:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=10)
                start = max(tp.offset, low) if tp.offset >= 0 else low
                plan[tp.partition] = (start, high)
            return plan
        finally:
            consumer.close()

    def letters(self, job_id: str, topic: str, partition: int, start: int,
                end: int) -> Deferred[list[tuple[int, Incoming | None, int | None]]]:
        """The dead letters of one partition between two offsets: (offset, the original
        message if it is one of this job's, else None, and the record it is about if it
        is one record's)."""
        def read() -> list[tuple[int, Incoming | None, int | None]]:
            consumer = self._consumer(f"restconsumer.{job_id}.reader")
            try:
                out = []
                for item in self._read(consumer, topic, partition, start, end):
                    message = item["message"]
                    mine = item["job"] == job_id
                    out.append((message.offset(), original(message) if mine else None,
                                item["letter"]["record"] if mine else None))
                return out
            finally:
                consumer.close()

        return self.in_thread(read)

    def done(self, job_id: str, topic: str, partition: int, offset: int) -> Deferred[None]:
        """Remember that the replay of ``partition`` got to ``offset``."""
        def commit() -> None:
            consumer = self._consumer(f"restconsumer.{job_id}.replay")
            try:
                consumer.commit(offsets=[TopicPartition(topic, partition, offset)], asynchronous=False)
            finally:
                consumer.close()

        return self.in_thread(commit)
