"""How fast a refused stream is dead-lettered, and whether a crash in the flood loses any.

SPEC §5 "Dead letters do not slow the stream", issue 9 "What it must show" point 3. Real
Kafka (as in the tests), real Redis, real ``twistd -n restconsumer`` processes driven
through their HTTP API, and a fast threaded loopback HTTP endpoint that answers 400 to
every path under ``/refuse.{job}/`` and ``/crash/`` and 200 to every path under
``/accept.{job}/``, noting which message ids it got.

``--messages`` JSON messages (default 10,000) are produced once to a topic of 4 partitions;
each job below reads it from the start, in a consumer group of its own.

1. **A refused stream.** One job POSTs every message to ``/refuse.{job}/{id}`` (400): the time
   from its creation (``POST /job/{id}``) until every message is on its dead-letter topic
   ``restconsumer.deadletter.{id}`` (read back by a consumer of this benchmark; the time
   is taken from the last dead letter's Kafka timestamp, and from when the reader saw it),
   as messages/s beside the target of 1,000/s. Beside it, from the same run and the same
   process, the same messages delivered by another job to ``/accept.{job}/{id}`` (200), for
   comparison.
2. **A crash in the flood.** A third job, again all answered 400, in a fresh process; the
   process is sent SIGKILL once about half of the messages are dead-lettered, then started
   again on the same Redis and Kafka, and the benchmark waits until every message id is on
   the dead-letter topic. Prints the ids missing from the dead-letter topic (target 0),
   the duplicates there (at least once allows them), and what the endpoint received.

Each job's dead-letter topic is created (one partition, as the broker would auto-create it)
before the job, so that the reader is there from the first dead letter. The fresh broker is
first warmed up (its consumer-offsets topic created, which costs the first group join of a
new broker seconds, and its produce path exercised) so that a figure is not the broker's
start-up. Part 1 runs
``--rounds`` times in turns (refused, accepted, refused, ...) in one service process; the
best round counts, every round is printed. Beside each flood: the CPU the service, the
broker and this benchmark used per message, how busy the machine was and how long the
service's reactor thread waited for a CPU (on a shared machine, other work lowers every
figure; ``--quiet`` waits for a calmer one first).

Figures, not a test: nothing fails on a missed target. Every wait has a deadline
(``--timeout``), and the temporary folder (broker, Redis, service logs) is removed.

    python3 bench/deadletters.py [--messages 10000] [--rounds 2] [--timeout 120]
                                 [--quiet LOAD SECONDS] [--keep-logs DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Infra,
    ServiceProcess,
    cpu_seconds,
    infra,
    start_service,
    stderr_to,
    stop_service,
    thread_cpu,
    verdict,
)

PARTITIONS = 4
TOPIC = "bench.deadletters"
TARGET_RATE = 1000.0  # dead letters per second, one job (SPEC §5)
ACCEPTED = "accept"  # the endpoint answers 200 to path prefixes that start so, 400 to every other one


# --- the endpoint --------------------------------------------------------------------------


@dataclass
class Received:
    """What the endpoint got under one path prefix."""

    requests: int = 0
    ids: Counter[str] = field(default_factory=Counter)
    first: float = 0.0  # wall time of the first request
    last_new: float = 0.0  # wall time of the first request for the last id not seen before


class Endpoint:
    """A threaded HTTP/1.1 server on loopback: 200 under ``/accept…/``, 400 elsewhere.

    The last path segment is taken as the message id; per path prefix it counts requests and
    ids, and notes when the last new id came.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._received: dict[str, Received] = {}
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def _handle(self) -> None:
                left = int(self.headers.get("Content-Length") or 0)
                while left > 0:
                    chunk = self.rfile.read(min(left, 1 << 16))
                    if not chunk:
                        break
                    left -= len(chunk)
                parts = self.path.split("?", 1)[0].strip("/").split("/")
                prefix, message_id = parts[0], parts[-1]
                endpoint._note(prefix, message_id)
                accepted = prefix.startswith(ACCEPTED)
                answer = b'{"ok": true}' if accepted else b'{"error": "schema changed"}'
                self.send_response(200 if accepted else 400)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(answer)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a connection the service closed (it stopped, or was killed) is no news

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="endpoint", daemon=True)

    def _note(self, prefix: str, message_id: str) -> None:
        now = time.time()
        with self._lock:
            got = self._received.setdefault(prefix, Received(first=now))
            got.requests += 1
            if message_id not in got.ids:
                got.last_new = now
            got.ids[message_id] += 1

    def received(self, prefix: str) -> Received:
        """A copy of what came under ``prefix`` so far."""
        with self._lock:
            got = self._received.get(prefix, Received())
            return Received(got.requests, Counter(got.ids), got.first, got.last_new)

    def distinct(self, prefix: str) -> int:
        """How many different ids came under ``prefix`` so far."""
        with self._lock:
            got = self._received.get(prefix)
            return len(got.ids) if got is not None else 0

    def start(self) -> Endpoint:
        """Start answering."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering and close the listening socket."""
        self._server.shutdown()
        self._server.server_close()


