"""Outage, not poison (SPEC §5; issue 9, "What it must show" 1 and 2).

Through the documented interfaces only: real ``twistd -n restconsumer`` processes, the
session's real Kafka broker and Redis, real loopback HTTP servers, and
``GET /job/{id}/status`` polled while it happens.

1. An endpoint that refuses connections for 40 s (nothing listens on its port), then comes
   up: with ``max_attempts: 2`` every message is delivered, in order per partition, and
   nothing is dead-lettered; the status showed the circuit open during the outage (with
   its reason and since when), and closed once the endpoint answered again.
2. One message answered 503 for ever while the job's other messages succeed: it is
   dead-lettered after its ``max_attempts`` (the circuit does not hide poison), once, and
   the messages after it on its partition are delivered; the circuit never opened.
"""

from __future__ import annotations

import datetime
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.infra.kafka import KafkaBroker
from tests.infra.kafka_io import produce, read_all
from tests.infra.ports import free_port, wait_for
from tests.infra.service import ServiceProcess
from tests.infra.sink import Received, Sink

Start = Callable[..., ServiceProcess]

#: How long the endpoint refuses connections (issue 9: "refused for 40 s then up").
OUTAGE = 40.0
MESSAGES = 400


def job(name: str, topic: str, url: str, **more: Any) -> dict[str, Any]:
    """A job posting each message's id, partition and offset to ``{url}/{name}/{id}``."""
    return {"id": name, "owner": "ops", "type": "POST", "topic": topic,
            "datamap": {"id": "$.msg.id", "partition": "$.meta.partition", "offset": "$.meta.offset"},
            "url": f"{url}/{name}/{{id}}", "json_body": ["partition", "offset"], **more}


def ids(count: int, partitions: int) -> list[str]:
    """Message ids in production order, naming the partition and the sequence on it.

    ``produce`` writes message ``i`` to partition ``i % partitions``, so the id of message
    ``i`` is ``p{partition}-{sequence}`` (the sequence zero-padded: it sorts as a string).
    """
    return [f"p{i % partitions}-{i // partitions:04d}" for i in range(count)]


def json_message(entity: str) -> bytes:
    """One JSON message whose ``id`` is ``entity``."""
    return json.dumps({"id": entity}).encode()


def entity(got: Received) -> str:
    """The ``{id}`` a request was sent for."""
    return got.path.rsplit("/", 1)[1]


def first_deliveries(received: list[Received], partition: int) -> list[str]:
    """The ids of ``partition`` in the order the endpoint first saw each one."""
    seen: dict[str, None] = {}
    for got in received:
        name = entity(got)
        if name.startswith(f"p{partition}-"):
            seen.setdefault(name, None)
    return list(seen)


def status(service: ServiceProcess, name: str) -> dict[str, Any]:
    """GET /job/{name}/status."""
    answer = service.request("GET", f"/job/{name}/status")
    assert answer.status == 200, answer
    return answer.json


def parse_time(text: str) -> datetime.datetime:
    """An ISO 8601 UTC time as the API writes it (``…Z``)."""
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass
class Sample:
    """The job's circuit as one status poll showed it."""

    at: float
    circuit: dict[str, Any]

    @property
    def state(self) -> str:
        """``open`` or ``closed``."""
        return str(self.circuit.get("state"))


