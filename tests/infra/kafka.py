"""Real Apache Kafka (KRaft), resolved from Maven Central with mvn: a single-node broker, and a
three-node cluster (each node broker and controller) for the tests of a replicated Kafka."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from tests.infra.ports import ended, free_port, wait_for

KAFKA_VERSION = "3.9.1"
HERE = Path(__file__).parent
CACHE = Path(os.environ.get("RESTCONSUMER_TEST_CACHE", Path.home() / ".cache" / "restconsumer"))


def kafka_libs() -> Path:
    """The broker's jars, copied once from the local Maven repository (~/.m2) to a cache."""
    libs = CACHE / f"kafka-{KAFKA_VERSION}" / "lib"
    if libs.is_dir() and any(libs.glob("kafka_2.13-*.jar")):
        return libs
    staging = libs.with_name("lib.partial")
    shutil.rmtree(staging, ignore_errors=True)
    subprocess.run(
        ["mvn", "-q", "-B", "-f", str(HERE / "pom.xml"), "dependency:copy-dependencies",
         f"-DoutputDirectory={staging}", "-DincludeScope=runtime"],
        check=True,
    )
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)
    return libs


class KafkaBroker:
    """One broker+controller on free loopback ports, its data in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.controller_port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self._formatted = False

    def _write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "server.properties"
        config.write_text("\n".join([
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
            f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            f"log.dirs={self.workdir / 'data'}",
            "num.partitions=1",
            "auto.create.topics.enable=true",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=4",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "",
        ]))
        return config

    def _java(self, *args: str) -> list[str]:
        return ["java", "-Xms256m", "-Xmx768m", f"-Dlog4j.configuration=file:{HERE / 'log4j.properties'}",
                f"-Dkafka.logs.dir={self.workdir}", "-cp", f"{kafka_libs()}/*", *args]

    def start(self, timeout: float = 90) -> None:
        """Start the broker (formatting its log dir the first time) and wait until it answers."""
        config = self._write_config()
        if not self._formatted:
            cluster = "-"
            while cluster.startswith("-"):  # a leading '-' would read as an option (Kafka avoids it too)
                cluster = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            subprocess.run(self._java("kafka.tools.StorageTool", "format", "-t", cluster, "-c",
                                      str(config)), check=True, stdout=subprocess.DEVNULL)
            self._formatted = True
        out = open(self.workdir / "stdout.log", "ab")  # noqa: SIM115 - kept for the process' life
        self.process = subprocess.Popen(self._java("kafka.Kafka", str(config)), stdout=out,
                                        stderr=subprocess.STDOUT)
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        wait_for(lambda: admin.list_topics(timeout=2).brokers, timeout, "Kafka broker", every=0.5)

    def stop(self) -> None:
        """Stop the broker and wait for it to end."""
        if self.process is None:
            return
        self.process.terminate()
        ended(self.process)
        self.process = None

    def create_topic(self, name: str, partitions: int = 1) -> None:
        """Create a topic and wait until it is there."""
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        for future in admin.create_topics([NewTopic(name, partitions, 1)]).values():
            future.result(30)
        wait_for(lambda: len(admin.list_topics(name, timeout=5).topics[name].partitions) == partitions,
                 30, f"topic {name}")


def _new_cluster_id() -> str:
    cluster = "-"
    while cluster.startswith("-"):  # a leading '-' would read as an option (Kafka avoids it too)
        cluster = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    return cluster


class _Node:
    """One broker+controller of a :class:`KafkaCluster`."""

    def __init__(self, node_id: int, workdir: Path) -> None:
        self.id = node_id
        self.workdir = workdir
        self.port = free_port()
        self.controller_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def java(self, *args: str) -> list[str]:
        # Three JVMs share two cores with the tests: a small heap, the serial collector and
        # the client compiler start them quicker and cost less CPU than the defaults.
        return ["java", "-Xms128m", "-Xmx512m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                f"-Dlog4j.configuration=file:{HERE / 'log4j.properties'}",
                f"-Dkafka.logs.dir={self.workdir}", "-cp", f"{kafka_libs()}/*", *args]

    def start(self, config: Path) -> None:
        out = open(self.workdir / "stdout.log", "ab")  # noqa: SIM115 - kept for the process' life
        self.process = subprocess.Popen(self.java("kafka.Kafka", str(config)), stdout=out,
                                        stderr=subprocess.STDOUT)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class KafkaCluster:
    """Three nodes, each broker and controller (a 3-voter KRaft quorum), on free loopback ports.

    Topics default to replication 3 and ``min.insync.replicas=2`` (the consumer offsets and
    transaction state too), as a production cluster that survives the loss of one broker.
    A node can be SIGKILLed and started again; every wait is for a condition.
    """

    REPLICATION = 3
    MIN_INSYNC = 2

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.workdir = workdir
        self.nodes = {i: _Node(i, workdir / f"node-{i}") for i in range(1, size + 1)}
        self.bootstrap = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes.values())
        self._cluster_id = _new_cluster_id()
        self._formatted = False
        self._admin: AdminClient | None = None

    # -- processes -------------------------------------------------------------------------

    def _config(self, node: _Node) -> Path:
        node.workdir.mkdir(parents=True, exist_ok=True)
        voters = ",".join(f"{n.id}@127.0.0.1:{n.controller_port}" for n in self.nodes.values())
        config = node.workdir / "server.properties"
        config.write_text("\n".join([
            "process.roles=broker,controller",
            f"node.id={node.id}",
            f"controller.quorum.voters={voters}",
            f"listeners=PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{node.port}",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            f"log.dirs={node.workdir / 'data'}",
            "num.partitions=1",
            "auto.create.topics.enable=true",
            f"default.replication.factor={self.REPLICATION}",
            f"min.insync.replicas={self.MIN_INSYNC}",
            f"offsets.topic.replication.factor={self.REPLICATION}",
            "offsets.topic.num.partitions=4",
            f"transaction.state.log.replication.factor={self.REPLICATION}",
            f"transaction.state.log.min.isr={self.MIN_INSYNC}",
            "transaction.state.log.num.partitions=4",
            "group.initial.rebalance.delay.ms=0",
            "unclean.leader.election.enable=false",
            # A killed broker is fenced (its partitions get new leaders, it leaves their ISR)
            # after its session ends: 6 s rather than 9, heartbeats every second.
            "broker.session.timeout.ms=6000",
            "broker.heartbeat.interval.ms=1000",
            "",
        ]))
        return config

    def start(self, timeout: float = 120) -> None:
        """Format every node (the first time), start them all, and wait until every broker is
        registered and the consumer offsets topic has an in-sync leader everywhere."""
        configs = {i: self._config(n) for i, n in self.nodes.items()}
        if not self._formatted:
            formats = [subprocess.Popen(n.java("kafka.tools.StorageTool", "format", "-t", self._cluster_id,
                                               "-c", str(configs[i])), stdout=subprocess.DEVNULL)
                       for i, n in self.nodes.items()]
            if any(f.wait() != 0 for f in formats):
                raise RuntimeError("formatting a Kafka node's storage failed")
            self._formatted = True
        for i, node in self.nodes.items():
            if not node.running():
                node.start(configs[i])
        self.wait_brokers(set(self.nodes), timeout)

    def stop(self) -> None:
        """Stop every node and wait for them to end."""
        for node in self.nodes.values():
            if node.running():
                assert node.process is not None
                node.process.terminate()
        for node in self.nodes.values():
            if node.process is None:
                continue
            ended(node.process)
            node.process = None

    def kill(self, node_id: int) -> None:
        """SIGKILL one node (no clean shutdown: its leaderships move only once it is fenced)."""
        node = self.nodes[node_id]
        assert node.process is not None and node.running(), f"node {node_id} is not running"
        node.process.send_signal(signal.SIGKILL)
        node.process.wait()
        node.process = None

    def start_node(self, node_id: int, timeout: float = 90) -> None:
        """Start one node again (with its data) and wait until it is registered."""
        node = self.nodes[node_id]
        assert not node.running(), f"node {node_id} is running"
        node.start(self._config(node))
        self.wait_brokers({n for n, other in self.nodes.items() if other.running()}, timeout)

    def running(self) -> set[int]:
        """The nodes whose process runs."""
        return {i for i, n in self.nodes.items() if n.running()}

    # -- what the cluster says -------------------------------------------------------------

    def admin(self) -> AdminClient:
        """An admin client on every node's address (it finds its way round a dead one)."""
        if self._admin is None:
            self._admin = AdminClient({"bootstrap.servers": self.bootstrap})
        return self._admin

    def brokers(self) -> set[int]:
        """The brokers the cluster's metadata lists (registered and not fenced)."""
        return set(self.admin().list_topics(timeout=5).brokers)

    def partitions(self, topic: str) -> dict[int, Any]:
        """``topic``'s partitions' metadata (leader, replicas, isrs), by partition."""
        metadata = self.admin().list_topics(topic, timeout=5).topics[topic]
        if metadata.error is not None:
            raise RuntimeError(f"{topic}: {metadata.error}")
        return dict(metadata.partitions)

    def leaders(self, topic: str) -> dict[int, int]:
        """The leader of each partition of ``topic`` (-1: none)."""
        return {p: m.leader for p, m in self.partitions(topic).items()}

    def leading_most(self, topic: str, prefer: Callable[[int], int] = lambda _: 0) -> int:
        """The node leading most partitions of ``topic``; among equals, the one ``prefer``
        ranks highest."""
        counts = Counter(leader for leader in self.leaders(topic).values() if leader >= 0)
        return max(counts, key=lambda node: (counts[node], prefer(node), -node))

    def topic_config(self, topic: str) -> dict[str, str]:
        """``topic``'s configuration as the brokers report it."""
        future = self.admin().describe_configs([ConfigResource(ConfigResource.Type.TOPIC, topic)])
        [entries] = [f.result(15) for f in future.values()]
        return {name: entry.value for name, entry in entries.items()}

    def create_topic(self, name: str, partitions: int = 1, replication: int = REPLICATION,
                     min_insync: int = MIN_INSYNC) -> None:
        """Create a topic and wait until each partition has a leader and every replica in sync."""
        topic = NewTopic(name, partitions, replication, config={"min.insync.replicas": str(min_insync)})

        def created() -> bool:
            # A fresh cluster's client may drop the handle it sent the request on (librdkafka
            # replaces its bootstrap handles once it has the metadata): send the request again.
            for future in self.admin().create_topics([topic]).values():
                try:
                    future.result(30)
                except KafkaException as e:
                    code = e.args[0].code()
                    if code == KafkaError.TOPIC_ALREADY_EXISTS:
                        return True
                    if code in (KafkaError._DESTROY_BROKER, KafkaError._TRANSPORT, KafkaError._TIMED_OUT):
                        return False
                    raise
            return True

        wait_for(created, 60, f"topic {name} created", every=0.5)
        self.wait_in_sync([name], 30)

    # -- waiting for conditions ------------------------------------------------------------

    def wait_brokers(self, expected: set[int], timeout: float = 60) -> None:
        """Wait until exactly ``expected`` brokers are registered."""
        wait_for(lambda: self.brokers() == expected, timeout, f"Kafka brokers {sorted(expected)}",
                 every=0.5)

    def wait_leaders(self, topics: list[str], timeout: float = 60) -> None:
        """Wait until every partition of ``topics`` has a leader that runs and is in its ISR."""
        def led() -> bool:
            alive = self.running()
            return all(m.leader in alive and m.leader in m.isrs
                       for topic in topics for m in self.partitions(topic).values())

        wait_for(led, timeout, f"leaders of {', '.join(topics)}", every=0.2)

    def wait_in_sync(self, topics: list[str], timeout: float = 60) -> None:
        """Wait until every partition of ``topics`` has a leader and all its replicas in sync."""
        def in_sync() -> bool:
            return all(m.leader >= 0 and sorted(m.isrs) == sorted(m.replicas)
                       for topic in topics for m in self.partitions(topic).values())

        wait_for(in_sync, timeout, f"every replica of {', '.join(topics)} in sync", every=0.5)
