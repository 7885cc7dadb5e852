"""An in-memory Kafka for tests: a cluster, its consumers and producers, shaped like confluent-kafka's.

:class:`FakeConsumer` and :class:`FakeProducer` take the same configuration dictionaries
as ``confluent_kafka.Consumer`` and ``Producer`` and offer the subset of their methods
that restconsumer uses; messages are real ``confluent_kafka.Message`` objects and offsets
travel in real ``TopicPartition`` objects. ``tests/test_fake_kafka_contract.py`` runs the
same tests against these fakes and against a real broker.

The consumer group follows the classic eager protocol: when a member joins or leaves,
every member, at its next ``consume()``/``poll()`` and on that calling thread, gets
``on_revoke`` with everything it holds; once every member has done so the partitions are
dealt out round-robin and each member gets ``on_assign`` with its share at its next call.
A group whose members all set ``partition.assignment.strategy: cooperative-sticky``
rebalances incrementally instead: each member keeps what it holds up to its fair share,
gets ``on_revoke`` with only what goes to others (and goes on fetching the rest), and,
once every member has let go of those, ``on_assign`` with only what is new to it.
A member that does not call in (see ``max.poll.interval.ms``) holds the rebalance up, as
with a real broker.

Where the fake knowingly differs from librdkafka:

- ``consume(n, timeout)`` returns as soon as at least one message is there, where
  librdkafka waits for ``n`` messages or the timeout;
- nothing is pre-fetched, so nothing fetched-but-unreturned is ever thrown away;
- producing is instantaneous: a message is readable as soon as ``produce()`` returns,
  and its delivery report is served by the next ``poll()``/``flush()``;
- a member whose ``max.poll.interval.ms`` ran out is treated like :meth:`FakeCluster.expire`
  (``on_lost`` at its next call); no ``_MAX_POLL_EXCEEDED`` error message is returned;
- subscriptions to topics created later take effect at once, not at a metadata refresh;
- the assignor is round-robin, or cooperative-sticky when every member asks for it (its
  plan is simpler than librdkafka's: fair shares by member order, sticky where it can be);
- ``auto.offset.reset: error`` behaves like ``latest``.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    OFFSET_INVALID,
    OFFSET_STORED,
    TIMESTAMP_CREATE_TIME,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

__all__ = ["FakeCluster", "FakeCommit", "FakeConsumer", "FakeProducer", "HeadersArg", "RebalanceCallback"]

_TP = tuple[str, int]
#: What ``produce()`` accepts as headers: a list of (name, value) pairs or a dict.
HeadersArg = list[tuple[str, bytes | str | None]] | Mapping[str, bytes | str | None] | None
#: Headers as kept with a record: values are bytes (or None); typed as ``Message(headers=...)`` takes them.
_HeaderList = list[tuple[str, bytes | str | None]]
#: ``on_assign``/``on_revoke``/``on_lost``: called with the consumer and its partitions.
RebalanceCallback = Callable[[Any, list[TopicPartition]], None]

#: Bytes a broker adds around one record in a batch (batch header and record framing).
_RECORD_OVERHEAD = 70
_RESET_EARLIEST = {"smallest", "earliest", "beginning"}


class FakeCommit(NamedTuple):
    """One offset commit a consumer asked for; ``error`` is None when it was accepted."""

    group: str
    member: str
    topic: str
    partition: int
    offset: int
    error: KafkaError | None


class _Record(NamedTuple):
    key: bytes | None
    value: bytes | None
    headers: _HeaderList | None
    timestamp: int


@dataclass
class _Fetch:
    """Where one assigned partition of one consumer stands."""

    shown: int  # the offset assignment() reports
    next: int | None = None  # the next offset to return; None until it is resolved
    app: int | None = None  # last returned + 1 (what position() says)
    stored: int | None = None  # store_offsets(), for commit() without offsets
    paused: bool = False
    fetched: bool = False


@dataclass(eq=False)
class _Group:
    name: str
    generation: int = 0
    members: list[FakeConsumer] = field(default_factory=list)
    assignment: dict[FakeConsumer, list[_TP]] | None = None
    #: Cooperative groups: the shares of this generation, planned from what members held.
    plan: dict[FakeConsumer, list[_TP]] | None = None


def _cooperative(group: _Group) -> bool:
    """Whether the group rebalances incrementally: every member asked for cooperative-sticky."""
    return bool(group.members) and all(m._cooperative for m in group.members)


class _Failure(NamedTuple):
    error: KafkaError | None  # None: raise BufferError instead


def _to_bytes(data: bytes | str | None) -> bytes | None:
    if data is None or isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode()
    return bytes(data)


def _headers(headers: HeadersArg) -> _HeaderList | None:
    if not headers:
        return None
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    return [(str(name), _to_bytes(value)) for name, value in pairs]


def _message(topic: str, partition: int, offset: int, record: _Record, *,
             headers: bool = True, error: KafkaError | None = None) -> Message:
    return Message(topic=topic, partition=partition, offset=offset, key=record.key, value=record.value,
                   headers=record.headers if headers else None, error=error,
                   timestamp=(TIMESTAMP_CREATE_TIME, record.timestamp))


def _after(message: Message) -> tuple[str, int, int] | None:
    """(topic, partition, offset + 1) of ``message``; None if it has no topic or partition."""
    topic, partition = message.topic(), message.partition()
    if topic is None or partition is None:
        return None
    return topic, partition, (message.offset() or 0) + 1


def _closed_check(closed: bool) -> None:
    if closed:
        raise RuntimeError("Consumer closed")


def _deadline(timeout: float | None) -> float | None:
    if timeout is None or timeout < 0:
        return None
    return time.monotonic() + timeout


class FakeCluster:
    """In-memory topics, committed offsets and consumer groups, shared by fake clients.

    Thread-safe: one lock guards everything, and its condition wakes waiting consumers
    and producers whenever something changes.
    """

    def __init__(self, *, auto_create_topics: bool = True, default_partitions: int = 1,
                 max_message_bytes: int = 1048588) -> None:
        """``auto_create_topics``: producing to an unknown topic creates it with
        ``default_partitions``; ``max_message_bytes``: the broker's ``message.max.bytes``."""
        self._cond = threading.Condition(threading.RLock())
        self._logs: dict[str, list[list[_Record]]] = {}
        self._low: dict[_TP, int] = {}
        self._round_robin: dict[str, itertools.count[int]] = {}
        self._offsets: dict[str, dict[_TP, int]] = {}
        self._groups: dict[str, _Group] = {}
        self._produce_failures: deque[_Failure] = deque()
        self._commit_failures: deque[KafkaError] = deque()
        self._commits: list[FakeCommit] = []
        self._member_ids = itertools.count(1)
        self.auto_create_topics = auto_create_topics
        self.default_partitions = default_partitions
        self.max_message_bytes = max_message_bytes

    # -- clients ---------------------------------------------------------------------------

    def consumer(self, config: dict[str, Any]) -> FakeConsumer:
        """A consumer on this cluster: a drop-in for ``confluent_kafka.Consumer(config)``."""
        return FakeConsumer(self, config)

    def producer(self, config: dict[str, Any] | None = None) -> FakeProducer:
        """A producer on this cluster: a drop-in for ``confluent_kafka.Producer(config)``."""
        return FakeProducer(self, config or {})

    # -- topics ----------------------------------------------------------------------------

    def create_topic(self, name: str, partitions: int = 1) -> None:
        """Create a topic; consumer groups subscribed to it rebalance."""
        if partitions < 1:
            raise ValueError("a topic needs at least one partition")
        with self._cond:
            if name in self._logs:
                raise ValueError(f"topic {name} already exists")
            self._create_locked(name, partitions)

    def topics(self) -> dict[str, int]:
        """Every topic with its number of partitions."""
        with self._cond:
            return {name: len(log) for name, log in self._logs.items()}

    def produce(self, topic: str, value: bytes | str | None, key: bytes | str | None = None,
                partition: int | None = None, headers: HeadersArg = None,
                timestamp: int | None = None) -> int:
        """Append a message at once (round-robin unless ``partition`` is given); its offset."""
        with self._cond:
            if topic not in self._logs:
                if not self.auto_create_topics:
                    raise KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
                self._create_locked(topic, self.default_partitions)
            if partition is None:
                partition = next(self._round_robin[topic]) % len(self._logs[topic])
            self._check_partition_locked(topic, partition)
            record = _Record(_to_bytes(key), _to_bytes(value), _headers(headers),
                             timestamp if timestamp else int(time.time() * 1000))
            return self._append_locked(topic, partition, record)

    def messages(self, topic: str, partition: int) -> list[Message]:
        """What ``topic[partition]`` holds, from its low watermark on."""
        with self._cond:
            self._check_partition_locked(topic, partition)
            log = self._logs[topic][partition]
            low = self._low[(topic, partition)]
            return [_message(topic, partition, offset, log[offset]) for offset in range(low, len(log))]

    def watermarks(self, topic: str, partition: int) -> tuple[int, int]:
        """``(low, high)``: the first offset still held and the next offset to be written."""
        with self._cond:
            self._check_partition_locked(topic, partition)
            return self._low[(topic, partition)], len(self._logs[topic][partition])

    def delete_records(self, topic: str, partition: int, before: int) -> None:
        """Drop the messages before offset ``before`` (as retention does): the low watermark moves."""
        with self._cond:
            self._check_partition_locked(topic, partition)
            high = len(self._logs[topic][partition])
            self._low[(topic, partition)] = max(self._low[(topic, partition)], min(before, high))
            self._cond.notify_all()

    # -- offsets ---------------------------------------------------------------------------

    def committed(self, group: str, topic: str, partition: int) -> int:
        """The group's committed offset of ``topic[partition]``; -1001 (OFFSET_INVALID) if none."""
        with self._cond:
            return self._offsets.get(group, {}).get((topic, partition), OFFSET_INVALID)

    def set_committed(self, group: str, topic: str, partition: int, offset: int) -> None:
        """Set a group's committed offset from outside, as an admin client would."""
        with self._cond:
            self._offsets.setdefault(group, {})[(topic, partition)] = offset

    def commits(self, group: str | None = None) -> list[FakeCommit]:
        """Every commit asked for so far (of ``group`` only, if given), refused ones included."""
        with self._cond:
            return [c for c in self._commits if group is None or c.group == group]

    # -- groups ----------------------------------------------------------------------------

    def assignments(self, group: str) -> dict[str, list[tuple[str, int]]]:
        """What each live member of ``group`` holds now, by member id."""
        with self._cond:
            found = self._groups.get(group)
            if found is None:
                return {}
            return {m._member_id: sorted(m._assignment) for m in found.members}

    def expire(self, consumer: FakeConsumer) -> None:
        """Make ``consumer`` lose its membership, as when its session times out.

        The rest of the group rebalances without it at once; ``consumer`` gets ``on_lost``
        (``on_revoke`` if it set none) at its next call, then joins again. Until its new
        assignment it is fenced: its commits fail with UNKNOWN_MEMBER_ID.
        """
        with self._cond:
            self._expire_locked(consumer)

    # -- fault injection -------------------------------------------------------------------

    def fail_next_produce(self, error_text: str = "Local: Message timed out", *,
                          code: int = KafkaError._MSG_TIMED_OUT, buffer_error: bool = False) -> None:
        """Make the next ``FakeProducer.produce()`` fail: its delivery report carries a
        ``KafkaError(code, error_text)`` and nothing is written; or, with ``buffer_error``,
        ``produce()`` raises BufferError. Calls add up: each fails one more produce."""
        with self._cond:
            self._produce_failures.append(_Failure(None if buffer_error else KafkaError(code, error_text)))

    def fail_next_commit(self, error_text: str = "Broker: Request timed out", *,
                         code: int = KafkaError.REQUEST_TIMED_OUT) -> None:
        """Make the next consumer commit fail with ``KafkaError(code, error_text)``."""
        with self._cond:
            self._commit_failures.append(KafkaError(code, error_text))

    # -- internals (callers hold the lock) -------------------------------------------------

    def _create_locked(self, name: str, partitions: int) -> None:
        self._logs[name] = [[] for _ in range(partitions)]
        self._round_robin[name] = itertools.count()
        for p in range(partitions):
            self._low[(name, p)] = 0
        for group in self._groups.values():
            if any(name in m._topics_locked() for m in group.members):
                self._rebalance_locked(group)
        self._cond.notify_all()

    def _check_partition_locked(self, topic: str, partition: int) -> None:
        if topic not in self._logs or not 0 <= partition < len(self._logs[topic]):
            raise KafkaException(KafkaError(KafkaError._UNKNOWN_PARTITION,
                                             f"Unknown partition {topic}[{partition}]"))

    def _append_locked(self, topic: str, partition: int, record: _Record) -> int:
        log = self._logs[topic][partition]
        log.append(record)
        self._cond.notify_all()
        return len(log) - 1

    def _high_locked(self, tp: _TP) -> int:
        return len(self._logs[tp[0]][tp[1]])

    def _group_locked(self, name: str) -> _Group:
        group = self._groups.get(name)
        if group is None:
            group = self._groups[name] = _Group(name)
        return group

    def _join_locked(self, consumer: FakeConsumer) -> None:
        group = self._group_locked(consumer._group_id)
        if consumer not in group.members:
            group.members.append(consumer)
            consumer._member_id = f"fake-{next(self._member_ids)}"
        self._rebalance_locked(group)

    def _leave_locked(self, consumer: FakeConsumer) -> None:
        group = self._groups.get(consumer._group_id)
        if group is not None and consumer in group.members:
            group.members.remove(consumer)
            self._rebalance_locked(group)

    def _expire_locked(self, consumer: FakeConsumer) -> None:
        group = self._groups.get(consumer._group_id)
        if group is None or consumer not in group.members:
            return
        consumer._lost = True
        consumer._fenced = True
        self._leave_locked(consumer)

    def _rebalance_locked(self, group: _Group) -> None:
        group.generation += 1
        group.assignment = None
        group.plan = None
        self._complete_locked(group)
        self._cond.notify_all()

    def _complete_locked(self, group: _Group) -> None:
        """Deal the partitions out once every member has let go of what it held."""
        if group.assignment is not None:
            return
        now = time.monotonic()
        for member in list(group.members):
            if member._joined < group.generation and member._stale_locked(now):
                self._expire_locked(member)  # rebalances again, and comes back here
                return
        if any(m._joined < group.generation for m in group.members):
            return
        group.assignment = self._plan_locked(group) if _cooperative(group) else self._deal_locked(group)
        self._cond.notify_all()

    def _deal_locked(self, group: _Group) -> dict[FakeConsumer, list[_TP]]:
        """Round-robin over every partition (the eager assignor)."""
        topics = {m: m._topics_locked() for m in group.members}
        partitions = sorted((t, p) for t in set().union(*topics.values()) if t in self._logs
                            for p in range(len(self._logs[t])))
        shares: dict[FakeConsumer, list[_TP]] = {m: [] for m in group.members}
        turn = itertools.cycle(group.members)
        for tp in partitions:
            for _ in range(len(group.members)):
                member = next(turn)
                if tp[0] in topics[member]:
                    shares[member].append(tp)
                    break
        return shares

    def _plan_locked(self, group: _Group) -> dict[FakeConsumer, list[_TP]]:
        """The cooperative-sticky shares of this generation: each member keeps what it holds
        up to its fair share, the rest is dealt to those below it (planned once)."""
        if group.plan is not None:
            return group.plan
        topics = {m: m._topics_locked() for m in group.members}
        partitions = sorted((t, p) for t in set().union(*topics.values()) if t in self._logs
                            for p in range(len(self._logs[t])))
        quota, extra = divmod(len(partitions), max(1, len(group.members)))
        shares: dict[FakeConsumer, list[_TP]] = {}
        taken: set[_TP] = set()
        for i, member in enumerate(group.members):
            fair = quota + (1 if i < extra else 0)
            kept = [tp for tp in sorted(member._assignment) if tp in partitions and tp[0] in topics[member]
                    and tp not in taken][:fair] if member._group_owned else []
            shares[member] = kept
            taken.update(kept)
        for tp in partitions:
            if tp in taken:
                continue
            wanting = [m for i, m in enumerate(group.members) if tp[0] in topics[m]]
            if wanting:
                member = min(wanting, key=lambda m: len(shares[m]))
                shares[member].append(tp)
                taken.add(tp)
        group.plan = shares
        return shares

    def _start_locked(self, group: str, tp: _TP, shown: int, reset: str) -> int:
        """Where fetching of ``tp`` starts for an assignment with offset ``shown``."""
        low, high = self._low[tp], self._high_locked(tp)
        if shown == OFFSET_BEGINNING:
            return low
        if shown == OFFSET_END:
            return high
        offset = shown if shown >= 0 else self._offsets.get(group, {}).get(tp, OFFSET_INVALID)
        if low <= offset <= high:
            return offset
        return low if reset in _RESET_EARLIEST else high