def endpoint_ceiling(url: str, connections: int = PARTITIONS, requests: int = 1000) -> float:
    """Requests/s the endpoint answers to ``connections`` keep-alive clients in this process
    (a rough ceiling for the service's figures: the client is Python too)."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"id": "m0", "n": 0, "name": "Person 0"}).encode()

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            for i in range(requests):
                conn.request("POST", f"/ceiling/c{k}-{i}", body=body,
                             headers={"Content-Type": "application/json"})
                conn.getresponse().read()
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(connections)]
    begin = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return connections * requests / (time.monotonic() - begin)


# --- Kafka ---------------------------------------------------------------------------------


def message(i: int) -> bytes:
    """Source message ``i``: a small JSON object with its id."""
    return json.dumps({"id": message_id(i), "n": i, "name": f"Person {i}", "age": 20 + i % 60,
                       "household": {"id": f"hh-{i // 4}", "size": 1 + i % 5}}).encode()


def message_id(i: int) -> str:
    """The id of source message ``i``."""
    return f"m{i:06d}"


def produce_messages(bootstrap: str, total: int) -> int:
    """Produce the messages round-robin over the partitions, fast; how many were acknowledged."""
    producer = Producer({"bootstrap.servers": bootstrap, "acks": 1, "linger.ms": 20,
                         "batch.num.messages": 10000, "compression.type": "none"})
    acked = [0]
    errors: list[str] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is None:
            acked[0] += 1
        elif len(errors) < 5:
            errors.append(str(err))

    for i in range(total):
        while True:
            try:
                producer.produce(TOPIC, value=message(i), partition=i % PARTITIONS, on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    left = producer.flush(60)
    if errors or left:
        print(f"  producing: {total - acked[0]} messages not acknowledged ({left} still queued); "
              f"first errors: {errors}", flush=True)
    return acked[0]


def warm_up_broker(bootstrap: str, timeout: float) -> str:
    """Bring a fresh broker to where a long-running one is: its consumer-offsets topic created
    (the first group join of a new broker waits for it, seconds) and its produce path warmed by
    a producer configured as the service's dead-letter producer. What was done, as printed."""
    topic = "bench.warmup"
    begin = time.monotonic()
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5,
                         "enable.idempotence": True})
    headers = [(f"restconsumer.h{k}", b"x" * 16) for k in range(7)]
    for i in range(20_000):
        while True:
            try:
                producer.produce(topic, value=message(i), headers=headers)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    left = producer.flush(max(1.0, timeout))
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-warmup",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    joined = False
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                consumer.commit(message=msg, asynchronous=False)
                joined = True
                break
    finally:
        consumer.close()
    return (f"broker warmed up in {time.monotonic() - begin:.1f} s: 20,000 messages produced as the "
            f"dead-letter producer does{f' ({left} not acknowledged)' if left else ''}, a consumer group "
            f"{'joined and committed' if joined else 'NOT joined within the deadline'}")


def dead_letter_topic(job_id: str) -> str:
    """The default dead-letter topic of a job."""
    return f"restconsumer.deadletter.{job_id}"


