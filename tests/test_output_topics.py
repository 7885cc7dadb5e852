"""What the service writes to Kafka, on a replicated cluster: the topics it writes to
(restconsumer.kafka.topics) are created before their first write with replication
min(3, brokers) and min.insync.replicas min(2, brokers), off the reactor; a dead letter Kafka
does not acknowledge is produced again and holds its offset.

A stand-in admin client answers as Kafka would; tests/test_replicated.py checks the same on a
real three-broker cluster.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import NewTopic
from twisted.internet import reactor
from twisted.internet.defer import gatherResults

from restconsumer.kafka.topics import OutputTopics, TopicNotReady, replication_for
from tests.test_runner import FakeDeadLetters, Harness, T


def test_replication_follows_the_number_of_brokers() -> None:
    """min(3, brokers) replicas, min(2, brokers) in sync: one broker lost loses nothing."""
    assert [replication_for(n) for n in (0, 1, 2, 3, 5)] == [(1, 1), (1, 1), (2, 2), (3, 2), (3, 2)]


class FakeAdmin:
    """Metadata of ``brokers`` brokers (a controller among them unless ``controller`` is False);
    create_topics answers each call with the next of ``answers`` (None: created)."""

    def __init__(self, brokers: int, *, topics: tuple[str, ...] = (), controller: bool = True,
                 answers: list[int | None] | None = None) -> None:
        self.brokers = {i: object() for i in range(1, brokers + 1)}
        self.topics = {name: SimpleNamespace(error=None) for name in topics}
        self.controller = 1 if controller else 0
        self.answers = list(answers or [])
        self.created: list[NewTopic] = []
        self.threads: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()

    def list_topics(self, timeout: float = -1) -> Any:
        self.threads.add(threading.current_thread().name)
        return SimpleNamespace(brokers=self.brokers, topics=dict(self.topics), controller_id=self.controller)

    def create_topics(self, topics: list[NewTopic], request_timeout: float = -1) -> dict[str, Future[None]]:
        self.gate.wait(5)
        [topic] = topics
        self.created.append(topic)
        future: Future[None] = Future()
        code = self.answers.pop(0) if self.answers else None
        if code is None:
            self.topics[topic.topic] = SimpleNamespace(error=None)
            future.set_result(None)
        else:
            future.set_exception(KafkaException(KafkaError(code, f"refused ({code})")))
        return {topic.topic: future}


@pytest_twisted.async_yield_fixture
async def made() -> AsyncIterator[list[OutputTopics]]:
    """OutputTopics services, stopped after the test."""
    services: list[OutputTopics] = []
    yield services
    for service in services:
        await service.stopService()


def start(admin: FakeAdmin, made: list[OutputTopics]) -> OutputTopics:
    """An OutputTopics service on ``admin``, started."""
    topics = OutputTopics(reactor, {}, admin_factory=lambda _config: admin)
    topics.startService()
    made.append(topics)
    return topics


@pytest.mark.parametrize(("brokers", "replication", "insync"), [(3, 3, 2), (1, 1, 1), (5, 3, 2)])
@pytest_twisted.ensureDeferred
async def test_a_missing_topic_is_created_once_with_replication_for_the_cluster(
        made: list[OutputTopics], brokers: int, replication: int, insync: int) -> None:
    """Created with the broker's number of partitions (-1), min(3, brokers) replicas and
    min.insync.replicas min(2, brokers), on a thread of its own; writes at once to it wait for
    the one creation, later ones create nothing."""
    admin = FakeAdmin(brokers)
    admin.gate.clear()
    topics = start(admin, made)
    waiting = [topics.ensure("restconsumer.deadletter.j") for _ in range(3)]
    assert not any(d.called for d in waiting)
    admin.gate.set()
    await gatherResults(waiting)
    await topics.ensure("restconsumer.deadletter.j")
    [created] = admin.created
    assert (created.topic, created.num_partitions, created.replication_factor) == (
        "restconsumer.deadletter.j", -1, replication)
    assert created.config == {"min.insync.replicas": str(insync)}
    assert admin.threads and all("output-topics" in name for name in admin.threads), admin.threads


@pytest_twisted.ensureDeferred
async def test_a_topic_already_there_is_left_as_it_is(made: list[OutputTopics]) -> None:
    """Listed in the metadata, or TOPIC_ALREADY_EXISTS (another instance was quicker): nothing
    changed, the write goes on."""
    admin = FakeAdmin(3, topics=("results.j",), answers=[KafkaError.TOPIC_ALREADY_EXISTS])
    topics = start(admin, made)
    await topics.ensure("results.j")
    assert admin.created == []
    await topics.ensure("restconsumer.deadletter.j")
    assert [t.topic for t in admin.created] == ["restconsumer.deadletter.j"]


@pytest_twisted.ensureDeferred
async def test_a_passing_failure_fails_the_write_and_the_next_one_creates(made: list[OutputTopics]) -> None:
    """A timeout or no controller yet: the write fails (its caller tries again, never drops
    it) and the next one asks Kafka again."""
    admin = FakeAdmin(3, answers=[KafkaError.REQUEST_TIMED_OUT, KafkaError.NOT_CONTROLLER])
    topics = start(admin, made)
    for _ in range(2):
        with pytest.raises(TopicNotReady, match="cannot create the topic"):
            await topics.ensure("restconsumer.deadletter.j")
    await topics.ensure("restconsumer.deadletter.j")
    assert len(admin.created) == 3


@pytest_twisted.ensureDeferred
async def test_a_creation_refused_for_good_lets_the_write_go_on(made: list[OutputTopics]) -> None:
    """No right to create topics, or a cluster without a controller to ask (librdkafka's mock
    cluster): said once, and the write goes to the topic as it is (or as auto-created)."""
    admin = FakeAdmin(3, answers=[KafkaError.TOPIC_AUTHORIZATION_FAILED])
    topics = start(admin, made)
    await topics.ensure("restconsumer.deadletter.j")
    await topics.ensure("restconsumer.deadletter.j")
    assert len(admin.created) == 1
    mock = FakeAdmin(1, controller=False)
    await start(mock, made).ensure("restconsumer.deadletter.j")
    assert mock.created == []


# -- a dead letter Kafka does not acknowledge (a leader change) -------------------------------


def test_a_dead_letter_kafka_refuses_is_produced_again_and_holds_its_offset_until_acknowledged() -> None:
    """The dead letter's produce fails (its partition's leader lost, a topic not made sure of
    yet): the offset stays where it is, the same letter goes again after a wait, never
    dropped, and the offset moves once Kafka has it."""
    h = Harness(dead_letters=FakeDeadLetters(auto=False))
    h.runner.assigned([(T, 0)])
    h.arrive(h.message({"id": "bad"}), h.message({"id": "good"}))
    h.agent.open()[0].answer(400, b"no")
    h.agent.open()[0].answer(200)
    for failure in (RuntimeError("Broker: Not leader for partition"),
                    TopicNotReady("cannot create the topic restconsumer.deadletter.j yet")):
        *_, (_, _, _, ack) = h.dead_letters.sent
        sent = len(h.dead_letters.sent)
        ack.errback(failure)
        assert h.loop.commits == {}, "the offset passed a dead letter Kafka does not have"
        h.clock.advance(60)
        assert len(h.dead_letters.sent) == sent + 1, "the dead letter was not produced again"
    letters = [(topic, value) for topic, value, _, _ in h.dead_letters.sent]
    assert set(letters) == {("restconsumer.deadletter.j", b'{"id": "bad"}')} and len(letters) == 3
    h.dead_letters.sent[-1][3].callback(None)
    assert h.loop.commits == {(T, 0): 2}
    assert h.runner.stats.dead_lettered == 1
