"""One contract for the Kafka clients: each test runs against a real confluent-kafka
Consumer/Producer on the test broker and against restconsumer.kafka.fake's in-memory fake.

Only what both do is asserted (the fake's known differences are in its module docstring).
The tests at the end check the fake's own test controls (expiry, injected failures).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_INVALID,
    TIMESTAMP_CREATE_TIME,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from restconsumer.kafka.fake import FakeCluster, FakeConsumer, FakeProducer

_names = itertools.count()
TPs = set[tuple[str, int]]

#: What the service's consumers set, with a heartbeat fast enough for short tests.
BASE = {
    "auto.offset.reset": "earliest",
    "enable.auto.commit": False,
    "partition.assignment.strategy": "roundrobin",
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 100,
}


class Member:
    """A subscribed consumer and, in order, what it was told and what it returned."""

    def __init__(self, consumer: Any, topics: list[str], *, commit: bool = False) -> None:
        self.consumer = consumer
        self.commit = commit
        self.events: list[tuple[str, Any]] = []
        self.messages: list[Message] = []
        self.held: TPs = set()
        self.threads: set[int] = set()
        self.commits: list[tuple[KafkaError | None, list[tuple[str, int, int]]]] = []
        #: Called from on_lost after it was noted.
        self.also_on_lost: Callable[[Any, list[TopicPartition]], None] | None = None
        consumer.subscribe(topics, on_assign=self._assign, on_revoke=self._revoke, on_lost=self._lost)

    def _note(self, kind: str, partitions: list[TopicPartition]) -> TPs:
        self.threads.add(threading.get_ident())
        tps = {(p.topic, p.partition) for p in partitions}
        self.events.append((kind, frozenset(tps)))
        return tps

    def _assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        assert all(p.offset == OFFSET_INVALID for p in partitions)
        self.held |= self._note("assign", partitions)  # eager: everything was revoked first

    def _revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.held -= self._note("revoke", partitions)

    def _lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.held -= self._note("lost", partitions)
        if self.also_on_lost is not None:
            self.also_on_lost(consumer, partitions)

    def on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """The consumer's ``on_commit`` (set in its config)."""
        self.threads.add(threading.get_ident())
        self.commits.append((error, [(p.topic, p.partition, p.offset) for p in partitions]))

    def kinds(self) -> list[str]:
        """The callbacks so far, by name."""
        return [kind for kind, _ in self.events if kind not in ("message", "dropped")]

    def consume(self, num_messages: int = 100, timeout: float = 0.1) -> list[Message]:
        """One consume() call; with ``commit``, messages of partitions not held are dropped
        (as the service does) and the rest committed at once."""
        found = [m for m in self.consumer.consume(num_messages, timeout) if m.error() is None]
        if self.commit:
            for m in found:
                if (m.topic(), m.partition()) not in self.held:
                    self.events.append(("dropped", (m.topic(), m.partition(), m.offset())))
            found = [m for m in found if (m.topic(), m.partition()) in self.held]
            if found:
                ends = {(m.topic(), m.partition()): m.offset() + 1 for m in found}
                self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in ends.items()],
                                     asynchronous=False)
        for m in found:
            self.events.append(("message", (m.topic(), m.partition(), m.offset())))
        self.messages.extend(found)
        return found

    def offsets(self, topic: str, partition: int) -> list[int]:
        """The offsets returned of one partition, in the order returned."""
        return [m.offset() for m in self.messages if (m.topic(), m.partition()) == (topic, partition)]


def until(members: list[Member], done: Callable[[], bool], what: str, timeout: float = 20) -> None:
    """Poll every member in turn until ``done()`` (or fail after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        for member in members:
            member.consume()


class Backend:
    """Makes topics, consumers and producers on one Kafka (real or fake); closes them after."""

    name = ""

    def __init__(self, test: str) -> None:
        self._test = "".join(c if c.isalnum() else "_" for c in test)[:40]
        self._consumers: list[Any] = []

    def topic(self, partitions: int = 1) -> str:
        """A new topic."""
        name = f"c{next(_names)}.{self._test}"
        self._create(name, partitions)
        return name

    def group(self) -> str:
        """A new consumer group id."""
        return f"g{next(_names)}.{self._test}"

    def consumer(self, group: str, config: dict[str, Any] | None = None) -> Any:
        """A consumer of ``group`` with the service's settings and ``config`` over them."""
        consumer = self.raw_consumer({**BASE, "group.id": group, **(config or {})})
        self._consumers.append(consumer)
        return consumer

    def member(self, group: str, topics: list[str], config: dict[str, Any] | None = None, *,
               commit: bool = False) -> Member:
        """A consumer of ``group`` subscribed to ``topics``, recording what it is told."""
        holder: list[Member] = []
        consumer = self.consumer(group, {"on_commit": lambda e, p: holder[0].on_commit(e, p),
                                         **(config or {})})
        holder.append(Member(consumer, topics, commit=commit))
        return holder[0]

    def produce(self, topic: str, count: int, *, partitions: int = 1, start: int = 0,
                **extra: Any) -> None:
        """Produce messages ``v{start}``… round-robin over ``partitions``; wait for every ack."""
        producer = self.producer()
        acked: list[KafkaError | None] = []
        for i in range(start, start + count):
            producer.produce(topic, value=b"v%d" % i, partition=i % partitions,
                             on_delivery=lambda err, _msg: acked.append(err), **extra)
        assert producer.flush(30) == 0
        assert acked == [None] * count

    def producer(self, config: dict[str, Any] | None = None) -> Any:
        """A producer."""
        raise NotImplementedError

    def committed(self, group: str, topic: str, partition: int) -> int:
        """The group's committed offset, read from outside (-1001 where none)."""
        raise NotImplementedError

    def lose(self, member: Member) -> None:
        """Start ``member`` losing its membership: it must not poll until it is gone."""
        raise NotImplementedError

    def _create(self, name: str, partitions: int) -> None:
        raise NotImplementedError

    def raw_consumer(self, config: dict[str, Any]) -> Any:
        """A consumer made with exactly ``config`` (and the bootstrap servers), not closed after."""
        raise NotImplementedError

    def close(self) -> None:
        """Close every consumer made here."""
        for consumer in self._consumers:
            with contextlib.suppress(RuntimeError):
                consumer.close()