@dataclass
class DeadLetter:
    """One dead letter as read back: the source message id, where it came from, when."""

    message_id: str
    source: str  # "partition:offset" from its headers
    kafka_ms: int  # its Kafka timestamp (CreateTime: when the service produced it)
    seen: float  # wall time when this benchmark's reader got it
    status: str
    reason: str


class DeadLetterReader:
    """Reads a job's dead-letter topic (partition 0, as the broker auto-creates it) from the
    start, in a thread of its own, until stopped."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.letters: list[DeadLetter] = []
        self.ids: set[str] = set()
        self.unreadable = 0
        self._lock = threading.Lock()
        self._running = True
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4()}",
                                   "enable.auto.commit": False, "enable.partition.eof": False,
                                   # Few, large fetches: the broker has enough to do.
                                   "fetch.min.bytes": 256 * 1024, "fetch.wait.max.ms": 250})
        self._consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        self._thread = threading.Thread(target=self._run, name=f"reader-{topic}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self._running:
            batch = self._consumer.consume(1000, 0.1)
            now = time.time()
            letters = []
            for msg in batch:
                if msg.error() is not None:
                    continue
                headers = {k: (v or b"").decode("utf-8", "replace") for k, v in (msg.headers() or [])}
                try:
                    source_id = str(json.loads(msg.value())["id"])
                except (ValueError, KeyError, TypeError):
                    source_id = ""
                source = f"{headers.get('restconsumer.partition')}:{headers.get('restconsumer.offset')}"
                letters.append(DeadLetter(
                    source_id, source,
                    msg.timestamp()[1], now, headers.get("restconsumer.control.status", ""),
                    headers.get("restconsumer.reason", "")))
            with self._lock:
                for letter in letters:
                    if letter.message_id:
                        self.ids.add(letter.message_id)
                    else:
                        self.unreadable += 1
                self.letters.extend(letters)

    def distinct(self) -> int:
        """How many different source ids were read so far."""
        with self._lock:
            return len(self.ids)

    def count(self) -> int:
        """How many dead letters were read so far."""
        with self._lock:
            return len(self.letters)

    def snapshot(self) -> list[DeadLetter]:
        """The dead letters read so far."""
        with self._lock:
            return list(self.letters)

    def stop(self) -> None:
        """Stop reading and close the consumer."""
        self._running = False
        self._thread.join(10)
        with contextlib.suppress(RuntimeError):
            self._consumer.close()


# --- the service ---------------------------------------------------------------------------


def job(job_id: str, url: str) -> dict[str, Any]:
    """A job POSTing every message (5 datamap paths, json_body) to ``url``/{id}."""
    return {"id": job_id, "owner": "bench", "type": "POST", "topic": TOPIC,
            "datamap": {"id": "$.msg.id", "n": "$.msg.n", "name": "$.msg.name", "age": "$.msg.age",
                        "household": "$.msg.household.id"},
            "url": f"{url}/{{id}}", "json_body": ["id", "n", "name", "age", "household"]}


def status(service: ServiceProcess | None, job_id: str) -> dict[str, Any]:
    """The job's status, or {} when the service does not answer."""
    if service is None or service.process is None or service.process.poll() is not None:
        return {}
    try:
        answer = service.request("GET", f"/job/{job_id}/status", timeout=10)
    except OSError:
        return {}
    return answer.json if answer.status == 200 else {}


def counters(service: ServiceProcess | None, job_id: str) -> str:
    """The job's counters (and circuit, when there is one) as printed."""
    got = status(service, job_id)
    if not got:
        return "no status"
    shown = f"counters {got.get('counters')}, total_lag {got.get('total_lag')}"
    circuit = got.get("circuit")
    if isinstance(circuit, dict) and circuit.get("state") not in (None, "closed"):
        shown += f", circuit {circuit}"
    return shown


