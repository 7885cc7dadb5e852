"""In-process tests of a job's Kafka loop (restconsumer.kafka.consumer) and of whole jobs over it.

The loop runs its real thread against the in-memory Kafka of ``restconsumer.kafka.fake`` (the
fake that ``tests/test_fake_kafka_contract.py`` checks against a real broker); whole jobs
send through the in-memory agent of ``tests/test_runner.py``. No broker, no socket, no sleep
on the reactor: each test lets the reactor run until what it expects has happened, with a
short deadline.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_twisted
from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException, Message, TopicPartition
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater

from restconsumer.base.types import TP
from restconsumer.delivery.budget import ByteBudget
from restconsumer.delivery.runner import JobRunner, Shared
from restconsumer.delivery.sender import HTTPSender
from restconsumer.kafka.consumer import KafkaLoop, consumer_config
from restconsumer.kafka.fake import FakeCluster, FakeConsumer
from tests.test_runner import FakeAgent, FakeDeadLetters, FakeResponse, empty_avro, make_job

#: Poll timings that keep these tests quick (the defaults are 1 s idle, 20 ms busy).
FAST = {"idle_poll": 0.05, "busy_poll": 0.01}
#: The topic of make_job(); its consumer group is restconsumer.j.
T = "people"
JOB_GROUP = "restconsumer.j"

Stops = Callable[[Callable[[], Deferred[Any]]], None]


# --- waiting on the reactor -----------------------------------------------------------


async def until(check: Callable[[], Any], what: str, timeout: float = 5.0) -> None:
    """Let the reactor run until ``check()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


async def let_run(seconds: float) -> None:
    """Let the reactor (and the loop's thread) run for ``seconds``."""
    await deferLater(reactor, seconds, lambda: None)


@pytest_twisted.async_yield_fixture
async def stops() -> AsyncIterator[Stops]:
    """Register ``stop`` callables (a loop's or a runner's); all are awaited after the test,
    so that a failing test leaves no thread polling."""
    registered: list[Callable[[], Deferred[Any]]] = []
    yield registered.append
    for stop in reversed(registered):
        await stop()


# --- the Kafka loop alone -------------------------------------------------------------


class Recorder:
    """A LoopHandler that records what the loop tells it, and whether it came on the right thread.

    ``prepare`` returns the message itself; ``revoked`` answers ``answer`` (the offsets of
    the revoked partitions in it) at once, or, with ``hold``, a Deferred the test fires.
    """

    def __init__(self) -> None:
        self.reactor_thread = threading.get_ident()
        self.events: list[tuple[Any, ...]] = []
        self.batches: list[list[Message]] = []
        self.answer: dict[TP, int] = {}
        self.hold = False
        self.held: list[Deferred[dict[TP, int]]] = []
        self.wrong_thread: list[str] = []

    def _on_reactor(self, what: str) -> None:
        if threading.get_ident() != self.reactor_thread:
            self.wrong_thread.append(f"{what} on {threading.current_thread().name}")

    def prepare(self, message: Message) -> Message:
        """On the loop's thread: the message as it is."""
        name = threading.current_thread().name
        if threading.get_ident() == self.reactor_thread or "kafka-" not in name:
            self.wrong_thread.append(f"prepare on {name}")
        return message

    def assigned(self, partitions: list[TP]) -> None:
        """Recorded."""
        self._on_reactor("assigned")
        self.events.append(("assigned", sorted(partitions)))

    def revoked(self, partitions: list[TP], lost: bool) -> Deferred[dict[TP, int]]:
        """Recorded; answered with ``answer`` now, or later by the test with ``hold``."""
        self._on_reactor("revoked")
        self.events.append(("revoked", sorted(partitions), lost))
        if self.hold:
            d: Deferred[dict[TP, int]] = Deferred()
            self.held.append(d)
            return d
        return succeed({tp: o for tp, o in self.answer.items() if tp in partitions})

    def arrived(self, batch: list[Message]) -> None:
        """Recorded."""
        self._on_reactor("arrived")
        self.batches.append(batch)

    def cannot_start(self, reason: str) -> None:
        """Recorded."""
        self._on_reactor("cannot_start")
        self.events.append(("cannot_start", reason))

    def assignments(self) -> list[list[TP]]:
        """Every assignment so far, oldest first."""
        return [e[1] for e in self.events if e[0] == "assigned"]

    def revocations(self) -> list[tuple[list[TP], bool]]:
        """Every revocation so far as (partitions, lost), oldest first."""
        return [(e[1], e[2]) for e in self.events if e[0] == "revoked"]

    def offsets(self, topic: str, partition: int) -> list[int]:
        """The offsets of ``topic[partition]`` that arrived, in arrival order."""
        return [m.offset() for batch in self.batches for m in batch
                if m.topic() == topic and m.partition() == partition]