class RealBackend(Backend):
    """The test broker through confluent-kafka."""

    name = "real"

    def __init__(self, test: str, kafka: Any) -> None:
        super().__init__(test)
        self._kafka = kafka

    def _create(self, name: str, partitions: int) -> None:
        self._kafka.create_topic(name, partitions)

    def raw_consumer(self, config: dict[str, Any]) -> Consumer:
        """A confluent-kafka consumer on the broker."""
        return Consumer({"bootstrap.servers": self._kafka.bootstrap, **config})

    def producer(self, config: dict[str, Any] | None = None) -> Producer:
        """A producer on the broker."""
        return Producer({"bootstrap.servers": self._kafka.bootstrap, "linger.ms": 1, **(config or {})})

    def committed(self, group: str, topic: str, partition: int) -> int:
        """Asked with a consumer of the group that does not join it."""
        reader = Consumer({"bootstrap.servers": self._kafka.bootstrap, "group.id": group})
        try:
            return reader.committed([TopicPartition(topic, partition)], timeout=10)[0].offset
        finally:
            reader.close()

    def lose(self, member: Member) -> None:
        """Nothing: the member exceeds its max.poll.interval.ms while the test waits."""


class FakeBackend(Backend):
    """restconsumer.kafka.fake's in-memory cluster."""

    name = "fake"

    def __init__(self, test: str) -> None:
        super().__init__(test)
        self.cluster = FakeCluster()

    def _create(self, name: str, partitions: int) -> None:
        self.cluster.create_topic(name, partitions)

    def raw_consumer(self, config: dict[str, Any]) -> FakeConsumer:
        """A fake consumer on the cluster."""
        return self.cluster.consumer(config)

    def producer(self, config: dict[str, Any] | None = None) -> FakeProducer:
        """A producer on the fake cluster."""
        return self.cluster.producer(config or {})

    def committed(self, group: str, topic: str, partition: int) -> int:
        """Straight from the cluster."""
        return self.cluster.committed(group, topic, partition)

    def lose(self, member: Member) -> None:
        """Expire it now, as the broker does once its time is up."""
        self.cluster.expire(member.consumer)