def create_job(service: ServiceProcess, job_id: str, url: str) -> float:
    """Create the job; the wall time just before it was asked for."""
    begin = time.time()
    answer = service.request("POST", f"/job/{job_id}", job(job_id, url), timeout=30)
    if answer.status != 201:
        raise RuntimeError(f"POST /job/{job_id} answered {answer.status}: {answer.body[:300]!r}")
    return begin


def wait_until(done: Any, deadline: float, service: ServiceProcess | None, job_id: str,
               progress: Any, every: float = 5.0, tick: float = 0.02) -> str:
    """Call ``done()`` until it is true, the service dies or ``deadline`` (monotonic) passes;
    ``progress()`` gives a line printed every ``every`` seconds. How it ended."""
    next_report = time.monotonic() + every
    while True:
        if done():
            return "done"
        now = time.monotonic()
        if service is not None and service.process is not None and service.process.poll() is not None:
            return f"the service exited with code {service.process.returncode}"
        if now >= deadline:
            return "deadline passed"
        if now >= next_report:
            print(f"    {progress()}; {counters(service, job_id)}", flush=True)
            next_report += every
        time.sleep(tick)


# --- where the CPU went ------------------------------------------------------------------------


def machine_ticks() -> tuple[int, int]:
    """All and idle (idle + iowait) clock ticks of the machine so far, from ``/proc/stat``."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return sum(ticks), ticks[3] + ticks[4]


@dataclass
class CpuUse:
    """CPU used while one flood ran: the machine's, and each party's."""

    seconds: float  # wall time watched
    cpus: int
    busy: float  # share of the machine's CPU time that was busy (0..1)
    service: float  # CPU seconds of the service process
    main_thread: float  # CPU seconds of its main thread (the reactor's)
    broker: float  # CPU seconds of the Kafka broker
    bench: float  # CPU seconds of this process (the endpoint and the dead-letter reader)
    reactor_waited: float  # seconds the service's main (reactor) thread was runnable but had no CPU
    load: str  # the load averages at the end

    def line(self, messages: int) -> str:
        """The figures, per message where it makes sense, as printed."""
        ours = self.service + self.broker + self.bench
        ran, waited = self.main_thread / self.seconds, self.reactor_waited / self.seconds
        idle = max(0.0, 1 - ran - waited)
        others = max(0.0, self.busy * self.cpus * self.seconds - ours) / self.seconds

        def per(cpu: float) -> str:
            return f"{cpu / messages * 1e3:.2f} ms"

        return (f"CPU per message: service {per(self.service)} (its reactor thread {per(self.main_thread)}), "
                f"broker {per(self.broker)}, this benchmark {per(self.bench)}; the machine "
                f"({self.cpus} CPUs) was {self.busy * 100:.0f}% busy, other processes using "
                f"{others:.2f} CPUs; load average {self.load}; the service's reactor thread ran "
                f"{ran:.0%} of the time, waited for a CPU {waited:.0%}, was idle {idle:.0%}")


#: What :class:`CpuWatch` takes at the beginning: wall time, machine ticks, service CPU, its threads'
#: CPU, broker CPU, this process' CPU, the reactor thread's run-queue wait.
_Taken = tuple[float, tuple[int, int], float, dict[int, tuple[str, float]], float, float, float]


def runqueue_wait(pid: int) -> float:
    """Seconds the main thread of ``pid`` has been runnable but waiting for a CPU so far (the
    second field of ``/proc/PID/task/PID/schedstat``); 0 where the kernel does not say."""
    with contextlib.suppress(OSError, ValueError, IndexError), \
            open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        return int(f.read().split()[1]) / 1e9
    return 0.0


def load_text() -> str:
    """The load averages (1, 5, 15 minutes), as ``uptime`` shows them."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def code_under_test() -> str:
    """The commit the service runs from, and uncommitted changes to its code, if any."""
    repo = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        return ""

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return f"{repo} (not a git checkout)"
    changed = git("status", "--short", "--", "restconsumer").splitlines()
    text = f"commit {head}"
    if changed:
        text += f" + uncommitted changes to {', '.join(line.split(None, 1)[-1] for line in changed)}"
    return text