class FakeConsumer:
    """A drop-in for ``confluent_kafka.Consumer`` on a :class:`FakeCluster`.

    Honours ``group.id``, ``auto.offset.reset``, ``enable.auto.offset.store``,
    ``max.poll.interval.ms`` and ``on_commit`` from ``config``; ignores the rest.
    Callbacks run on the thread calling ``consume()``/``poll()``/``close()``, never
    under the cluster's lock, so they may call the consumer back.
    """

    def __init__(self, cluster: FakeCluster, config: dict[str, Any]) -> None:
        """Like ``Consumer(config)``: ``group.id`` is required."""
        if not config.get("group.id"):
            raise ValueError("Failed to create consumer: group.id must be set")
        self._cluster = cluster
        self._cond = cluster._cond
        self._group_id = str(config["group.id"])
        self._reset = str(config.get("auto.offset.reset", "largest")).lower()
        self._auto_store = str(config.get("enable.auto.offset.store", True)).lower() not in ("false", "0")
        self._max_poll = float(config.get("max.poll.interval.ms", 300000)) / 1000
        self._cooperative = str(config.get("partition.assignment.strategy", "")).strip().lower() \
            == "cooperative-sticky"
        self._on_commit: Callable[[KafkaError | None, list[TopicPartition]], None] | None = \
            config.get("on_commit")
        self._member_id = ""
        self._subscription: list[str] = []
        self._on_assign: RebalanceCallback | None = None
        self._on_revoke: RebalanceCallback | None = None
        self._on_lost: RebalanceCallback | None = None
        self._assignment: dict[_TP, _Fetch] = {}
        # As in librdkafka, a paused partition stays paused across rebalances until resumed.
        self._paused: set[_TP] = set()
        self._group_owned = False  # the assignment came from the group (a revoke is due on rebalance)
        self._joined = -1  # the group generation this member has let go of its partitions for
        self._assigned = -1  # the generation whose share it was given
        self._lost = False
        self._fenced = False
        self._reports: deque[tuple[KafkaError | None, list[TopicPartition]]] = deque()
        self._calling = 0
        self._last_call = time.monotonic()
        self._turn = 0
        self._closed = False

    # -- group -----------------------------------------------------------------------------

    def subscribe(self, topics: list[str], on_assign: RebalanceCallback | None = None,
                  on_revoke: RebalanceCallback | None = None,
                  on_lost: RebalanceCallback | None = None) -> None:
        """Join the group for ``topics`` (a name starting with ``^`` is a regex); the
        callbacks come at the next ``consume()``/``poll()``."""
        with self._cond:
            _closed_check(self._closed)
            self._subscription = list(topics)
            self._on_assign, self._on_revoke, self._on_lost = on_assign, on_revoke, on_lost
            self._last_call = time.monotonic()
            self._cluster._join_locked(self)

    def unsubscribe(self) -> None:
        """Leave the group: ``on_revoke`` for what is held, on this thread, then nothing more."""
        with self._cond:
            _closed_check(self._closed)
        self._let_go()

    def memberid(self) -> str | None:
        """This member's id in its group, None when not in one."""
        with self._cond:
            _closed_check(self._closed)
            return self._member_id if self._in_group_locked() else None

    def assignment(self) -> list[TopicPartition]:
        """The partitions held now."""
        with self._cond:
            _closed_check(self._closed)
            return [TopicPartition(t, p, f.shown) for (t, p), f in self._assignment.items()]

    def assign(self, partitions: list[TopicPartition]) -> None:
        """Replace the assignment (an offset >= 0 or a logical one says where to start;
        OFFSET_INVALID/OFFSET_STORED: the committed offset, else ``auto.offset.reset``)."""
        with self._cond:
            _closed_check(self._closed)
            self._assignment = {}
            for tp in partitions:
                shown = OFFSET_STORED if tp.offset == OFFSET_INVALID else tp.offset
                fetch = _Fetch(shown=shown)
                if (tp.topic, tp.partition) in self._cluster._low:
                    fetch.next = self._cluster._start_locked(self._group_id, (tp.topic, tp.partition),
                                                             shown, self._reset)
                self._assignment[(tp.topic, tp.partition)] = fetch
            self._cond.notify_all()

    def unassign(self) -> None:
        """Drop the whole assignment."""
        with self._cond:
            _closed_check(self._closed)
            self._assignment = {}

    # -- fetching --------------------------------------------------------------------------

    def consume(self, num_messages: int = 1, timeout: float | None = -1) -> list[Message]:
        """Up to ``num_messages`` messages, returned as soon as there is at least one; ``[]``
        after ``timeout`` seconds (-1: wait for ever). Due callbacks run first."""
        if not 0 <= num_messages <= 1_000_000:
            raise ValueError("num_messages must be between 0 and 1000000 (1M)")
        deadline = _deadline(timeout)
        with self._cond:
            _closed_check(self._closed)
            self._calling += 1
        try:
            while True:
                with self._cond:
                    _closed_check(self._closed)
                    step = self._next_step_locked()
                    if step is None:
                        batch = self._fetch_locked(num_messages)
                        now = time.monotonic()
                        if batch or num_messages == 0 or (deadline is not None and now >= deadline):
                            return batch
                        self._cond.wait(self._wait_locked(deadline, now))
                        continue
                step()
        finally:
            with self._cond:
                self._calling -= 1
                self._last_call = time.monotonic()

    def poll(self, timeout: float | None = None) -> Message | None:
        """One message, or None after ``timeout`` seconds (None or -1: wait for ever)."""
        batch = self.consume(1, -1 if timeout is None else timeout)
        return batch[0] if batch else None

    def pause(self, partitions: list[TopicPartition]) -> None:
        """Stop returning messages of these partitions (others are ignored)."""
        self._set_paused(partitions, True)

    def resume(self, partitions: list[TopicPartition]) -> None:
        """Return messages of these partitions again, from the one after the last returned."""
        self._set_paused(partitions, False)

    def seek(self, partition: TopicPartition) -> None:
        """Fetch ``partition`` from its ``offset`` next (it must be assigned)."""
        with self._cond:
            _closed_check(self._closed)
            tp = (partition.topic, partition.partition)
            fetch = self._assignment.get(tp)
            if fetch is None or tp not in self._cluster._low:
                raise KafkaException(KafkaError(
                    KafkaError._UNKNOWN_PARTITION,
                    f"Failed to seek to offset {partition.offset}: Local: Unknown partition"))
            fetch.next = self._cluster._start_locked(self._group_id, tp, partition.offset, self._reset)
            self._cond.notify_all()

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        """The offset after the last message returned of each partition (-1001 if none)."""
        with self._cond:
            _closed_check(self._closed)
            found = []
            for tp in partitions:
                fetch = self._assignment.get((tp.topic, tp.partition))
                app = fetch.app if fetch is not None and fetch.app is not None else OFFSET_INVALID
                found.append(TopicPartition(tp.topic, tp.partition, app))
            return found

    def get_watermark_offsets(self, partition: TopicPartition, timeout: float | None = None,
                              cached: bool = False) -> tuple[int, int]:
        """``(low, high)`` of a partition; ``cached``: (-1001, -1001) until it was fetched here."""
        with self._cond:
            _closed_check(self._closed)
            tp = (partition.topic, partition.partition)
            if tp not in self._cluster._low:
                raise KafkaException(KafkaError(KafkaError._UNKNOWN_PARTITION,
                                                "Failed to get watermark offsets: Local: Unknown partition"))
            if cached:
                fetch = self._assignment.get(tp)
                if fetch is None or not fetch.fetched:
                    return OFFSET_INVALID, OFFSET_INVALID
            return self._cluster._low[tp], self._cluster._high_locked(tp)

    # -- offsets ---------------------------------------------------------------------------

    def commit(self, message: Message | None = None, offsets: list[TopicPartition] | None = None,
               asynchronous: bool = True) -> list[TopicPartition] | None:
        """Commit ``message``'s offset + 1, or ``offsets``, or else the stored offsets.

        Synchronous: the committed offsets, or KafkaException. Asynchronous: None, and
        ``on_commit(error, partitions)`` at the next call.
        """
        if message is not None and offsets is not None:
            raise ValueError("message and offsets are mutually exclusive")
        with self._cond:
            _closed_check(self._closed)
            asked: list[tuple[str, int, int]]
            if message is not None:
                after = _after(message)
                if after is None:
                    raise KafkaException(KafkaError(KafkaError._INVALID_ARG))
                asked = [after]
            elif offsets is not None:
                asked = [(tp.topic, tp.partition, tp.offset) for tp in offsets]
            else:
                asked = []
                for (t, p), f in self._assignment.items():
                    stored = f.app if self._auto_store else f.stored
                    asked.append((t, p, OFFSET_INVALID if stored is None else stored))
            # As librdkafka does, partitions without a valid offset are left out of the commit.
            wanted = [w for w in asked if w[2] >= 0]
            error: KafkaError | None = None
            if not wanted:
                error = KafkaError(KafkaError._NO_OFFSET)
            elif self._fenced:
                error = KafkaError(KafkaError.UNKNOWN_MEMBER_ID)
            elif self._cluster._commit_failures:
                error = self._cluster._commit_failures.popleft()
            elif any((t, p) not in self._cluster._low for t, p, _ in wanted):
                error = KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)
            for t, p, offset in wanted:
                self._cluster._commits.append(
                    FakeCommit(self._group_id, self._member_id, t, p, offset, error))
                if error is None:
                    self._cluster._offsets.setdefault(self._group_id, {})[(t, p)] = offset
            done = [TopicPartition(t, p, offset) for t, p, offset in asked]
            if asynchronous:
                if self._on_commit is not None:
                    self._reports.append((error, done))
                    self._cond.notify_all()
                return None
        if error is not None:
            raise KafkaException(KafkaError(error.code(), f"Commit failed: {error.str()}"))
        return done

    def store_offsets(self, message: Message | None = None,
                      offsets: list[TopicPartition] | None = None) -> None:
        """Store offsets for ``commit()`` without arguments (needs ``enable.auto.offset.store`` off)."""
        with self._cond:
            _closed_check(self._closed)
            if self._auto_store:
                raise KafkaException(KafkaError(KafkaError._INVALID_ARG))
            if message is not None:
                after = _after(message)
                # A message without topic or partition matches no assigned partition.
                wanted = [] if after is None else [after]
            else:
                wanted = [(tp.topic, tp.partition, tp.offset) for tp in offsets or []]
            for t, p, offset in wanted:
                fetch = self._assignment.get((t, p))
                if fetch is not None:
                    fetch.stored = offset

    def committed(self, partitions: list[TopicPartition],
                  timeout: float | None = None) -> list[TopicPartition]:
        """The group's committed offset of each partition (-1001 where none)."""
        with self._cond:
            _closed_check(self._closed)
            offsets = self._cluster._offsets.get(self._group_id, {})
            return [TopicPartition(tp.topic, tp.partition,
                                   offsets.get((tp.topic, tp.partition), OFFSET_INVALID))
                    for tp in partitions]

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Serve pending commit reports, ``on_revoke`` what is held (on this thread), leave."""
        with self._cond:
            if self._closed:
                return
            reports = list(self._reports)
            self._reports.clear()
        try:
            for error, partitions in reports:
                if self._on_commit is not None:
                    self._on_commit(error, partitions)
            self._let_go()
        finally:
            with self._cond:
                self._closed = True
                self._assignment = {}
                self._cluster._leave_locked(self)
                self._cond.notify_all()

    # -- internals -------------------------------------------------------------------------

    def _in_group_locked(self) -> bool:
        group = self._cluster._groups.get(self._group_id)
        return group is not None and self in group.members

    def _topics_locked(self) -> set[str]:
        topics: set[str] = set()
        for name in self._subscription:
            if name.startswith("^"):
                pattern = re.compile(name)
                topics.update(t for t in self._cluster._logs if pattern.match(t))
            else:
                topics.add(name)
        return topics

    def _stale_locked(self, now: float) -> bool:
        return not self._calling and now - self._last_call > self._max_poll

    def _set_paused(self, partitions: list[TopicPartition], paused: bool) -> None:
        with self._cond:
            _closed_check(self._closed)
            for tp in partitions:
                key = (tp.topic, tp.partition)
                if paused:
                    self._paused.add(key)
                else:
                    self._paused.discard(key)
                fetch = self._assignment.get(key)
                if fetch is not None:
                    fetch.paused = paused
            self._cond.notify_all()

    def _let_go(self) -> None:
        """Revoke (or report lost) what the group gave, on this thread, and leave the group."""
        with self._cond:
            lost = self._lost
            held = self._partitions() if self._group_owned else None
            callback = (self._on_lost or self._on_revoke) if lost else self._on_revoke
            self._lost = False
        try:
            if held is not None and callback is not None:
                callback(self, held)
        finally:
            with self._cond:
                if held is not None:
                    self._assignment = {}
                    self._group_owned = False
                self._subscription = []
                self._cluster._leave_locked(self)

    def _partitions(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t, p in self._assignment]

    def _next_step_locked(self) -> Callable[[], None] | None:
        """What is due before fetching: a callback to run outside the lock, or None."""
        cluster = self._cluster
        if self._reports:
            error, partitions = self._reports.popleft()
            on_commit = self._on_commit
            return (lambda: on_commit(error, partitions)) if on_commit is not None else (lambda: None)
        if self._lost:
            return self._lose_locked()
        group = cluster._groups.get(self._group_id)
        if group is None or self not in group.members:
            return None
        if self._joined < group.generation:
            if _cooperative(group) and self._group_owned:
                return self._revoke_some_locked(group)
            if self._group_owned:
                return self._revoke_locked(group)
            self._joined = group.generation
        cluster._complete_locked(group)
        if group.assignment is not None and self._assigned < group.generation and self in group.assignment:
            return self._assign_locked(group)
        return None

    def _lose_locked(self) -> Callable[[], None]:
        held = self._partitions() if self._group_owned else None
        callback = self._on_lost or self._on_revoke
        self._lost = False
        self._assignment = {}
        self._group_owned = False

        def lose() -> None:
            try:
                if held is not None and callback is not None:
                    callback(self, held)
            finally:
                with self._cond:
                    if not self._closed and self._subscription:
                        self._cluster._join_locked(self)

        return lose

    def _revoke_locked(self, group: _Group) -> Callable[[], None]:
        held = self._partitions()
        callback = self._on_revoke

        def revoke() -> None:
            try:
                if callback is not None:
                    callback(self, held)
            finally:
                with self._cond:
                    self._assignment = {}
                    self._group_owned = False
                    self._joined = group.generation
                    self._cluster._complete_locked(group)

        return revoke

    def _revoke_some_locked(self, group: _Group) -> Callable[[], None] | None:
        """Cooperative: revoke only what this generation's plan gives to others."""
        keep = set(self._cluster._plan_locked(group).get(self, []))
        gone = [tp for tp in self._assignment if tp not in keep]
        if not gone:
            self._joined = group.generation
            return None
        callback = self._on_revoke

        def revoke() -> None:
            try:
                if callback is not None:
                    callback(self, [TopicPartition(t, p) for t, p in gone])
            finally:
                with self._cond:
                    for tp in gone:
                        self._assignment.pop(tp, None)
                    self._joined = group.generation
                    self._cluster._complete_locked(group)

        return revoke

    def _assign_locked(self, group: _Group) -> Callable[[], None]:
        assert group.assignment is not None
        share = group.assignment[self]
        self._assigned = group.generation
        if not (_cooperative(group) and self._group_owned):
            # Eager, or a first share: it holds nothing, everything it is given is new.
            self._group_owned = True
            self._fenced = False
            self._assignment = {}
        # Cooperative: what it keeps goes on fetching; on_assign names only what is new.
        added = [tp for tp in share if tp not in self._assignment]
        for tp in added:
            self._assignment[tp] = _Fetch(shown=OFFSET_STORED, next=self._cluster._start_locked(
                self._group_id, tp, OFFSET_INVALID, self._reset), paused=tp in self._paused)
        callback = self._on_assign
        given = [TopicPartition(t, p) for t, p in added]
        return (lambda: callback(self, given)) if callback is not None else (lambda: None)

    def _fetch_locked(self, limit: int) -> list[Message]:
        cluster = self._cluster
        ready = [tp for tp, f in self._assignment.items() if not f.paused and tp in cluster._low]
        if not ready:
            return []
        self._turn = (self._turn + 1) % len(ready)
        batch: list[Message] = []
        for tp in ready[self._turn:] + ready[:self._turn]:
            fetch = self._assignment[tp]
            low, high = cluster._low[tp], cluster._high_locked(tp)
            if fetch.next is None or not low <= fetch.next <= high:
                fetch.next = low if self._reset in _RESET_EARLIEST else high
            fetch.fetched = True
            log = cluster._logs[tp[0]][tp[1]]
            while fetch.next < high and len(batch) < limit:
                batch.append(_message(tp[0], tp[1], fetch.next, log[fetch.next]))
                fetch.next += 1
                fetch.app = fetch.next
        return batch

    def _wait_locked(self, deadline: float | None, now: float) -> float | None:
        """How long to sleep: until the deadline, or until a straggler of a pending
        rebalance runs out of ``max.poll.interval.ms`` (so it can be expelled)."""
        wait = None if deadline is None else deadline - now
        group = self._cluster._groups.get(self._group_id)
        if group is not None and group.assignment is None:
            for member in group.members:
                if member is not self and member._joined < group.generation and not member._calling:
                    until = member._last_call + member._max_poll - now + 0.001
                    wait = until if wait is None else min(wait, until)
        return None if wait is None else max(wait, 0.0)