def make_loop(cluster: FakeCluster, name: str, topics: list[str], handler: Recorder, *,
              factory: Callable[[dict[str, Any]], Any] | None = None, **options: Any) -> KafkaLoop:
    """A KafkaLoop of group ``restconsumer.{name}`` on ``cluster``, with quick timings."""
    return KafkaLoop(reactor, name, consumer_config({}, name), topics, handler,
                     consumer_factory=factory or cluster.consumer,
                     **{**FAST, "answer_timeout": 5.0, "close_timeout": 5.0, **options})


def keeping(cluster: FakeCluster, made: list[FakeConsumer]) -> Callable[[dict[str, Any]], FakeConsumer]:
    """A consumer factory on ``cluster`` that keeps every consumer it makes in ``made``."""

    def factory(config: dict[str, Any]) -> FakeConsumer:
        consumer = cluster.consumer(config)
        made.append(consumer)
        return consumer

    return factory


def loop_threads(name: str) -> list[str]:
    """Threads of the loop named ``name`` still alive."""
    return [t.name for t in threading.enumerate() if f"kafka-{name}-" in t.name]


async def turned(cluster: FakeCluster, handler: Recorder, topic: str = "marks") -> None:
    """Wait until the loop has read its mailbox since now: a mark produced after a turn that
    may have begun before the call, then a second one, have both arrived."""
    for _ in range(2):
        offset = cluster.produce(topic, b"mark", partition=0)
        await until(lambda o=offset: o in handler.offsets(topic, 0), "a mark to arrive")


@pytest_twisted.ensureDeferred
async def test_assigned_on_the_reactor_and_batches_arrive_in_offset_order(stops: Stops) -> None:
    """Subscribe → assigned on the reactor; messages arrive in batches, in offset order, each once."""
    cluster = FakeCluster()
    cluster.create_topic("events", 2)
    for i in range(20):
        cluster.produce("events", f"a{i}", partition=0)
    for i in range(7):
        cluster.produce("events", f"b{i}", partition=1)
    h = Recorder()
    loop = make_loop(cluster, "order", ["events"], h, batch=8)
    stops(loop.stop)
    loop.start()
    await until(h.assignments, "an assignment")
    assert h.assignments() == [[("events", 0), ("events", 1)]]
    await until(lambda: len(h.offsets("events", 0)) >= 20 and len(h.offsets("events", 1)) >= 7,
                "every message to arrive")
    await let_run(0.1)
    assert h.offsets("events", 0) == list(range(20))
    assert h.offsets("events", 1) == list(range(7))
    values = [m.value() for batch in h.batches for m in batch if m.partition() == 0]
    assert values == [f"a{i}".encode() for i in range(20)]
    assert max(len(b) for b in h.batches) <= 8
    assert any(len(b) > 1 for b in h.batches), "one hop per message, not per batch"
    assert loop.assignment == [("events", 0), ("events", 1)]
    # Later messages come too.
    cluster.produce("events", "a20", partition=0)
    await until(lambda: h.offsets("events", 0) == list(range(21)), "a later message")
    assert h.wrong_thread == []


@pytest_twisted.ensureDeferred
async def test_commits_reach_the_cluster_and_a_failed_commit_is_made_again(stops: Stops) -> None:
    """commit({tp: n}) is committed for the group; a refused commit is made again; partitions not
    assigned are not committed."""
    cluster = FakeCluster()
    cluster.create_topic("events", 1)
    for i in range(5):
        cluster.produce("events", f"m{i}")
    h = Recorder()
    loop = make_loop(cluster, "commits", ["events"], h)
    stops(loop.stop)
    loop.start()
    await until(lambda: len(h.offsets("events", 0)) == 5, "the messages")
    group = "restconsumer.commits"
    loop.commit({("events", 0): 3, ("other", 0): 9})
    await until(lambda: cluster.committed(group, "events", 0) == 3, "the commit of offset 3")
    cluster.fail_next_commit()
    loop.commit({("events", 0): 5})
    await until(lambda: cluster.committed(group, "events", 0) == 5, "the commit of offset 5")
    await let_run(0.1)
    assert [(c.topic, c.offset, c.error is None) for c in cluster.commits(group)] == [
        ("events", 3, True), ("events", 5, False), ("events", 5, True)]
    assert h.wrong_thread == []