class CpuWatch:
    """Measures :class:`CpuUse` between :meth:`start` and :meth:`stop`."""

    def __init__(self, service_pid: int, broker_pid: int) -> None:
        self.service_pid = service_pid
        self.broker_pid = broker_pid
        self._begin: _Taken | None = None

    def _cpu(self, pid: int) -> float:
        with contextlib.suppress(OSError):
            return cpu_seconds(pid)
        return 0.0

    def _threads(self) -> dict[int, tuple[str, float]]:
        with contextlib.suppress(OSError):
            return thread_cpu(self.service_pid)
        return {}

    def start(self) -> CpuWatch:
        """Take the figures at the beginning."""
        self._begin = (time.monotonic(), machine_ticks(), self._cpu(self.service_pid), self._threads(),
                       self._cpu(self.broker_pid), time.process_time(), runqueue_wait(self.service_pid))
        return self

    def stop(self) -> CpuUse:
        """Take the figures at the end; what was used in between."""
        assert self._begin is not None
        wall, ticks, service, threads, broker, bench, waited = self._begin
        now_ticks = machine_ticks()
        now_threads = self._threads()
        pid = self.service_pid  # its main thread runs the reactor
        main = now_threads.get(pid, ("", 0.0))[1] - threads.get(pid, ("", 0.0))[1]
        total = now_ticks[0] - ticks[0]
        busy = 1 - (now_ticks[1] - ticks[1]) / total if total else 0.0
        return CpuUse(time.monotonic() - wall, os.cpu_count() or 1, busy,
                      self._cpu(self.service_pid) - service, main,
                      self._cpu(self.broker_pid) - broker, time.process_time() - bench,
                      runqueue_wait(self.service_pid) - waited, load_text())


# --- 1. refused vs accepted ----------------------------------------------------------------


@dataclass
class Flood:
    """One job working through every message."""

    label: str
    total: int
    done: int = 0
    seconds: float = 0.0  # from the job's creation until the last one was done
    steady_seconds: float = 0.0  # from the first one done until the last
    ended: str = ""
    extra: list[str] = field(default_factory=list)
    cpu: CpuUse | None = None

    @property
    def rate(self) -> float:
        """Messages per second from the job's creation."""
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_rate(self) -> float:
        """Messages per second from the first one done until the last."""
        return (self.done - 1) / self.steady_seconds if self.steady_seconds > 0 else 0.0


def refused_flood(env: Infra, service: ServiceProcess, endpoint: Endpoint, total: int,
                  timeout: float, job_id: str = "deadletters-refused") -> Flood:
    """A job whose endpoint answers 400 to everything: how fast it is all dead-lettered."""
    assert service.process is not None and env.kafka.process is not None
    watch = CpuWatch(service.process.pid, env.kafka.process.pid)
    flood = Flood("400 for every message, dead-lettered", total)
    env.kafka.create_topic(dead_letter_topic(job_id), 1)
    reader = DeadLetterReader(env.kafka.bootstrap, dead_letter_topic(job_id))
    try:
        watch.start()
        begin = create_job(service, job_id, f"{endpoint.url}/refuse.{job_id}")
        flood.ended = wait_until(
            lambda: reader.distinct() >= total, time.monotonic() + timeout, service, job_id,
            lambda: f"{time.time() - begin:5.1f} s: {reader.distinct()}/{total} dead-lettered")
        flood.cpu = watch.stop()
        letters = reader.snapshot()
        flood.done = len({letter.message_id for letter in letters})
        if letters:
            first_ms = min(letter.kafka_ms for letter in letters)
            last_ms = max(letter.kafka_ms for letter in letters)
            flood.seconds = last_ms / 1000 - begin
            flood.steady_seconds = (last_ms - first_ms) / 1000
            seen = max(letter.seen for letter in letters) - begin
            flood.extra.append(f"by when this benchmark's reader had them all: {seen:.2f} s, "
                               f"{flood.done / seen:.0f} messages/s")
            flood.extra.append(f"dead letters read: {len(letters)} ({len(letters) - flood.done} "
                               f"duplicates); statuses {dict(Counter(lt.status for lt in letters))}; "
                               f"a reason: {letters[0].reason[:100]!r}")
        got = endpoint.received(f"refuse.{job_id}")
        if got.requests:
            flood.extra.append(f"the endpoint got {got.requests} requests for {len(got.ids)} ids, "
                               f"the last new one {got.last_new - begin:.2f} s after the job's creation")
        flood.extra.append(f"job status: {counters(service, job_id)}")
        with contextlib.suppress(OSError):
            service.request("DELETE", f"/job/{job_id}", timeout=30)
    finally:
        reader.stop()
    return flood


