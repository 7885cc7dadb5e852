"""Redis high availability (SPEC §6; issue 22, "What it must show" 4).

Real parts only: a master, a replica and three sentinels (``redis-server --sentinel``), the
session's Kafka broker, a ``twistd -n restconsumer`` process given the
``redis+sentinel://`` URL (master password and the sentinels' own), a loopback endpoint.

The master is SIGKILLed while a job delivers a steady stream: the job loses nothing,
``POST /job/{id}`` works again within 15 s of the replica's promotion, a job created after
it runs, and the old master, started again and turned into a replica by the sentinels,
changes nothing. While no master answers, ``/health/ready`` says "Redis master not found".
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from restconsumer.control.keys import job_key
from restconsumer.control.redis import MASTER_NOT_FOUND
from tests.infra.certs import make_pki
from tests.infra.kafka import KafkaBroker
from tests.infra.ports import wait_for
from tests.infra.sentinel import PASSWORD, SENTINEL_PASSWORD, SentinelRedis
from tests.infra.service import ServiceProcess
from tests.infra.sink import Sink

Start = Callable[..., ServiceProcess]


@pytest.fixture
def sentinel_redis(tmp_path: Path) -> Iterator[SentinelRedis]:
    """A master, a replica and three sentinels of its own for the test."""
    setup = SentinelRedis(tmp_path / "sentinel")
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


def job(name: str, topic: str, url: str) -> dict[str, Any]:
    """A job posting each message's ``n`` to ``{url}/{name}/{n}``."""
    return {"id": name, "owner": "ops", "type": "POST", "topic": topic, "start_from": "earliest",
            "datamap": {"n": "$.msg.n"}, "url": f"{url}/{name}/{{n}}", "json_body": ["n"]}


def delivered(sink: Sink, name: str) -> set[int]:
    """The numbers of job ``name``'s messages the endpoint has seen."""
    return {int(r.path.rsplit("/", 1)[1]) for r in sink.snapshot() if r.path.startswith(f"/{name}/")}


class Stream(threading.Thread):
    """Produces ``{"n": 0}``, ``{"n": 1}``… to a topic at about ``rate`` messages/s until stopped."""

    def __init__(self, bootstrap: str, topic: str, rate: float) -> None:
        super().__init__(daemon=True)
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
        self.topic, self.rate = topic, rate
        self.sent = 0
        self.halt = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self.halt.is_set():
            due = int((time.monotonic() - start) * self.rate) + 1
            while self.sent < due:
                self.producer.produce(self.topic, json.dumps({"n": self.sent}).encode(),
                                      partition=self.sent % 3)
                self.sent += 1
            self.producer.poll(0)
            self.halt.wait(0.01)
        assert self.producer.flush(30) == 0

    def stop(self) -> int:
        """Stop producing; the number of messages written."""
        self.halt.set()
        self.join(60)
        return self.sent


def post(service: ServiceProcess, body: dict[str, Any]) -> int:
    """POST /job/{id}; the HTTP status (0 when the API did not answer)."""
    try:
        return service.request("POST", f"/job/{body['id']}", body, timeout=5).status
    except OSError:
        return 0


def test_the_url_form_is_redacted_and_refused_when_bad(services: Start) -> None:
    """A bad Sentinel URL stops the start with the reason, and no password in it."""
    service = services(redis=f"redis+sentinel://:{PASSWORD}@127.0.0.1:1?sentinel_password={SENTINEL_PASSWORD}",
                       wait=False)
    assert service.process is not None
    assert service.process.wait(60) != 0
    text = service.log()
    assert "the master's name is missing" in text
    assert PASSWORD not in text and SENTINEL_PASSWORD not in text