class FakeProducer:
    """A drop-in for ``confluent_kafka.Producer`` on a :class:`FakeCluster`.

    Honours ``message.max.bytes``, ``queue.buffering.max.messages`` and ``on_delivery``
    from ``config``. A message is written when ``produce()`` returns; its delivery report
    waits for ``poll()`` or ``flush()``, whose thread runs the callback.
    """

    def __init__(self, cluster: FakeCluster, config: dict[str, Any] | None = None) -> None:
        """Like ``Producer(config)``."""
        config = config or {}
        self._cluster = cluster
        self._cond = cluster._cond
        self._max_bytes = int(config.get("message.max.bytes", 1000000))
        self._max_queue = int(config.get("queue.buffering.max.messages", 100000))
        self._on_delivery: Callable[[KafkaError | None, Message], None] | None = config.get("on_delivery")
        self._reports: deque[tuple[Callable[[KafkaError | None, Message], None] | None,
                                   KafkaError | None, Message]] = deque()

    def produce(self, topic: str, value: bytes | str | None = None, key: bytes | str | None = None,
                partition: int = -1, on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
                timestamp: int = 0, headers: HeadersArg = None,
                callback: Callable[[KafkaError | None, Message], None] | None = None) -> None:
        """Write one message (keyed: crc32 of the key; else round-robin; or ``partition``)."""
        record = _Record(_to_bytes(key), _to_bytes(value), _headers(headers),
                         timestamp if timestamp else int(time.time() * 1000))
        size = len(record.value or b"") + len(record.key or b"") + sum(
            len(name) + len(v or b"") for name, v in record.headers or [])
        report = on_delivery or callback or self._on_delivery
        cluster = self._cluster
        with self._cond:
            if self._produce_buffer_error_locked():
                raise BufferError("Local: Queue full")
            if len(self._reports) >= self._max_queue:
                raise BufferError("Local: Queue full")
            if size > self._max_bytes:
                raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE,
                                                "Unable to produce message: Broker: Message size too large"))
            if topic not in cluster._logs and cluster.auto_create_topics:
                cluster._create_locked(topic, cluster.default_partitions)
            error: KafkaError | None = None
            offset = OFFSET_INVALID
            if topic not in cluster._logs:
                error = KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)
            else:
                count = len(cluster._logs[topic])
                if partition is None or partition < 0:
                    if record.key is not None:
                        partition = (zlib.crc32(record.key) & 0xFFFFFFFF) % count
                    else:
                        partition = next(cluster._round_robin[topic]) % count
                elif partition >= count:
                    raise KafkaException(KafkaError(KafkaError._UNKNOWN_PARTITION,
                                                    "Unable to produce message: Local: Unknown partition"))
                if cluster._produce_failures:
                    error = cluster._produce_failures.popleft().error
                elif size + _RECORD_OVERHEAD > cluster.max_message_bytes:
                    error = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Broker: Message size too large")
                else:
                    offset = cluster._append_locked(topic, partition, record)
            # As with librdkafka, the report's message carries no headers.
            self._reports.append((report, error, _message(topic, -1 if partition is None else partition,
                                                          offset, record, headers=False)))
            self._cond.notify_all()

    def poll(self, timeout: float | None = None) -> int:
        """Serve the delivery reports due (waiting up to ``timeout`` for one); how many."""
        deadline = _deadline(timeout)
        with self._cond:
            while not self._reports:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return 0
                self._cond.wait(None if deadline is None else deadline - now)
            reports = list(self._reports)
            self._reports.clear()
            self._cond.notify_all()
        for report, error, message in reports:
            if report is not None:
                report(error, message)
        return len(reports)

    def flush(self, timeout: float | None = None) -> int:
        """Serve every delivery report; how many messages are still waiting (always 0)."""
        self.poll(0)
        return len(self)

    def __len__(self) -> int:
        """Messages whose delivery report has not been served yet."""
        with self._cond:
            return len(self._reports)

    def _produce_buffer_error_locked(self) -> bool:
        failures = self._cluster._produce_failures
        if failures and failures[0].error is None:
            failures.popleft()
            return True
        return False