def accepted_flood(env: Infra, service: ServiceProcess, endpoint: Endpoint, total: int,
                   timeout: float, job_id: str = "deadletters-accepted") -> Flood:
    """The same messages, answered 200: how fast they are all delivered."""
    assert service.process is not None and env.kafka.process is not None
    watch = CpuWatch(service.process.pid, env.kafka.process.pid).start()
    flood = Flood("200 for every message, delivered", total)
    prefix = f"{ACCEPTED}.{job_id}"
    begin = create_job(service, job_id, f"{endpoint.url}/{prefix}")
    flood.ended = wait_until(
        lambda: endpoint.distinct(prefix) >= total, time.monotonic() + timeout, service, job_id,
        lambda: f"{time.time() - begin:5.1f} s: {endpoint.distinct(prefix)}/{total} delivered")
    flood.cpu = watch.stop()
    got = endpoint.received(prefix)
    flood.done = len(got.ids)
    if got.requests:
        flood.seconds = got.last_new - begin
        flood.steady_seconds = got.last_new - got.first
        flood.extra.append(f"the endpoint got {got.requests} requests for {len(got.ids)} ids")
    flood.extra.append(f"job status: {counters(service, job_id)}")
    with contextlib.suppress(OSError):
        service.request("DELETE", f"/job/{job_id}", timeout=30)
    return flood


def show_flood(flood: Flood, target: float | None) -> None:
    """One flood's figures; beside the target when it has one."""
    figure = f"{flood.rate:7.0f} messages/s"
    if target is not None:
        met = flood.rate >= target and flood.done == flood.total
        figure += f"  (target >= {target:.0f}/s) -> {verdict(met)}"
    else:
        figure += "  (for comparison, no target)"
    print(f"  {flood.label}: {flood.done}/{flood.total} in {flood.seconds:.2f} s from the job's "
          f"creation -> {figure}")
    print(f"      first to last: {flood.steady_seconds:.2f} s, {flood.steady_rate:.0f} messages/s; "
          f"ended: {flood.ended}")
    for line in flood.extra:
        print(f"      {line}")
    if flood.cpu is not None:
        print(f"      {flood.cpu.line(flood.total)}")


# --- 2. a crash in the flood ---------------------------------------------------------------