class CircuitWatch:
    """Polls ``GET /job/{id}/status`` on a thread of its own and keeps each circuit seen."""

    def __init__(self, service: ServiceProcess, job_id: str, every: float = 0.2) -> None:
        self.samples: list[Sample] = []
        self.errors: list[str] = []
        self._service = service
        self._job_id = job_id
        self._every = every
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> CircuitWatch:
        """Start polling."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling (idempotent)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(15)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                circuit = status(self._service, self._job_id)["circuit"]
            except Exception as e:  # noted; a slow answer is not the circuit's state
                with self._lock:
                    self.errors.append(repr(e))
            else:
                with self._lock:
                    self.samples.append(Sample(time.monotonic(), dict(circuit)))
            self._stop.wait(self._every)

    def snapshot(self) -> list[Sample]:
        """Every sample so far, oldest first."""
        with self._lock:
            return list(self.samples)

    def seen_open(self) -> Sample | None:
        """The first sample showing the circuit open, if any."""
        return next((s for s in self.snapshot() if s.state == "open"), None)


# -- 1. an outage dead-letters nothing -----------------------------------------------------

@pytest.mark.parametrize("partitions", [2, 1], ids=["2-partitions", "1-partition"])
def test_an_endpoint_refusing_connections_for_40_s_loses_and_dead_letters_nothing(
        partitions: int, services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    """Nothing listens on the endpoint's port for 40 s, then a server does; ``max_attempts: 2``.

    All 400 messages are delivered, each partition's in offset order (by the first time
    the endpoint saw each id), nothing is dead-lettered (the dead-letter topic is empty,
    ``dead_lettered`` is 0); while the endpoint was down the status showed the circuit open
    with a reason and a ``since`` within the outage, and after it came back, closed (and it
    did not open again). Opening and closing are each logged once.

    Before the circuit, the first records of each partition used up their 2 attempts within
    a second and were dead-lettered one after the other for the whole outage (issue 9: 100
    of 400).
    """
    port = free_port()
    name = topic(partitions)
    expected = ids(MESSAGES, partitions)
    produce(kafka.bootstrap, name, [json_message(e) for e in expected], partitions=partitions)
    service = services()
    job_id = f"outage{partitions}"
    retry = {"max_attempts": 2, "initial_wait": 0.2, "max_wait": 2}
    posted_wall = datetime.datetime.now(datetime.UTC)
    answer = service.request("POST", f"/job/{job_id}",
                             job(job_id, name, f"http://127.0.0.1:{port}", retry=retry))
    assert answer.status == 201, answer
    down_since = time.monotonic()
    watch = CircuitWatch(service, job_id).start()
    sink: Sink | None = None
    try:
        try:
            wait_for(watch.seen_open, OUTAGE - 5, "the circuit open during the outage", every=0.2)
        except TimeoutError as e:
            raise AssertionError(f"the circuit did not open within {OUTAGE - 5:.0f} s of refused "
                                 f"connections; status now: {status(service, job_id)}\n"
                                 f"{service.log()[-4000:]}") from e
        opened = watch.seen_open()
        assert opened is not None
        # The planned outage: nothing listens on the port until OUTAGE seconds have passed.
        time.sleep(max(0.0, down_since + OUTAGE - time.monotonic()))
        during = status(service, job_id)
        up_wall = datetime.datetime.now(datetime.UTC)
        up_at = time.monotonic()
        endpoint = sink = Sink(port=port).start()

        def all_delivered() -> bool:
            return {entity(r) for r in endpoint.snapshot()} >= set(expected)

        try:
            wait_for(all_delivered, 60, f"all {MESSAGES} delivered after the outage", every=0.2)
        except TimeoutError as e:
            got = len({entity(r) for r in endpoint.snapshot()})
            raise AssertionError(f"{got} of {MESSAGES} delivered 60 s after the endpoint came up; "
                                 f"status: {status(service, job_id)}\n{service.log()[-4000:]}") from e
        delivered_at = time.monotonic()
        wait_for(lambda: status(service, job_id)["circuit"]["state"] == "closed", 10,
                 "the circuit closed after the outage")
        wait_for(lambda: status(service, job_id)["counters"]["delivered"] >= MESSAGES, 10,
                 "the delivered counter")
        time.sleep(0.5)  # one more poll of the watch after the close
        watch.stop()
        samples = watch.snapshot()

        # The circuit: open during the outage, with a reason and since when.
        down = [s for s in samples if s.at < up_at]
        assert down and all(s.state == "open" for s in down if s.at >= opened.at), \
            f"the circuit closed during the outage: {[s.circuit for s in down]}"
        circuit = opened.circuit
        assert circuit["reason"], circuit
        assert "refused" in circuit["reason"].lower(), circuit
        assert circuit["since"], circuit
        since = parse_time(circuit["since"])
        assert posted_wall - datetime.timedelta(seconds=1) <= since <= up_wall, (since, posted_wall)
        assert during["circuit"]["state"] == "open", during["circuit"]
        assert during["counters"]["dead_lettered"] == 0, during["counters"]
        # ... and closed once the endpoint answered, never to open again.
        after = [s for s in samples if s.at >= up_at]
        closed_at = next((s.at for s in after if s.state == "closed"), None)
        assert closed_at is not None, [s.circuit for s in after]
        assert all(s.state == "closed" for s in after if s.at >= closed_at), \
            [s.circuit for s in after]
        final = status(service, job_id)
        assert final["circuit"] == {"state": "closed", "since": None, "reason": None}, final

        # Everything delivered, in order per partition, nothing dead-lettered.
        received = endpoint.snapshot()
        assert {entity(r) for r in received} == set(expected)
        for partition in range(partitions):
            mine = sorted(e for e in expected if e.startswith(f"p{partition}-"))
            assert first_deliveries(received, partition) == mine, f"partition {partition} out of order"
        for got in received:
            assert f"p{json.loads(got.body)['partition']}-" in entity(got), got.body
        assert final["counters"]["delivered"] == MESSAGES, final["counters"]
        assert final["counters"]["dead_lettered"] == 0, final["counters"]
        assert final["counters"]["failed"] == 0, final["counters"]
        # expect=1: read_all stops at once when it expects none; nothing must come.
        letters = read_all(kafka.bootstrap, f"restconsumer.deadletter.{job_id}", expect=1, timeout=5)
        assert letters == [], [m.value() for m in letters]
        log = service.log()
        assert ": dead-lettered: " not in log
        assert log.count(f"job {job_id}: circuit open") == 1, log[-4000:]
        assert log.count(f"job {job_id}: circuit closed") == 1, log[-4000:]
        print(f"\n{partitions} partition(s): circuit open {opened.at - down_since:.1f} s after the "
              f"job was posted; endpoint up at {up_at - down_since:.1f} s; circuit closed "
              f"{closed_at - up_at:.1f} s and all {MESSAGES} delivered {delivered_at - up_at:.1f} s "
              f"after it came up ({len(received)} requests); reason: {circuit['reason']!r}; "
              f"{len(samples)} status polls, {len(watch.errors)} failed")
    finally:
        watch.stop()
        if sink is not None:
            sink.stop()


# -- 2. poison is still dead-lettered ------------------------------------------------------

class Poisoned:
    """503 for ever for one id; 200 for every other one, after a short pause.

    The pause keeps the other partition's stream going (successes) for the whole time the
    poison record uses up its attempts, so the job visibly gets good answers meanwhile.
    """

    def __init__(self, poison: str, pause: float = 0.005) -> None:
        self.poison = poison
        self.pause = pause

    def __call__(self, got: Received) -> tuple[int, dict[str, str], bytes]:
        if entity(got) == self.poison:
            return 503, {}, b"poisoned for ever"
        time.sleep(self.pause)
        return 200, {}, b"ok"


def test_a_message_answered_503_for_ever_is_dead_lettered_and_its_partition_goes_on(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    """Two partitions of 300 messages; ``p0-0020`` is answered 503 for ever, all else 200.

    The poison record is tried ``max_attempts`` (3) times and dead-lettered exactly once,
    with status 503 and a reason saying its retries were exhausted; the 279 messages after
    it on partition 0 are delivered, in order, after its last attempt; partition 1 is
    delivered whole; the circuit never opened (every status poll showed it closed, and
    nothing logged it opening).
    """
    per_partition = 300
    name = topic(2)
    expected = ids(2 * per_partition, 2)
    poison = "p0-0020"
    sink = Sink(Poisoned(poison)).start()
    try:
        produce(kafka.bootstrap, name, [json_message(e) for e in expected], partitions=2)
        service = services()
        job_id = "poisoned"
        retry = {"max_attempts": 3, "initial_wait": 0.2, "max_wait": 1}
        started = time.monotonic()
        answer = service.request("POST", f"/job/{job_id}", job(job_id, name, sink.url, retry=retry))
        assert answer.status == 201, answer
        watch = CircuitWatch(service, job_id, every=0.1).start()
        good = set(expected) - {poison}
        try:
            def settled() -> bool:
                counters = status(service, job_id)["counters"]
                return counters["dead_lettered"] >= 1 and \
                    {entity(r) for r in sink.snapshot()} >= good

            try:
                wait_for(settled, 60, "the poison dead-lettered and every other message delivered",
                         every=0.2)
            except TimeoutError as e:
                got = {entity(r) for r in sink.snapshot()}
                raise AssertionError(f"{len(got & good)} of {len(good)} delivered; status: "
                                     f"{status(service, job_id)}\n{service.log()[-4000:]}") from e
            settled_at = time.monotonic()
            time.sleep(0.5)
        finally:
            watch.stop()
        samples = watch.snapshot()

        # Dead-lettered exactly once, after its 3 attempts, with status and reason.
        letters = read_all(kafka.bootstrap, f"restconsumer.deadletter.{job_id}", expect=2, timeout=8)
        assert len(letters) == 1, [m.value() for m in letters]
        letter = letters[0]
        assert json.loads(letter.value())["id"] == poison
        headers = dict(letter.headers())
        assert headers["restconsumer.control.status"] == b"503", headers
        assert b"retries exhausted" in headers["restconsumer.reason"], headers
        assert b"503" in headers["restconsumer.reason"], headers
        assert headers["restconsumer.attempts"] == b"3", headers
        assert headers["restconsumer.partition"] == b"0", headers
        assert headers["restconsumer.offset"] == b"20", headers

        # Tried exactly max_attempts times; the rest delivered, in order, partition 0 going
        # on past the poison only after its last attempt.
        received = sink.snapshot()
        tries = [i for i, r in enumerate(received) if entity(r) == poison]
        assert len(tries) == 3, f"the poison was tried {len(tries)} times"
        assert {entity(r) for r in received} == set(expected)
        for partition in (0, 1):
            mine = sorted(e for e in expected if e.startswith(f"p{partition}-"))
            assert first_deliveries(received, partition) == mine, f"partition {partition} out of order"
        next_one = next(i for i, r in enumerate(received) if entity(r) == "p0-0021")
        assert next_one > tries[-1], "partition 0 went on before the poison's last attempt"
        # The job had good answers while the poison failed (partition 1 went on meanwhile).
        between = [r for r in received[tries[0]:tries[-1]] if entity(r).startswith("p1-")]
        assert between, "no other message succeeded while the poison was retried"

        # The circuit never opened.
        assert samples, watch.errors
        assert all(s.state == "closed" for s in samples), [s.circuit for s in samples if s.state != "closed"]
        final = status(service, job_id)
        assert final["circuit"]["state"] == "closed", final["circuit"]
        assert final["counters"]["delivered"] == len(good), final["counters"]
        assert final["counters"]["dead_lettered"] == 1, final["counters"]
        assert final["counters"]["failed"] == 1, final["counters"]
        log = service.log()
        assert "circuit open" not in log, log[-4000:]
        assert log.count(": dead-lettered: ") == 1, log[-4000:]
        print(f"\npoison: tried {len(tries)} times over "
              f"{received[tries[-1]].at - received[tries[0]].at:.2f} s with {len(between)} "
              f"partition-1 deliveries between; all settled {settled_at - started:.1f} s after the "
              f"job was posted; {len(samples)} status polls, all closed; reason: "
              f"{headers['restconsumer.reason'].decode()!r}")
    finally:
        sink.stop()