@pytest_twisted.ensureDeferred
async def test_pause_stops_a_partition_and_resume_continues_with_nothing_lost_or_repeated(
        stops: Stops) -> None:
    """A paused partition sends nothing while the others go on; resumed, it goes on where it was."""
    cluster = FakeCluster()
    cluster.create_topic("events", 2)
    cluster.create_topic("marks", 1)
    for i in range(3):
        cluster.produce("events", f"a{i}", partition=0)
    h = Recorder()
    loop = make_loop(cluster, "pausing", ["events", "marks"], h)
    stops(loop.stop)
    loop.start()
    await until(lambda: len(h.offsets("events", 0)) == 3, "the first messages")
    loop.pause(("events", 0))
    await turned(cluster, h)
    for i in range(3, 6):
        cluster.produce("events", f"a{i}", partition=0)
    for i in range(2):
        cluster.produce("events", f"b{i}", partition=1)
    await until(lambda: h.offsets("events", 1) == [0, 1], "the partition not paused")
    await let_run(0.3)  # many polls
    assert h.offsets("events", 0) == [0, 1, 2], "a paused partition was fetched"
    loop.resume(("events", 0))
    await until(lambda: len(h.offsets("events", 0)) >= 6, "the resumed partition")
    await let_run(0.1)
    assert h.offsets("events", 0) == list(range(6))
    assert h.offsets("events", 1) == [0, 1]
    assert h.wrong_thread == []


@pytest_twisted.ensureDeferred
async def test_a_member_joining_revokes_on_the_reactor_and_the_answer_is_committed_before_handing_over(
        stops: Stops) -> None:
    """A second consumer of the group joins: the job is asked on the reactor to let go of the
    one partition that moves (cooperative-sticky: the other is never revoked and goes on);
    until it answers nothing is committed nor handed over; the offset is committed before the
    partition goes, so that its new owner starts exactly there."""
    cluster = FakeCluster()
    cluster.create_topic("events", 2)
    for i in range(6):
        cluster.produce("events", f"a{i}", partition=0)
    for i in range(4):
        cluster.produce("events", f"b{i}", partition=1)
    made: list[FakeConsumer] = []
    h = Recorder()
    loop = make_loop(cluster, "joining", ["events"], h, factory=keeping(cluster, made))
    stops(loop.stop)
    loop.start()
    await until(lambda: len(h.offsets("events", 0)) == 6 and len(h.offsets("events", 1)) == 4,
                "the messages")
    group = "restconsumer.joining"
    h.hold = True
    second = cluster.consumer(consumer_config({}, "joining"))
    try:
        second.subscribe(["events"])
        await until(lambda: h.held, "the job to be asked to let go")
        # Cooperative: only the partition that moves is revoked; the other stays the loop's.
        [(moving, lost)] = h.revocations()
        assert len(moving) == 1 and not lost
        [kept] = [tp for tp in (("events", 0), ("events", 1)) if tp not in moving]
        await let_run(0.2)
        assert second.consume(10, timeout=0) == []
        assert second.assignment() == [], "handed over before the job let go"
        assert cluster.commits(group) == []
        answered = {("events", 0): 4, ("events", 1): 1}
        h.held[0].callback({moving[0]: answered[moving[0]], kept: answered[kept]})
        h.hold = False
        got: list[Message] = []
        deadline = time.monotonic() + 5
        while not got:
            assert time.monotonic() < deadline, "the second consumer got nothing"
            got.extend(second.consume(10, timeout=0))
            await let_run(0.01)
        # The new owner starts where the job said: the commit came before the hand-over.
        [theirs] = [(tp.topic, tp.partition) for tp in second.assignment()]
        assert theirs == moving[0]
        assert got[0].partition() == theirs[1] and got[0].offset() == answered[theirs]
        # The kept partition was never revoked nor assigned again: it goes on where it was.
        before = len(h.offsets(*kept))
        cluster.produce("events", "more", partition=kept[1])
        await until(lambda: len(h.offsets(*kept)) == before + 1, "the kept partition to go on")
        assert [tp for tps in h.assignments()[1:] for tp in tps] == []
        member = made[0].memberid()
        # Only the revoked partition's offset is committed at the revocation.
        assert [(c.member, c.partition, c.offset, c.error) for c in cluster.commits(group)
                if c.partition == theirs[1]][:1] == [(member, theirs[1], answered[theirs], None)]
        assert loop.assignment == [kept]
        assert h.wrong_thread == []
    finally:
        await loop.stop()
        second.close()


