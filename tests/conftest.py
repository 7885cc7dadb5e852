"""Session-wide real infrastructure: one Kafka broker and one redis-server for the whole run."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.infra.kafka import KafkaBroker, KafkaCluster
from tests.infra.redis import RedisServer
from tests.infra.service import ServiceProcess
from tests.infra.sink import Sink

_topics = itertools.count()


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A real Apache Kafka broker on a free loopback port."""
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, which the test stops and starts."""
    server = RedisServer(tmp_path / "own-redis", persist=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_db(redis_server: RedisServer) -> RedisServer:
    """The session's Redis, emptied for this test."""
    redis_server.client().flushall()
    return redis_server


@pytest.fixture
def topic(kafka: KafkaBroker, request: pytest.FixtureRequest) -> Callable[..., str]:
    """Make a fresh topic: ``topic(partitions=1)`` returns its name."""

    def make(partitions: int = 1) -> str:
        name = f"t{next(_topics)}.{request.node.name[:60].replace('[', '.').replace(']', '')}"
        name = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
        kafka.create_topic(name, partitions)
        return name

    return make


@pytest.fixture
def services(tmp_path: Path, kafka: KafkaBroker,
             redis_db: RedisServer) -> Iterator[Callable[..., ServiceProcess]]:
    """Start restconsumer processes on the real Kafka and Redis; all are stopped after the test."""
    started: list[ServiceProcess] = []

    def start(*args: str, wait: bool = True, env: dict[str, str] | None = None,
              token: str | None = "default", redis: str | None = None,
              kafka_bootstrap: str | None = None) -> ServiceProcess:
        kwargs = {} if token == "default" else {"token": token}
        service = ServiceProcess(tmp_path / "service", kafka=kafka_bootstrap or kafka.bootstrap,
                                 redis=redis or redis_db.url, args=list(args), env=env, **kwargs)
        started.append(service)
        return service.start(wait=wait)

    yield start
    for service in started:
        if service.process is not None:
            service.stop()


@pytest.fixture
def sink() -> Iterator[Sink]:
    """A loopback HTTP endpoint answering 200."""
    server = Sink().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    """Three Kafka nodes (broker and controller each; replication 3, min.insync.replicas 2),
    started only for the tests that ask for it, once for all of them. A test that kills a
    node starts it again and waits until its replicas are back in sync."""
    cluster = KafkaCluster(tmp_path_factory.mktemp("kafka-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