def crash_flood(env: Infra, endpoint: Endpoint, total: int, timeout: float) -> str:
    """SIGKILL the service when about half is dead-lettered, start it again, and check that every
    source id reached the dead-letter topic. The outcome, as a line of the summary."""
    job_id = "deadletters-crash"
    print("\n== 2. a crash in the flood: SIGKILL at about half, then a restart", flush=True)
    env.kafka.create_topic(dead_letter_topic(job_id), 1)
    reader = DeadLetterReader(env.kafka.bootstrap, dead_letter_topic(job_id))
    service: ServiceProcess | None = None
    try:
        started = start_service(env, "service-crash-1", redis_db=1)
        if isinstance(started, str):
            print(f"  NOT RUN: the service did not start ({started})", flush=True)
            return "crash in the flood: NOT RUN (the service did not start)"
        service = started
        assert service.process is not None
        first_pid = service.process.pid
        begin = create_job(service, job_id, f"{endpoint.url}/crash")
        half = total // 2
        ended = wait_until(
            lambda: reader.distinct() >= half, time.monotonic() + timeout, service, job_id,
            lambda: f"{time.time() - begin:5.1f} s: {reader.distinct()}/{total} dead-lettered")
        before_kill = counters(service, job_id)
        at_kill = reader.distinct()
        service.stop(signal.SIGKILL, timeout=10)
        service = None
        killed = time.time()
        sent_at_kill = endpoint.received("crash")
        print(f"  pid {first_pid} killed (SIGKILL) {killed - begin:.2f} s after the job's creation "
              f"({ended}): {at_kill} ids dead-lettered, the endpoint had {sent_at_kill.requests} "
              f"requests for {len(sent_at_kill.ids)} ids; last status before: {before_kill}", flush=True)

        started = start_service(env, "service-crash-2", redis_db=1)
        if isinstance(started, str):
            print(f"  the service did not start again ({started})", flush=True)
            return "crash in the flood: NOT RUN (the service did not start again)"
        service = started
        assert service.process is not None
        restarted = time.time()
        print(f"  started again as pid {service.process.pid} ({restarted - killed:.1f} s after the kill)",
              flush=True)
        ended = wait_until(
            lambda: reader.distinct() >= total, time.monotonic() + timeout, service, job_id,
            lambda: f"{time.time() - restarted:5.1f} s after the restart: "
                    f"{reader.distinct()}/{total} dead-lettered")
        finished = time.time()
        # Let what is still under way (duplicates, redelivered after the crash) come in too.
        quiet_deadline = time.monotonic() + 30
        last_count, last_change = reader.count(), time.monotonic()
        while time.monotonic() < quiet_deadline and time.monotonic() - last_change < 3:
            time.sleep(0.2)
            if reader.count() != last_count:
                last_count, last_change = reader.count(), time.monotonic()
        print(f"  every id dead-lettered {finished - restarted:.2f} s after the restart ({ended}); "
              f"status: {counters(service, job_id)}", flush=True)
    finally:
        if service is not None:
            print(f"  {stop_service(service)}", flush=True)
        reader.stop()

    expected = {message_id(i) for i in range(total)}
    letters = reader.snapshot()
    per_id = Counter(letter.message_id for letter in letters if letter.message_id)
    missing = expected - set(per_id)
    duplicates = sum(per_id.values()) - len(per_id)
    strangers = set(per_id) - expected
    got = endpoint.received("crash")
    endpoint_missing = expected - set(got.ids)
    not_sent = set(per_id) - set(got.ids)
    print(f"  dead letters read: {len(letters)} for {len(per_id)} ids ({reader.unreadable} without a "
          f"readable id, {len(strangers)} with an id not produced)")
    print(f"  missing from the dead-letter topic: {len(missing):6d}  (target 0) -> "
          f"{verdict(not missing)}" + (f"; e.g. {sorted(missing)[:5]}" if missing else ""))
    print(f"  duplicates on the dead-letter topic: {duplicates:5d}  (at least once allows them; "
          f"{sum(1 for n in per_id.values() if n > 1)} ids dead-lettered more than once)")
    print(f"  the endpoint: {got.requests} requests for {len(got.ids)} ids, {len(endpoint_missing)} ids "
          f"never sent, {got.requests - len(got.ids)} sent more than once; "
          f"{len(not_sent)} dead-lettered without being sent")
    return (f"crash in the flood: {len(missing)} ids missing from the dead-letter topic (target 0) -> "
            f"{verdict(not missing)}; {duplicates} duplicates (at least once)")


# --- main ------------------------------------------------------------------------------------