@pytest_twisted.ensureDeferred
async def test_a_lost_assignment_commits_nothing(stops: Stops) -> None:
    """A session that expired: on_lost → revoked(..., lost=True) on the reactor, and nothing is
    committed even if the job answers offsets; the partitions come back and are read again."""
    cluster = FakeCluster()
    cluster.create_topic("events", 1)
    for i in range(3):
        cluster.produce("events", f"m{i}")
    made: list[FakeConsumer] = []
    h = Recorder()
    loop = make_loop(cluster, "lost", ["events"], h, factory=keeping(cluster, made))
    stops(loop.stop)
    loop.start()
    await until(lambda: len(h.offsets("events", 0)) == 3, "the messages")
    group = "restconsumer.lost"
    h.answer = {("events", 0): 3}  # a job that would commit: for a lost assignment, nothing may be
    cluster.expire(made[0])
    await until(lambda: len(h.assignments()) == 2, "the consumer back in the group")
    assert h.revocations() == [([("events", 0)], True)]
    await until(lambda: len(h.offsets("events", 0)) == 6, "the messages read again")
    assert h.offsets("events", 0) == [0, 1, 2, 0, 1, 2]
    assert cluster.commits(group) == []
    assert cluster.committed(group, "events", 0) == OFFSET_INVALID
    # The new assignment commits as it should.
    loop.commit({("events", 0): 3})
    await until(lambda: cluster.committed(group, "events", 0) == 3, "a commit after coming back")
    assert [c.error for c in cluster.commits(group)] == [None]
    assert h.wrong_thread == []


@pytest_twisted.ensureDeferred
async def test_stop_closes_the_consumer_whose_revocation_commits(stops: Stops) -> None:
    """stop(): the consumer's revocation asks the job and commits its answer, the consumer is
    closed, its thread ends, and the Deferred fires."""
    cluster = FakeCluster()
    cluster.create_topic("events", 1)
    for i in range(4):
        cluster.produce("events", f"m{i}")
    made: list[FakeConsumer] = []
    h = Recorder()
    loop = make_loop(cluster, "stopping", ["events"], h, factory=keeping(cluster, made))
    stops(loop.stop)
    loop.start()
    await until(lambda: len(h.offsets("events", 0)) == 4, "the messages")
    h.answer = {("events", 0): 4}
    started = time.monotonic()
    await loop.stop()
    took = time.monotonic() - started
    assert took < 2.0, f"stop took {took:.2f} s"
    assert h.revocations() == [([("events", 0)], False)]
    assert cluster.committed("restconsumer.stopping", "events", 0) == 4
    assert cluster.assignments("restconsumer.stopping") == {}
    with pytest.raises(RuntimeError, match="closed"):
        made[0].assignment()
    assert loop_threads("stopping") == []
    assert h.wrong_thread == []


@pytest_twisted.ensureDeferred
async def test_a_consumer_that_cannot_be_made_or_subscribed_is_tried_again(stops: Stops) -> None:
    """The factory raises, then subscribe() raises (that consumer is closed), then all works:
    the loop subscribes and delivers; stop ends it."""
    cluster = FakeCluster()
    cluster.create_topic("events", 1)
    cluster.produce("events", "m0")

    class Refusing(FakeConsumer):
        def subscribe(self, *args: Any, **kwargs: Any) -> None:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "subscribe refused"))

    made: list[FakeConsumer] = []
    tried: list[float] = []

    def factory(config: dict[str, Any]) -> FakeConsumer:
        tried.append(time.monotonic())
        if len(tried) == 1:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "no broker"))
        consumer = Refusing(cluster, config) if len(tried) == 2 else cluster.consumer(config)
        made.append(consumer)
        return consumer

    h = Recorder()
    loop = make_loop(cluster, "retrying", ["events"], h, factory=factory)
    stops(loop.stop)
    loop.start()
    await until(h.assignments, "an assignment", timeout=8)
    assert len(tried) == 3
    assert h.assignments() == [[("events", 0)]]
    with pytest.raises(RuntimeError, match="closed"):
        made[0].assignment()
    await until(lambda: h.offsets("events", 0) == [0], "the message")
    await loop.stop()
    assert loop_threads("retrying") == []


@pytest_twisted.ensureDeferred
async def test_stop_ends_a_loop_whose_consumer_never_works(stops: Stops) -> None:
    """A factory that always raises: stop() still ends the loop at once."""
    cluster = FakeCluster()
    tried: list[float] = []

    def factory(config: dict[str, Any]) -> FakeConsumer:
        tried.append(time.monotonic())
        raise KafkaException(KafkaError(KafkaError._TRANSPORT, "no broker"))

    h = Recorder()
    loop = make_loop(cluster, "never", ["events"], h, factory=factory)
    stops(loop.stop)
    loop.start()
    await until(lambda: tried, "a first try")
    started = time.monotonic()
    await loop.stop()
    assert time.monotonic() - started < 1.0
    assert loop_threads("never") == []
    assert h.events == []


# --- whole jobs over the loop ---------------------------------------------------------