def test_a_failover_is_followed_without_a_restart(services: Start, kafka: KafkaBroker, sink: Sink,
                                                   sentinel_redis: SentinelRedis,
                                                   topic: Callable[..., str]) -> None:
    setup = sentinel_redis
    first, second = topic(3), topic(3)
    service = services(redis=setup.url)
    wait_for(lambda: service.request("GET", "/health/ready").status == 200, 30, "ready")
    assert post(service, job("before", first, sink.url)) == 201
    # Answered once a replica has it (WAIT 1): read from the replica at once, no waiting.
    assert setup.client(setup.replica).get(job_key("before")) is not None
    stream = Stream(kafka.bootstrap, first, rate=150)
    stream.start()
    wait_for(lambda: len(delivered(sink, "before")) >= 150, 60, "the job delivering")

    old = setup.master
    old.kill()
    killed = time.monotonic()
    # Nobody named a master yet (a sentinel waits 1 s before calling it down): not ready.
    answer = wait_for(lambda: (a := service.request("GET", "/health/ready")).status == 503 and
                      MASTER_NOT_FOUND in json.dumps(a.json) and a, 30, "ready saying no master")
    print("ready while no master:", answer.json)  # type: ignore[attr-defined]
    wait_for(lambda: setup.master_port() not in (None, old.port), 60, "the replica promoted")
    promoted = time.monotonic()
    print(f"promoted {promoted - killed:.1f} s after the kill")

    wait_for(lambda: post(service, job("after", second, sink.url)) in (200, 201), 15,
             "POST /job/{id} within 15 s of the promotion")
    print(f"POST /job/after answered {time.monotonic() - promoted:.1f} s after the promotion")
    with Producer({"bootstrap.servers": kafka.bootstrap}) as producer:
        for n in range(30):
            producer.produce(second, json.dumps({"n": n}).encode(), partition=n % 3)
        assert producer.flush(30) == 0
    wait_for(lambda: delivered(sink, "after") == set(range(30)), 60, "the job created after it running")

    # The old master is back: the sentinels make it a replica of the new one.
    old.start()
    wait_for(lambda: setup.client(old).info("replication")["role"] == "slave" and
             setup.client(old).info("replication")["master_link_status"] == "up", 60,
             "the old master a replica in sync")
    assert setup.client(old).get(job_key("after")) is not None
    assert post(service, {**job("after", second, sink.url), "headers": {"X-Again": "1"}}) == 200

    sent = stream.stop()
    wait_for(lambda: delivered(sink, "before") == set(range(sent)), 90, "every message of the stream")
    assert service.request("GET", "/health/ready").status == 200
    stored = service.request("GET", "/job/after").json
    assert stored["headers"] == {"X-Again": "1"}
    print(f"stream: {sent} messages, all delivered; {len(sink.snapshot())} requests in all")


def test_tls_to_the_sentinels_and_the_master_is_verified(services: Start, tmp_path: Path) -> None:
    """``rediss+sentinel://``: TLS to the sentinels and the master, their certificates checked
    (here against ``tls_server_name=localhost``, with the test CA as the system's bundle):
    trusted, the API works on the master; a CA that is not trusted, no connection at all."""
    pki = make_pki(tmp_path / "pki")
    setup = SentinelRedis(tmp_path / "sentinel-tls", tls=pki)
    try:
        setup.start()
        url = f"{setup.url}&tls_server_name=localhost"
        trusted = services(redis=url, env={"SSL_CERT_FILE": str(pki.ca_file)})
        wait_for(lambda: trusted.request("GET", "/health/ready").status == 200, 30, "ready over TLS")
        body = {"id": "tls", "owner": "ops", "type": "POST", "topic": "t", "url": "http://127.0.0.1:1/",
                "datamap": {}}
        assert post(trusted, body) == 201
        assert setup.client(setup.master).get(job_key("tls")) is not None
        trusted.stop()

        other = make_pki(tmp_path / "other-pki")
        untrusted = services(redis=url, env={"SSL_CERT_FILE": str(other.ca_file)})
        # Not "not connected yet": the sentinels were tried and none would do.
        answer = wait_for(lambda: (a := untrusted.request("GET", "/health")).status == 503 and
                          "no sentinel answers" in a.json["redis"]["error"] and a, 30, "not ready")
        print("with a CA not trusted:", answer.json)  # type: ignore[attr-defined]
        assert post(untrusted, {**body, "id": "no"}) == 503
        assert setup.client(setup.master).get(job_key("no")) is None
    finally:
        setup.stop()