@pytest.fixture(params=["real", "fake"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Each test once on the real broker, once on the fake."""
    made: Backend
    if request.param == "real":
        made = RealBackend(request.node.name, request.getfixturevalue("kafka"))
    else:
        made = FakeBackend(request.node.name)
    yield made
    made.close()


def _all(topic: str, partitions: int) -> TPs:
    return {(topic, p) for p in range(partitions)}


# -- consuming ------------------------------------------------------------------------------


def test_a_consumer_needs_a_group_id(backend: Backend) -> None:
    with pytest.raises(ValueError, match=r"group\.id must be set"):
        backend.raw_consumer({})


def test_subscribe_assigns_every_partition_on_the_polling_thread(backend: Backend) -> None:
    topic = backend.topic(3)
    member = backend.member(backend.group(), [topic])
    assert member.events == []  # callbacks come from consume()/poll(), not subscribe()
    until([member], lambda: bool(member.held), "the assignment")
    assert member.events == [("assign", _all(topic, 3))]
    assert {(tp.topic, tp.partition) for tp in member.consumer.assignment()} == _all(topic, 3)
    assert member.threads == {threading.get_ident()}


def test_callbacks_run_on_the_thread_that_polls(backend: Backend) -> None:
    topic = backend.topic(2)
    member = backend.member(backend.group(), [topic])
    seen: list[BaseException] = []

    def work() -> None:
        try:
            until([member], lambda: bool(member.held), "the assignment")
            member.consumer.close()
        except BaseException as e:
            seen.append(e)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(30)
    assert not seen
    assert member.kinds() == ["assign", "revoke"]
    assert member.threads == {worker.ident}


def test_consume_returns_every_message_in_offset_order(backend: Backend) -> None:
    topic = backend.topic(3)
    producer = backend.producer()
    sent: dict[int, list[tuple[bytes, bytes, int]]] = {0: [], 1: [], 2: []}
    for i in range(12):
        key, value, stamp = b"k%d" % i, b"value %d" % i, 1_700_000_000_000 + i
        producer.produce(topic, value=value, key=key, partition=i % 3, timestamp=stamp,
                         headers=[("n", str(i).encode()), ("empty", None)])
        sent[i % 3].append((key, value, stamp))
    assert producer.flush(30) == 0
    member = backend.member(backend.group(), [topic])
    until([member], lambda: len(member.messages) >= 12, "12 messages")
    assert len(member.messages) == 12
    for p in range(3):
        got = [m for m in member.messages if m.partition() == p]
        assert [m.offset() for m in got] == [0, 1, 2, 3]
        assert [(m.key(), m.value(), m.timestamp()[1]) for m in got] == sent[p]
        for m in got:
            assert m.topic() == topic
            assert m.error() is None
            assert m.timestamp()[0] == TIMESTAMP_CREATE_TIME
            assert m.headers() == [("n", m.value()[6:]), ("empty", None)]
            assert len(m) == len(m.value())


def test_consume_returns_at_most_num_messages_and_never_one_twice(backend: Backend) -> None:
    topic = backend.topic(1)
    backend.produce(topic, 10)
    member = backend.member(backend.group(), [topic])
    deadline = time.monotonic() + 20
    while len(member.messages) < 10 and time.monotonic() < deadline:
        assert len(member.consume(num_messages=3, timeout=0.5)) <= 3
    assert member.offsets(topic, 0) == list(range(10))
    assert [m.value() for m in member.messages] == [b"v%d" % i for i in range(10)]


def test_consume_with_nothing_there_returns_empty_after_the_timeout(backend: Backend) -> None:
    topic = backend.topic(1)
    member = backend.member(backend.group(), [topic])
    until([member], lambda: bool(member.held), "the assignment")
    started = time.monotonic()
    assert member.consumer.consume(10, 0.3) == []
    assert 0.25 <= time.monotonic() - started < 2
    started = time.monotonic()
    assert member.consumer.poll(0.2) is None
    assert 0.15 <= time.monotonic() - started < 2


def test_poll_returns_one_message(backend: Backend) -> None:
    topic = backend.topic(1)
    backend.produce(topic, 3)
    member = backend.member(backend.group(), [topic])
    got: list[Message] = []
    deadline = time.monotonic() + 20
    while len(got) < 3 and time.monotonic() < deadline:
        message = member.consumer.poll(0.2)
        if message is not None and message.error() is None:
            got.append(message)
    assert [m.offset() for m in got] == [0, 1, 2]


def test_a_consumer_on_a_new_group_starts_by_auto_offset_reset(backend: Backend) -> None:
    topic = backend.topic(1)
    backend.produce(topic, 3)
    late = backend.member(backend.group(), [topic], {"auto.offset.reset": "latest"})
    until([late], lambda: bool(late.held), "the assignment")
    until([late], lambda: late.consumer.position([TopicPartition(topic, 0)])[0].offset == -1001
          and late.consumer.get_watermark_offsets(TopicPartition(topic, 0), cached=True)[1] == 3,
          "fetching to start")
    backend.produce(topic, 2, start=3)
    until([late], lambda: len(late.messages) >= 2, "the new messages")
    assert late.offsets(topic, 0) == [3, 4]


# -- offsets --------------------------------------------------------------------------------


def test_a_new_member_starts_at_the_committed_offset(backend: Backend) -> None:
    topic, group = backend.topic(1), backend.group()
    backend.produce(topic, 6)
    first = backend.member(group, [topic])
    until([first], lambda: len(first.messages) >= 6, "6 messages")
    done = first.consumer.commit(offsets=[TopicPartition(topic, 0, 4)], asynchronous=False)
    assert [(tp.topic, tp.partition, tp.offset) for tp in done] == [(topic, 0, 4)]
    first.consumer.close()
    assert backend.committed(group, topic, 0) == 4
    second = backend.member(group, [topic])
    until([second], lambda: len(second.messages) >= 2, "the rest")
    second.consume(100, 0.3)
    assert second.offsets(topic, 0) == [4, 5]


def test_committed_returns_what_was_committed_and_on_commit_reports_it(backend: Backend) -> None:
    topic, group = backend.topic(2), backend.group()
    backend.produce(topic, 8, partitions=2)
    member = backend.member(group, [topic])
    tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
    assert [tp.offset for tp in member.consumer.committed(tps, timeout=10)] == [-1001, -1001]
    until([member], lambda: len(member.messages) >= 8, "8 messages")
    assert member.consumer.commit(offsets=[TopicPartition(topic, 0, 3)]) is None  # asynchronous
    until([member], lambda: bool(member.commits), "the commit report")
    assert member.commits == [(None, [(topic, 0, 3)])]
    assert [tp.offset for tp in member.consumer.committed(tps, timeout=10)] == [3, -1001]
    assert backend.committed(group, topic, 0) == 3


def test_commit_of_a_message_and_of_the_positions(backend: Backend) -> None:
    topic, group = backend.topic(2), backend.group()
    member = backend.member(group, [topic])
    until([member], lambda: bool(member.held), "the assignment")
    with pytest.raises(KafkaException) as raised:
        member.consumer.commit(asynchronous=False)  # nothing consumed yet
    assert raised.value.args[0].code() == KafkaError._NO_OFFSET
    backend.produce(topic, 3, partitions=1)
    until([member], lambda: len(member.messages) >= 3, "3 messages")
    positions = member.consumer.position([TopicPartition(topic, 0), TopicPartition(topic, 1)])
    assert [tp.offset for tp in positions] == [3, OFFSET_INVALID]
    member.consumer.commit(message=member.messages[0], asynchronous=False)
    assert backend.committed(group, topic, 0) == 1
    done = member.consumer.commit(asynchronous=False)
    assert [(tp.partition, tp.offset) for tp in done] == [(0, 3), (1, OFFSET_INVALID)]
    assert backend.committed(group, topic, 0) == 3
    assert backend.committed(group, topic, 1) == OFFSET_INVALID


def test_a_committed_offset_past_the_end_starts_over_by_auto_offset_reset(backend: Backend) -> None:
    topic, group = backend.topic(1), backend.group()
    backend.produce(topic, 2)
    first = backend.member(group, [topic])
    until([first], lambda: bool(first.held), "the assignment")
    first.consumer.commit(offsets=[TopicPartition(topic, 0, 1000)], asynchronous=False)
    first.consumer.close()
    second = backend.member(group, [topic])
    until([second], lambda: len(second.messages) >= 2, "2 messages")
    assert second.offsets(topic, 0) == [0, 1]


def test_pause_stops_a_partition_and_resume_goes_on_with_the_next_offset(backend: Backend) -> None:
    topic = backend.topic(2)
    backend.produce(topic, 6, partitions=2)
    member = backend.member(backend.group(), [topic])
    deadline = time.monotonic() + 20
    while not member.offsets(topic, 0) and time.monotonic() < deadline:
        member.consume(num_messages=1, timeout=0.2)
    before = member.offsets(topic, 0)
    assert before and before[0] == 0
    member.consumer.pause([TopicPartition(topic, 0)])
    backend.produce(topic, 4, partitions=2, start=6)
    until([member], lambda: len(member.offsets(topic, 1)) >= 5, "partition 1 to go on")
    member.consume(100, 0.5)
    assert member.offsets(topic, 0) == before  # nothing of the paused partition
    assert member.consumer.position([TopicPartition(topic, 0)])[0].offset == before[-1] + 1
    member.consumer.resume([TopicPartition(topic, 0)])
    until([member], lambda: len(member.offsets(topic, 0)) >= 5, "partition 0 after resume")
    member.consume(100, 0.3)
    assert member.offsets(topic, 0) == [0, 1, 2, 3, 4]  # nothing lost, nothing repeated
    assert member.offsets(topic, 1) == [0, 1, 2, 3, 4]


def test_seek_fetches_from_the_given_offset(backend: Backend) -> None:
    topic = backend.topic(2)
    backend.produce(topic, 4)
    member = backend.member(backend.group(), [topic])
    until([member], lambda: len(member.messages) >= 4, "4 messages")
    member.consumer.seek(TopicPartition(topic, 0, 1))
    until([member], lambda: len(member.messages) >= 7, "3 more")
    member.consumer.seek(TopicPartition(topic, 0, OFFSET_BEGINNING))
    until([member], lambda: len(member.messages) >= 11, "4 more")
    assert member.offsets(topic, 0) == [0, 1, 2, 3, 1, 2, 3, 0, 1, 2, 3]
    with pytest.raises(KafkaException) as raised:
        member.consumer.seek(TopicPartition(topic + ".none", 0, 1))
    assert raised.value.args[0].code() == KafkaError._UNKNOWN_PARTITION


def test_watermarks(backend: Backend) -> None:
    topic = backend.topic(2)
    backend.produce(topic, 5)
    member = backend.member(backend.group(), [topic])
    tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    assert member.consumer.get_watermark_offsets(tp0, cached=True) == (OFFSET_INVALID, OFFSET_INVALID)
    assert member.consumer.get_watermark_offsets(tp0, timeout=10) == (0, 5)
    assert member.consumer.get_watermark_offsets(tp1, timeout=10) == (0, 0)
    until([member], lambda: len(member.messages) >= 5, "5 messages")
    assert member.consumer.get_watermark_offsets(tp0, cached=True) == (0, 5)
    with pytest.raises(KafkaException) as raised:
        member.consumer.get_watermark_offsets(TopicPartition(topic, 7), timeout=5)
    assert raised.value.args[0].code() == KafkaError._UNKNOWN_PARTITION


# -- the group ------------------------------------------------------------------------------


def test_a_second_member_splits_the_partitions_and_nothing_is_returned_twice(backend: Backend) -> None:
    topic, group = backend.topic(4), backend.group()
    backend.produce(topic, 20, partitions=4)
    first = backend.member(group, [topic], commit=True)
    until([first], lambda: len(first.messages) >= 20, "the first 20")
    second = backend.member(group, [topic], commit=True)
    backend.produce(topic, 20, partitions=4, start=20)
    until([first, second], lambda: bool(second.held) and len(first.held) == 2, "the rebalance")
    backend.produce(topic, 20, partitions=4, start=40)
    until([first, second], lambda: len(first.messages) + len(second.messages) >= 60, "all 60")
    for member in (first, second):
        member.consume(100, 0.3)

    assert first.kinds() == ["assign", "revoke", "assign"]
    assert first.events[0] == ("assign", _all(topic, 4))
    assert [e for e in first.events if e[0] == "revoke"] == [("revoke", _all(topic, 4))]
    assert second.kinds() == ["assign"]
    assert first.held & second.held == set()
    assert first.held | second.held == _all(topic, 4)
    assert len(first.held) == len(second.held) == 2
    returned = [(m.partition(), m.offset()) for m in first.messages + second.messages]
    assert len(returned) == len(set(returned)) == 60
    for member in (first, second):
        last = [i for i, e in enumerate(member.events) if e[0] == "assign"][-1]
        assert {what[:2] for kind, what in member.events[last:] if kind == "message"} <= member.held
    for p in range(4):
        assert backend.committed(group, topic, p) == 15


COOPERATIVE = {"partition.assignment.strategy": "cooperative-sticky"}


def test_a_cooperative_rebalance_revokes_only_what_moves(backend: Backend) -> None:
    """cooperative-sticky: when a second member joins, the first is revoked only the two
    partitions that go to it, and goes on fetching the two it keeps; nothing twice."""
    topic, group = backend.topic(4), backend.group()
    backend.produce(topic, 20, partitions=4)
    first = backend.member(group, [topic], COOPERATIVE, commit=True)
    until([first], lambda: len(first.messages) >= 20, "the first 20")
    second = backend.member(group, [topic], COOPERATIVE, commit=True)
    until([first, second], lambda: len(second.held) == 2 and len(first.held) == 2, "the rebalance")
    backend.produce(topic, 20, partitions=4, start=20)
    until([first, second], lambda: len(first.messages) + len(second.messages) >= 40, "all 40")

    assert first.events[0] == ("assign", _all(topic, 4))
    revoked = [what for kind, what in first.events if kind == "revoke"]
    assert revoked == [second.held]  # only what moved, once
    assert not [e for e in second.events if e[0] == "revoke"]
    assert first.held | second.held == _all(topic, 4) and not first.held & second.held
    returned = [(m.partition(), m.offset()) for m in first.messages + second.messages]
    assert len(returned) == len(set(returned)) == 40


def test_a_cooperative_member_leaving_moves_only_its_own(backend: Backend) -> None:
    topic, group = backend.topic(4), backend.group()
    first = backend.member(group, [topic], COOPERATIVE)
    second = backend.member(group, [topic], COOPERATIVE)
    until([first, second], lambda: len(first.held) == 2 and len(second.held) == 2, "two shares")
    kept = set(first.held)
    second.consumer.close()
    until([first], lambda: len(first.held) == 4, "the first takes the rest")
    assert not [e for e in first.events if e[0] == "revoke" and e[1] & kept]


def test_a_paused_partition_stays_paused_across_a_rebalance(backend: Backend) -> None:
    """librdkafka keeps a partition paused through an eager rebalance, until it is resumed:
    the service resumes what it is newly assigned (this stalled a partition once)."""
    topic, group = backend.topic(1), backend.group()
    backend.produce(topic, 2)
    first = backend.member(group, [topic])
    until([first], lambda: len(first.messages) >= 2, "the first 2")
    first.consumer.pause([TopicPartition(topic, 0)])
    second = backend.member(group, [topic])
    until([first, second], lambda: "assign" in second.kinds() and first.kinds().count("assign") == 2,
          "the rebalance")
    second.consumer.close()
    until([first], lambda: first.kinds().count("assign") == 3, "the partition back")
    backend.produce(topic, 3, start=2)
    first.consume(100, 1.0)
    assert first.offsets(topic, 0) == [0, 1], "a paused partition fetched after the rebalance"
    first.consumer.resume([TopicPartition(topic, 0)])
    until([first], lambda: len(first.offsets(topic, 0)) >= 5, "the rest after resume")


def test_a_member_leaving_hands_its_partitions_over(backend: Backend) -> None:
    topic, group = backend.topic(4), backend.group()
    first = backend.member(group, [topic])
    second = backend.member(group, [topic])
    until([first, second], lambda: len(first.held) == len(second.held) == 2, "the split")
    second.consumer.close()
    assert second.kinds()[-1] == "revoke"  # from close(), on this thread
    assert second.events[-1] == ("revoke", second.events[-2][1])
    until([first], lambda: len(first.held) == 4, "the hand-over")
    assert first.kinds()[-2:] == ["revoke", "assign"]
    with pytest.raises(RuntimeError):
        second.consumer.consume(1, 0)
    second.consumer.close()  # a second close is harmless


def test_close_calls_on_revoke(backend: Backend) -> None:
    topic = backend.topic(2)
    member = backend.member(backend.group(), [topic])
    until([member], lambda: bool(member.held), "the assignment")
    member.consumer.close()
    assert member.events == [("assign", _all(topic, 2)), ("revoke", _all(topic, 2))]
    assert member.threads == {threading.get_ident()}
    with pytest.raises(RuntimeError):
        member.consumer.assignment()


def test_a_member_with_nothing_to_do_is_assigned_and_revoked_nothing(backend: Backend) -> None:
    topic, group = backend.topic(1), backend.group()
    first = backend.member(group, [topic])
    until([first], lambda: bool(first.held), "the assignment")
    second = backend.member(group, [topic])
    until([first, second], lambda: "assign" in second.kinds() and first.kinds().count("assign") == 2,
          "the rebalance")
    assert len(first.held) + len(second.held) == 1
    idle = second if not second.held else first
    assert idle.events[-1] == ("assign", set())
    idle.consumer.close()
    assert idle.events[-1] == ("revoke", set())


def test_a_lost_member_gets_on_lost_and_joins_again(backend: Backend) -> None:
    topic, group = backend.topic(2), backend.group()
    backend.produce(topic, 4, partitions=2)
    quick = {"max.poll.interval.ms": 6000}
    first = backend.member(group, [topic], quick, commit=True)
    second = backend.member(group, [topic], quick, commit=True)
    until([first, second], lambda: len(first.held) == len(second.held) == 1, "the split")
    held, seen = frozenset(first.held), len(first.kinds())
    backend.lose(first)
    # The first member does not poll; the group goes on without it.
    until([second], lambda: len(second.held) == 2, "the group to drop the first member", timeout=30)
    assert len(first.kinds()) == seen
    until([first], lambda: "lost" in first.kinds(), "on_lost")
    assert first.kinds()[seen] == "lost"  # not "revoke"
    assert ("lost", held) in first.events
    until([first, second], lambda: len(first.held) == len(second.held) == 1, "the member back")
    backend.produce(topic, 4, partitions=2, start=4)
    until([first, second], lambda: len(first.messages) + len(second.messages) >= 8, "all 8")
    returned = [(m.partition(), m.offset()) for m in first.messages + second.messages]
    assert sorted(returned) == sorted(set(returned))


# -- producing ------------------------------------------------------------------------------


def test_produced_messages_are_read_back_and_reported_on_poll_and_flush(backend: Backend) -> None:
    topic = backend.topic(2)
    producer = backend.producer()
    reports: list[tuple[KafkaError | None, Message]] = []
    producer.produce(topic, value=b"one", key=b"k1", partition=0, headers=[("a", b"1")],
                     on_delivery=lambda err, msg: reports.append((err, msg)))
    assert reports == []  # reports come from poll() and flush() only
    assert len(producer) >= 1
    deadline = time.monotonic() + 20
    while not reports and time.monotonic() < deadline:
        producer.poll(0.1)
    producer.produce(topic, "two", "k2", 1, lambda err, msg: reports.append((err, msg)),
                     headers={"b": "2", "c": None})
    producer.produce(topic, None, key=b"k3", partition=1, timestamp=1_600_000_000_000,
                     callback=lambda err, msg: reports.append((err, msg)))
    assert producer.flush(30) == 0
    assert len(producer) == 0
    assert [(e, m.topic(), m.partition(), m.offset(), m.key(), m.value()) for e, m in reports] == [
        (None, topic, 0, 0, b"k1", b"one"), (None, topic, 1, 0, b"k2", b"two"),
        (None, topic, 1, 1, b"k3", None)]
    assert [m.headers() for _, m in reports] == [None, None, None]  # not carried on reports
    assert reports[2][1].timestamp() == (TIMESTAMP_CREATE_TIME, 1_600_000_000_000)

    member = backend.member(backend.group(), [topic])
    until([member], lambda: len(member.messages) >= 3, "3 messages")
    got = sorted(member.messages, key=lambda m: (m.partition(), m.offset()))
    assert [(m.key(), m.value(), m.headers()) for m in got] == [
        (b"k1", b"one", [("a", b"1")]), (b"k2", b"two", [("b", b"2"), ("c", None)]), (b"k3", None, None)]
    assert len(got[2]) == 0


def test_a_full_queue_raises_buffer_error_until_reports_are_served(backend: Backend) -> None:
    topic = backend.topic(1)
    producer = backend.producer({"queue.buffering.max.messages": 2})
    producer.produce(topic, b"a")
    producer.produce(topic, b"b")
    with pytest.raises(BufferError):
        producer.produce(topic, b"c")
    assert producer.flush(30) == 0
    producer.produce(topic, b"c")
    assert producer.flush(30) == 0


def test_message_size_limits(backend: Backend) -> None:
    topic = backend.topic(1)
    producer = backend.producer()
    with pytest.raises(KafkaException) as raised:
        producer.produce(topic, b"x" * 1_100_000)  # over the producer's message.max.bytes
    assert raised.value.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE
    big = backend.producer({"message.max.bytes": 3_000_000})
    reports: list[KafkaError | None] = []
    big.produce(topic, b"x" * 1_500_000, on_delivery=lambda err, _m: reports.append(err))
    big.produce(topic, b"y" * 1_000_000, on_delivery=lambda err, _m: reports.append(err))
    assert big.flush(30) == 0
    assert reports[0] is not None and reports[0].code() == KafkaError.MSG_SIZE_TOO_LARGE  # the broker's
    assert reports[1] is None


def test_producing_to_a_partition_that_does_not_exist_raises(backend: Backend) -> None:
    topic = backend.topic(2)
    producer = backend.producer()
    producer.produce(topic, b"first")
    assert producer.flush(30) == 0
    with pytest.raises(KafkaException) as raised:
        producer.produce(topic, b"x", partition=7)
    assert raised.value.args[0].code() == KafkaError._UNKNOWN_PARTITION


# -- the fake's own controls ----------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeBackend]:
    """The fake backend alone, for what only a test can do to it."""
    made = FakeBackend("fake")
    yield made
    made.close()


def test_fake_never_returns_a_revoked_partition_after_on_revoke(fake: FakeBackend) -> None:
    topic, group = fake.topic(4), fake.group()
    fake.produce(topic, 400, partitions=4)
    first = fake.member(group, [topic], commit=True)
    first.consume(num_messages=3, timeout=0)
    second = fake.member(group, [topic], commit=True)
    until([first, second], lambda: len(first.messages) + len(second.messages) >= 400, "all 400",
          timeout=10)
    for member in (first, second):
        held: TPs = set()
        for kind, what in member.events:
            if kind == "assign":
                held = set(what)
            elif kind in ("revoke", "lost"):
                held -= what
            else:
                assert kind == "message"  # not "dropped": none came from a partition not held
                assert what[:2] in held
    returned = [(m.partition(), m.offset()) for m in first.messages + second.messages]
    assert len(set(returned)) == len(returned) == 400


def test_fake_rebalance_waits_for_every_member_to_let_go(fake: FakeBackend) -> None:
    topic, group = fake.topic(2), fake.group()
    first = fake.member(group, [topic])
    until([first], lambda: bool(first.held), "the assignment")
    second = fake.member(group, [topic])
    second.consume(timeout=0.1)
    assert second.events == []  # the first member still holds everything
    assert fake.cluster.assignments(group)[first.consumer.memberid()] == sorted(_all(topic, 2))
    first.consume(timeout=0)  # lets go, and being the last, gets its new share at once
    assert first.kinds() == ["assign", "revoke", "assign"]
    second.consume(timeout=0)
    assert len(first.held) == len(second.held) == 1
    assert first.held | second.held == _all(topic, 2)


def test_fake_member_that_stops_polling_is_dropped_after_max_poll_interval(fake: FakeBackend) -> None:
    topic, group = fake.topic(2), fake.group()
    first = fake.member(group, [topic], {"max.poll.interval.ms": 300})
    until([first], lambda: bool(first.held), "the assignment")
    second = fake.member(group, [topic])
    started = time.monotonic()
    until([second], lambda: len(second.held) == 2, "the straggler to be dropped", timeout=5)
    assert time.monotonic() - started < 2
    first.consume(timeout=0)
    assert first.kinds()[:2] == ["assign", "lost"]


def test_fake_lost_member_cannot_commit_until_it_is_assigned_again(fake: FakeBackend) -> None:
    topic, group = fake.topic(1), fake.group()
    fake.produce(topic, 3)
    member = fake.member(group, [topic])
    until([member], lambda: len(member.messages) >= 3, "3 messages")
    refused: list[KafkaException] = []

    def on_lost(consumer: Any, partitions: list[TopicPartition]) -> None:
        try:
            consumer.commit(offsets=[TopicPartition(topic, 0, 3)], asynchronous=False)
        except KafkaException as e:
            refused.append(e)

    member.also_on_lost = on_lost
    fake.cluster.expire(member.consumer)
    until([member], lambda: member.kinds()[-2:] == ["lost", "assign"], "the member back")
    assert member.kinds() == ["assign", "lost", "assign"]
    assert [e.args[0].code() for e in refused] == [KafkaError.UNKNOWN_MEMBER_ID]
    assert fake.cluster.committed(group, topic, 0) == OFFSET_INVALID
    assert [(c.offset, c.error is not None) for c in fake.cluster.commits(group)] == [(3, True)]
    member.consumer.commit(offsets=[TopicPartition(topic, 0, 3)], asynchronous=False)
    assert fake.cluster.committed(group, topic, 0) == 3


def test_fake_failures_on_demand(fake: FakeBackend) -> None:
    topic, group = fake.topic(1), fake.group()
    producer = fake.producer()
    reports: list[tuple[KafkaError | None, int | None]] = []
    fake.cluster.fail_next_produce("Broker: Message size too large", code=KafkaError.MSG_SIZE_TOO_LARGE)
    fake.cluster.fail_next_produce(buffer_error=True)
    producer.produce(topic, b"refused", on_delivery=lambda e, m: reports.append((e, m.offset())))
    with pytest.raises(BufferError):
        producer.produce(topic, b"not queued")
    producer.produce(topic, b"kept", on_delivery=lambda e, m: reports.append((e, m.offset())))
    assert producer.poll(0) == 2
    assert reports[0][0] is not None and reports[0][0].code() == KafkaError.MSG_SIZE_TOO_LARGE
    assert reports[0][0].str() == "Broker: Message size too large" and reports[0][1] is None
    assert reports[1] == (None, 0)
    assert [m.value() for m in fake.cluster.messages(topic, 0)] == [b"kept"]

    member = fake.member(group, [topic])
    until([member], lambda: bool(member.messages), "the message")
    fake.cluster.fail_next_commit()
    with pytest.raises(KafkaException) as raised:
        member.consumer.commit(asynchronous=False)
    assert raised.value.args[0].code() == KafkaError.REQUEST_TIMED_OUT
    fake.cluster.fail_next_commit()
    member.consumer.commit()
    until([member], lambda: bool(member.commits), "the commit report")
    assert member.commits[0][0] is not None and member.commits[0][1] == [(topic, 0, 1)]
    assert fake.cluster.committed(group, topic, 0) == OFFSET_INVALID


def test_fake_consume_wakes_when_a_message_is_produced_from_another_thread(fake: FakeBackend) -> None:
    topic = fake.topic(1)
    member = fake.member(fake.group(), [topic])
    until([member], lambda: bool(member.held), "the assignment")
    timer = threading.Timer(0.2, lambda: fake.cluster.produce(topic, b"late"))
    timer.start()
    started = time.monotonic()
    got = member.consumer.consume(100, 10)
    timer.join()
    assert [m.value() for m in got] == [b"late"]
    assert time.monotonic() - started < 5


def test_fake_cluster_helpers(fake: FakeBackend) -> None:
    cluster = fake.cluster
    cluster.create_topic("t", 2)
    with pytest.raises(ValueError):
        cluster.create_topic("t", 2)
    assert [cluster.produce("t", b"a"), cluster.produce("t", "b"), cluster.produce("t", b"c")] == [0, 0, 1]
    assert cluster.produce("t", b"d", key="k", partition=1, headers={"h": "v"}, timestamp=5) == 1
    last = cluster.messages("t", 1)[-1]
    assert (last.key(), last.value(), last.headers(), last.timestamp()) == (b"k", b"d", [("h", b"v")],
                                                                           (TIMESTAMP_CREATE_TIME, 5))
    assert cluster.watermarks("t", 0) == (0, 2)
    cluster.delete_records("t", 0, 1)
    assert cluster.watermarks("t", 0) == (1, 2)
    assert [m.offset() for m in cluster.messages("t", 0)] == [1]
    assert cluster.topics() == {"t": 2}
    cluster.set_committed("g", "t", 0, 1)
    assert cluster.committed("g", "t", 0) == 1
    assert cluster.committed("g", "t", 1) == OFFSET_INVALID
    member = fake.member("g", ["^t$"])
    until([member], lambda: len(member.messages) >= 3, "3 messages")
    assert sorted((m.partition(), m.offset()) for m in member.messages) == [(0, 1), (1, 0), (1, 1)]
    cluster.produce("t2", b"auto-created")
    assert cluster.topics() == {"t": 2, "t2": 1}


def test_fake_subscription_to_a_topic_created_later(fake: FakeBackend) -> None:
    waiting = fake.member(fake.group(), ["later"])
    waiting.consume(timeout=0)
    assert waiting.events == [("assign", frozenset())]
    fake.cluster.create_topic("later", 2)
    until([waiting], lambda: len(waiting.held) == 2, "the new topic")
    assert waiting.kinds() == ["assign", "revoke", "assign"]