class Witness:
    """What every instance's agent and consumer did, across threads: requests under way per
    partition, sends that overlapped another of the same partition, deliveries, and commits
    that passed a message not delivered."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.under_way: dict[int, list[str]] = defaultdict(list)
        self.overlaps: list[str] = []
        self.delivered: set[tuple[int, int]] = set()
        self.sent: list[tuple[str, int, int]] = []
        self.commits: list[tuple[str, int, int, bool]] = []
        self.passed: list[str] = []

    def sending(self, who: str, partition: int, offset: int) -> None:
        """``who`` sends the request of ``partition``@``offset``."""
        with self.lock:
            if self.under_way[partition]:
                self.overlaps.append(f"{who} sent {partition}@{offset} while "
                                     f"{self.under_way[partition]} was under way")
            self.under_way[partition].append(f"{who}:{offset}")
            self.sent.append((who, partition, offset))

    def ended(self, who: str, partition: int, offset: int, delivered: bool) -> None:
        """That request was answered (``delivered``: 2xx) or failed or was cancelled."""
        with self.lock:
            self.under_way[partition].remove(f"{who}:{offset}")
            if delivered:
                self.delivered.add((partition, offset))

    def committing(self, who: str, partition: int, offset: int, synchronous: bool) -> None:
        """On a Kafka thread: ``who`` commits ``offset``; every message before it must be delivered."""
        with self.lock:
            self.commits.append((who, partition, offset, synchronous))
            missing = [o for o in range(offset) if (partition, o) not in self.delivered]
            if missing:
                self.passed.append(f"{who} committed {partition}@{offset} before {missing} were delivered")


class WitnessAgent(FakeAgent):
    """The FakeAgent of tests/test_runner.py, telling a Witness of each request of
    ``http://sink.test/p/{partition}-{offset}``."""

    def __init__(self, who: str, witness: Witness, auto: int | None = None) -> None:
        super().__init__(auto)
        self.who = who
        self.witness = witness

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Any:  # noqa: N803
        partition, offset = (int(n) for n in uri.decode().rsplit("/", 1)[1].split("-"))
        self.witness.sending(self.who, partition, offset)
        d = super().request(method, uri, headers, bodyProducer)

        def ended(result: Any) -> Any:
            ok = isinstance(result, FakeResponse) and 200 <= result.code < 300
            self.witness.ended(self.who, partition, offset, ok)
            return result

        return d.addBoth(ended)


class CheckedConsumer(FakeConsumer):
    """A FakeConsumer telling a Witness of each commit before making it."""

    def __init__(self, cluster: FakeCluster, config: dict[str, Any], who: str, witness: Witness) -> None:
        super().__init__(cluster, config)
        self.who = who
        self.witness = witness

    def commit(self, message: Message | None = None, offsets: list[TopicPartition] | None = None,
               asynchronous: bool = True) -> list[TopicPartition] | None:
        for tp in offsets or []:
            self.witness.committing(self.who, tp.partition, tp.offset, not asynchronous)
        return super().commit(message=message, offsets=offsets, asynchronous=asynchronous)


def job_runner(cluster: FakeCluster, agent: FakeAgent, *, grace: float = 0.2,
               factory: Callable[[dict[str, Any]], Any] | None = None) -> JobRunner:
    """A JobRunner of make_job() (topic ``people``) on ``cluster`` with the real KafkaLoop,
    sending through ``agent``: one instance of the service."""
    shared = Shared(reactor, {}, HTTPSender(reactor, agent=agent), FakeDeadLetters(),  # type: ignore[arg-type]
                    ByteBudget(64 * 1024 * 1024), revoke_grace=grace,
                    consumer_factory=factory or cluster.consumer, loop_options=dict(FAST))
    return JobRunner(make_job(), shared)


def produce_ids(cluster: FakeCluster, partition: int, count: int) -> list[str]:
    """``count`` JSON messages to ``people[partition]``, each with the id ``{partition}-{offset}``."""
    ids = []
    for _ in range(count):
        offset = cluster.watermarks(T, partition)[1]
        ids.append(f"{partition}-{offset}")
        cluster.produce(T, json.dumps({"id": ids[-1]}), partition=partition)
    return ids


def committed_all(cluster: FakeCluster, ends: dict[int, int]) -> bool:
    """Whether the job's group has committed each partition up to its end."""
    return all(cluster.committed(JOB_GROUP, T, p) == end for p, end in ends.items())


