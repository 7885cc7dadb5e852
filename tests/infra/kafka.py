"""A real single-node Apache Kafka broker (KRaft), resolved from Maven Central with mvn."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import uuid
from pathlib import Path

from confluent_kafka.admin import AdminClient, NewTopic

from tests.infra.ports import free_port, wait_for

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
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def create_topic(self, name: str, partitions: int = 1) -> None:
        """Create a topic and wait until it is there."""
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        for future in admin.create_topics([NewTopic(name, partitions, 1)]).values():
            future.result(30)
        wait_for(lambda: len(admin.list_topics(name, timeout=5).topics[name].partitions) == partitions,
                 30, f"topic {name}")