def main() -> None:
    """Parse the options, produce the messages once, run both parts."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=10_000, help="messages to produce (default 10000)")
    parser.add_argument("--timeout", type=float, default=120,
                        help="seconds any one wait may take (default 120)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="refused and accepted floods, in turns, in part 1 (default 2; best counts)")
    parser.add_argument("--quiet", type=float, nargs=2, metavar=("LOAD", "SECONDS"),
                        help="first wait (at most SECONDS) for the 1-minute load average to fall to "
                             "LOAD or below: other work on a shared machine lowers every figure")
    parser.add_argument("--keep-logs", metavar="DIR", type=Path,
                        help="copy the service logs to DIR before the temporary folder goes")
    args = parser.parse_args()
    if args.rounds < 1 or args.messages < 2:
        parser.error("--rounds must be at least 1 and --messages at least 2")
    total = args.messages
    results: list[str] = []
    if args.quiet:
        wanted, patience = args.quiet
        deadline = time.monotonic() + patience
        while os.getloadavg()[0] > wanted and time.monotonic() < deadline:
            print(f"load average {load_text()}: waiting for {wanted} or below", flush=True)
            time.sleep(min(30.0, max(0.0, deadline - time.monotonic())))
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} CPUs, load average {load_text()}; "
          f"service code: {code_under_test()}", flush=True)

    with infra("restconsumer-bench-deadletters-") as env:
        endpoint = Endpoint().start()
        try:
            print(f"endpoint at {endpoint.url}: 200 under /{ACCEPTED}…/, 400 elsewhere; it answers "
                  f"{endpoint_ceiling(endpoint.url):.0f} requests/s to {PARTITIONS} keep-alive "
                  "clients of this process", flush=True)
            env.kafka.create_topic(TOPIC, PARTITIONS)
            begin = time.monotonic()
            produced = produce_messages(env.kafka.bootstrap, total)
            print(f"produced {produced} JSON messages to {TOPIC} ({PARTITIONS} partitions) in "
                  f"{time.monotonic() - begin:.1f} s", flush=True)
            # librdkafka's "coordinator load in progress" lines of a fresh broker go to a file.
            with stderr_to(env.work / "warmup-stderr.log"):
                warmed = warm_up_broker(env.kafka.bootstrap, args.timeout)
            print(warmed, flush=True)

            print("\n== 1. a refused stream (400 for all), and the same stream accepted (200); "
                  f"{args.rounds} round(s) in one service process", flush=True)
            started = start_service(env, "service-1", redis_db=0)
            if isinstance(started, str):
                print(f"  NOT RUN: the service did not start ({started})", flush=True)
            else:
                service: ServiceProcess = started
                refused: list[Flood] = []
                accepted: list[Flood] = []
                try:
                    for r in range(1, args.rounds + 1):
                        print(f"  -- round {r}", flush=True)
                        refused.append(refused_flood(env, service, endpoint, produced, args.timeout,
                                                     job_id=f"deadletters-refused-{r}"))
                        show_flood(refused[-1], TARGET_RATE)
                        accepted.append(accepted_flood(env, service, endpoint, produced, args.timeout,
                                                       job_id=f"deadletters-accepted-{r}"))
                        show_flood(accepted[-1], None)
                        if accepted[-1].rate:
                            print(f"  dead-lettering / delivery, round {r}: "
                                  f"{refused[-1].rate / accepted[-1].rate:.2f}", flush=True)
                finally:
                    print(f"  {stop_service(service)}", flush=True)
                if refused and accepted:
                    best = max(refused, key=lambda f: (f.done, f.rate))
                    best_ok = max(accepted, key=lambda f: (f.done, f.rate))
                    met = best.rate >= TARGET_RATE and best.done == produced
                    results.append(
                        f"refused stream dead-lettered: {best.rate:.0f} messages/s, best of "
                        f"{', '.join(f'{f.rate:.0f}' for f in refused)} (target >= {TARGET_RATE:.0f}/s) "
                        f"-> {verdict(met)}")
                    results.append(
                        f"the same stream delivered (200): {best_ok.rate:.0f} messages/s, best of "
                        f"{', '.join(f'{f.rate:.0f}' for f in accepted)}; dead-lettering / delivery "
                        f"{best.rate / best_ok.rate if best_ok.rate else 0:.2f}")

            results.append(crash_flood(env, endpoint, produced, args.timeout))
        finally:
            endpoint.stop()
            if args.keep_logs is not None:
                args.keep_logs.mkdir(parents=True, exist_ok=True)
                for log in env.work.glob("service-*/*.log"):
                    shutil.copy(log, args.keep_logs / f"{log.parent.name}-{log.name}")
        print("\nsummary:")
        for line in results:
            print(f"  {line}")


if __name__ == "__main__":
    main()