@pytest_twisted.ensureDeferred
async def test_a_job_delivers_each_partition_in_order_and_commits_to_the_end(stops: Stops) -> None:
    """JobRunner + KafkaLoop + FakeCluster + FakeAgent: every message sent once, in offset
    order per partition, and the group's committed offset reaches the end."""
    cluster = FakeCluster()
    cluster.create_topic(T, 3)
    ids = {p: produce_ids(cluster, p, 20) for p in range(3)}
    agent = FakeAgent(auto=200)
    runner = job_runner(cluster, agent)
    stops(runner.stop)
    runner.start()
    await until(lambda: committed_all(cluster, {p: 20 for p in range(3)}), "every partition committed")
    for p in range(3):
        sent = [path.removeprefix("p/") for path in agent.paths() if path.startswith(f"p/{p}-")]
        assert sent == ids[p]
    assert len(agent.requests) == 60
    assert runner.stats.delivered == 60
    # More messages later go the same way.
    ids[1] += produce_ids(cluster, 1, 3)
    await until(lambda: committed_all(cluster, {0: 20, 1: 23, 2: 20}), "the later messages committed")
    assert [p.removeprefix("p/") for p in agent.paths() if p.startswith("p/1-")] == ids[1]
    await runner.stop()
    assert cluster.assignments(JOB_GROUP) == {}


@pytest_twisted.ensureDeferred
async def test_an_empty_avro_container_does_not_stall_its_partition(stops: Stops) -> None:
    """Issue 8 fault 1 through the real loop: zero-record Avro containers before, between and
    after JSON messages on one partition: all delivered in order, committed to the end."""
    cluster = FakeCluster()
    cluster.create_topic(T, 1)
    empty = empty_avro()
    cluster.produce(T, empty, partition=0)
    for i in range(3):
        cluster.produce(T, json.dumps({"id": f"m{i}"}), partition=0)
    cluster.produce(T, empty, partition=0)
    for i in range(3, 5):
        cluster.produce(T, json.dumps({"id": f"m{i}"}), partition=0)
    agent = FakeAgent(auto=200)
    runner = job_runner(cluster, agent)
    stops(runner.stop)
    runner.start()
    await until(lambda: len(agent.requests) >= 5, "the JSON messages to be sent")
    assert agent.paths() == [f"p/m{i}" for i in range(5)]
    await until(lambda: committed_all(cluster, {0: 7}), "the partition committed to its end")
    cluster.produce(T, empty, partition=0)
    cluster.produce(T, json.dumps({"id": "m5"}), partition=0)
    await until(lambda: committed_all(cluster, {0: 9}), "a container last, then one more message")
    assert agent.paths() == [f"p/m{i}" for i in range(6)]
    assert runner.stats.delivered == 6
    assert runner.stats.failed == 0


@pytest_twisted.ensureDeferred
async def test_stopping_a_job_commits_what_is_finished_and_cancels_what_is_under_way(stops: Stops) -> None:
    """stop(): the request under way is cancelled after the grace, the offset committed stops
    before it (it is sent again by whoever reads the partition next)."""
    cluster = FakeCluster()
    cluster.create_topic(T, 1)
    produce_ids(cluster, 0, 3)
    agent = FakeAgent()
    runner = job_runner(cluster, agent)
    stops(runner.stop)
    runner.start()
    await until(lambda: len(agent.open()) == 1, "the first request")
    agent.open()[0].answer(200)
    await until(lambda: len(agent.open()) == 1 and len(agent.requests) == 2, "the second request")
    started = time.monotonic()
    await runner.stop()
    assert time.monotonic() - started < 2.0
    assert agent.requests[1].cancelled
    assert cluster.committed(JOB_GROUP, T, 0) == 1


@pytest_twisted.ensureDeferred
async def test_a_partition_moves_to_a_new_instance_only_after_its_request_under_way_ended(
        stops: Stops) -> None:
    """Two instances of one job: A holds a request of each partition when B joins. A's
    revocation answers one request at once and cancels the other after the grace (0.2 s);
    no request of a partition is ever sent while another of it is under way (on either
    instance), no commit passes a message not delivered, and in the end every message was
    delivered at least once and the group committed everything."""
    cluster = FakeCluster()
    cluster.create_topic(T, 2)
    ids = {p: produce_ids(cluster, p, 5) for p in range(2)}
    witness = Witness()

    def checked(who: str) -> Callable[[dict[str, Any]], FakeConsumer]:
        # Eager on purpose: both partitions are revoked at once, one request ending within the
        # grace and one outliving it (the cooperative way is tested above).
        return lambda config: CheckedConsumer(
            cluster, {**config, "partition.assignment.strategy": "roundrobin"}, who, witness)

    agent_a = WitnessAgent("A", witness)
    a = job_runner(cluster, agent_a, grace=0.2, factory=checked("A"))
    stops(a.stop)
    a.start()
    await until(lambda: len(agent_a.open()) == 2, "A's first request of each partition under way")
    held = {int(r.path.removeprefix("p/").split("-")[0]): r for r in agent_a.open()}
    assert sorted(r.path for r in held.values()) == ["p/0-0", "p/1-0"]
    agent_a.auto = 200  # from now on A's agent answers; the two held requests stay held

    asked: list[tuple[list[TP], bool, float]] = []
    revoked = a.revoked

    def revoking(partitions: list[TP], lost: bool) -> Deferred[dict[TP, int]]:
        # The request of partition 0 ends within the grace; that of partition 1 outlives it.
        asked.append((sorted(partitions), lost, time.monotonic()))
        d = revoked(partitions, lost)
        if not held[0].d.called:
            held[0].answer(200)
        return d

    a.revoked = revoking  # type: ignore[method-assign]
    agent_b = WitnessAgent("B", witness, auto=200)
    b = job_runner(cluster, agent_b, grace=0.2, factory=checked("B"))
    stops(b.stop)
    b.start()
    await until(lambda: committed_all(cluster, {0: 5, 1: 5}), "both partitions committed to the end")
    await let_run(0.1)

    assert asked and asked[0][:2] == ([(T, 0), (T, 1)], False)
    assert held[0].d.called and not held[0].cancelled
    assert held[1].cancelled, "the request that outlived the grace was not cancelled"
    assert witness.overlaps == [], "a partition was sent by two requests at once"
    assert witness.passed == [], "a commit passed a message not delivered"
    # A's revocation committed what was finished and stopped at the unfinished message.
    assert sorted((p, o) for who, p, o, sync in witness.commits if sync) == [(0, 1), (1, 0)]
    assert all(who == "A" for who, _, _, sync in witness.commits if sync)
    # B took one partition and began where A's commit said.
    theirs = {p for who, p, _ in witness.sent if who == "B"}
    assert len(theirs) == 1
    [p] = theirs
    first = next(o for who, q, o in witness.sent if who == "B" and q == p)
    assert first == {0: 1, 1: 0}[p]
    assert witness.delivered == {(q, int(i.split("-")[1])) for q, sent in ids.items() for i in sent}
    await b.stop()
    await a.stop()
    assert witness.passed == []
    assert cluster.committed(JOB_GROUP, T, 0) == 5
    assert cluster.committed(JOB_GROUP, T, 1) == 5


@pytest_twisted.ensureDeferred
async def test_a_long_quiet_loop_polls_less_often_and_wakes_at_once_for_a_message(stops: Stops) -> None:
    """After ``quiet_after`` seconds with nothing to do the loop polls with ``quiet_poll``;
    a message still arrives at once and brings the short timeouts back."""
    cluster = FakeCluster()
    cluster.create_topic("calm", 1)
    timeouts: list[float] = []

    class Counting(FakeConsumer):
        def consume(self, num_messages: int = 1, timeout: float | None = -1) -> list[Message]:
            if num_messages == 1:
                timeouts.append(float(timeout if timeout is not None else -1))
            return super().consume(num_messages, timeout)

    h = Recorder()
    loop = make_loop(cluster, "calm", ["calm"], h,
                     factory=lambda config: Counting(cluster, config),
                     quiet_after=0.3, quiet_poll=0.5)
    stops(loop.stop)
    loop.start()
    await until(h.assignments, "an assignment")
    await until(lambda: 0.5 in timeouts, "a quiet poll", timeout=5.0)
    assert timeouts[0] != 0.5, "the first polls are the idle ones"
    sent = time.monotonic()
    cluster.produce("calm", b"wake", partition=0)
    await until(lambda: h.offsets("calm", 0) == [0], "the message")
    assert time.monotonic() - sent < 0.4, "a quiet poll still returns as soon as a message is there"
    count = len(timeouts)
    await until(lambda: len(timeouts) > count + 2, "more polls")
    assert timeouts[count] != 0.5, "a message makes the loop short-polling again"


@pytest_twisted.ensureDeferred
async def test_a_consumer_librdkafka_refuses_to_create_ends_the_loop_saying_why(stops: Stops) -> None:
    """group.protocol=consumer with a classic setting (as librdkafka 2.x refuses it): the job is
    told once, on the reactor, with librdkafka's reason — no retrying for ever."""
    made: list[int] = []

    def refusing(config: dict[str, Any]) -> Any:
        made.append(1)
        return Consumer({**config, "bootstrap.servers": "127.0.0.1:1", "group.protocol": "consumer",
                         "session.timeout.ms": 10000})

    h = Recorder()
    loop = make_loop(FakeCluster(), "refused", ["events"], h, factory=refusing)
    stops(loop.stop)
    loop.start()
    await until(lambda: any(e[0] == "cannot_start" for e in h.events), "the job to be told")
    await let_run(0.3)
    [(_, reason)] = [e for e in h.events if e[0] == "cannot_start"]
    assert "session.timeout.ms" in reason and made == [1]
    assert h.wrong_thread == []



# --- commits while a group's coordinator moves (a replicated Kafka losing a broker) -----------


@pytest_twisted.ensureDeferred
async def test_commits_refused_while_the_coordinator_moves_are_made_again_never_skipped(
        stops: Stops) -> None:
    """NOT_COORDINATOR, COORDINATOR_LOAD_IN_PROGRESS, REQUEST_TIMED_OUT in a row (a broker lost,
    its __consumer_offsets partitions getting new leaders): the commit is made again each turn
    while the partition is assigned, with the latest offset, until it is accepted."""
    cluster = FakeCluster()
    cluster.create_topic("events", 1)
    for i in range(8):
        cluster.produce("events", f"m{i}")
    h = Recorder()
    loop = make_loop(cluster, "moving", ["events"], h)
    stops(loop.stop)
    loop.start()
    await until(lambda: len(h.offsets("events", 0)) == 8, "the messages")
    group = "restconsumer.moving"
    for code in (KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                 KafkaError.REQUEST_TIMED_OUT):
        cluster.fail_next_commit(f"coordinator moving ({code})", code=code)
    loop.commit({("events", 0): 5})
    await until(lambda: len(cluster.commits(group)) >= 2, "the commit to be made again")
    loop.commit({("events", 0): 8})  # the partition moved on meanwhile
    await until(lambda: cluster.committed(group, "events", 0) == 8, "the commit of offset 8")
    await let_run(0.1)
    commits = cluster.commits(group)
    assert [c.error.code() for c in commits if c.error is not None] == [
        KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.REQUEST_TIMED_OUT]
    assert commits[-1].offset == 8 and commits[-1].error is None
    # Made again, never skipped: each refused commit is followed by another one, none lower.
    offsets = [c.offset for c in commits]
    assert offsets == sorted(offsets) and offsets[0] == 5
    assert cluster.committed(group, "events", 0) == 8
    assert h.wrong_thread == []


@pytest_twisted.ensureDeferred
async def test_a_revoked_partitions_commit_refused_while_the_coordinator_moves_is_made_again(
        stops: Stops) -> None:
    """stop() while the coordinator moves: the revocation's commit, refused twice, is made again
    before the partition goes, and the group ends at the job's offset."""
    cluster = FakeCluster()
    cluster.create_topic("events", 1)
    for i in range(4):
        cluster.produce("events", f"m{i}")
    h = Recorder()
    loop = make_loop(cluster, "revoking", ["events"], h)
    stops(loop.stop)
    loop.start()
    await until(lambda: len(h.offsets("events", 0)) == 4, "the messages")
    h.answer = {("events", 0): 4}
    cluster.fail_next_commit("Broker: Not coordinator", code=KafkaError.NOT_COORDINATOR)
    cluster.fail_next_commit("Broker: Coordinator load in progress",
                             code=KafkaError.COORDINATOR_LOAD_IN_PROGRESS)
    await loop.stop()
    group = "restconsumer.revoking"
    assert [(c.offset, c.error.code() if c.error else None) for c in cluster.commits(group)] == [
        (4, KafkaError.NOT_COORDINATOR), (4, KafkaError.COORDINATOR_LOAD_IN_PROGRESS), (4, None)]
    assert cluster.committed(group, "events", 0) == 4


@pytest_twisted.ensureDeferred
async def test_a_revoked_partitions_commit_the_group_refuses_for_good_is_not_made_again(
        stops: Stops) -> None:
    """A revocation's commit refused with ILLEGAL_GENERATION (the group moved on: it cannot
    succeed) is tried once, and the partition goes at once."""
    cluster = FakeCluster()
    cluster.create_topic("events", 1)
    cluster.produce("events", "m0")
    h = Recorder()
    loop = make_loop(cluster, "refused", ["events"], h)
    stops(loop.stop)
    loop.start()
    await until(lambda: len(h.offsets("events", 0)) == 1, "the message")
    h.answer = {("events", 0): 1}
    cluster.fail_next_commit("Broker: Specified group generation id is not valid",
                             code=KafkaError.ILLEGAL_GENERATION)
    started = time.monotonic()
    await loop.stop()
    assert time.monotonic() - started < 1.0
    assert [c.error.code() if c.error else None for c in cluster.commits("restconsumer.refused")] == [
        KafkaError.ILLEGAL_GENERATION]
