"""Throughput where it matters (issue 10, "What it must show" 1-3; SPEC §11), one run.

Real Kafka (as in the tests, 4 partitions per topic), real Redis, one real
``twistd -n restconsumer`` process driven through its HTTP API, and HTTP sinks that each
run in a process of their own (asyncio, HTTP/1.1 keep-alive, any number of requests under
way at once; they read every body and keep only what the figures need). Figures, not
tests: nothing fails on a missed target; every figure is printed beside its target.

1. **Many in flight, order kept.** A sink that answers each request 50 ms after it came.
   5,000 JSON messages of 500 entities, ``{"entity": "e17", "seq": 3}`` (each entity's
   messages numbered 0, 1, 2 ... in the order they are produced; the entities shuffled
   with a fixed seed). The job posts ``{entity, seq, ts}`` (``ts`` is ``$.meta.timestamp``)
   with ``max_in_flight: 128``:

   - ``ordering: "key"``: the Kafka key is the entity (so the producer's partitioner puts
     an entity's messages in one partition);
   - ``ordering: {"by": "entity"}``: the same messages KEYLESS, the datamap has
     ``entity: $.msg.entity``; the producer picks the partition from the entity
     (``crc32 % 4``), because order groups are per partition (a keyless entity spread
     over partitions has no order anyone could keep);
   - ``ordering: "partition"`` (the default), keyed as for ``"key"``, for comparison;
   - ``key-auto``: ``ordering: "key"`` with ``max_in_flight`` left out, so ``"auto"`` (the
     controller finds the concurrency itself; issue 23's target: >= 0.95 x the ``key`` run's
     ``max_in_flight: 128``, with 0 order violations).

   Messages/s from the first request's arrival to the last one's answer, and order
   violations counted by the sink: the first arrival of each (entity, seq) must come after
   the first arrivals of every lower seq of that entity; an arrival of a lower seq after a
   higher one counts one violation. Repeats (an at-least-once redelivery) are counted
   apart and not judged.
2. **Latency.** A sink answering at once; a job (default ordering) posts ``{i, ts}``. After
   a warm-up, messages are produced at ``--latency-rate`` per second (500) for
   ``--latency-seconds`` (20) with ``linger.ms=0``; latency is the request's arrival at the
   sink (wall clock, same machine) minus the message's CreateTime (ms): p50, p99.
3. **Batch mode.** ``--batch-messages`` (200,000) small messages are produced first; then
   a job with ``batch: {"max_messages": 100}`` and ``json_body`` is created; the sink
   counts the records of each JSON-array body (and distinct ids, so a repeat does not
   count twice). Records/s from the job's creation until all are counted (the target's
   figure), and from the first batch's arrival (steady state) beside it.

Beside each figure: the service's CPU seconds and how busy the machine was (``/proc/stat``,
both cores) during the phase, the sink's peak of requests under way and the connections it
was opened; the load average at the start and the end.

    python3 bench/throughput.py                # the full run (about 3 minutes after start-up)
    python3 bench/throughput.py --smoke        # small sizes, to check it works
    python3 bench/throughput.py --only key,latency --py-spy /tmp/prof   # some phases, profiled
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

PARTITIONS = 4
PHASES = ("key", "key-auto", "by", "partition", "latency", "batch")
ORDERING_PHASES = ("key", "key-auto", "by", "partition")
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
RESPONSE_CLOSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
                  b"Connection: close\r\n\r\nok")
MAX_HEAD = 64 * 1024


# --- the sink (runs in a process of its own: ``throughput.py --sink DELAY``) ----------------


class Bucket:
    """What one sink path (``/<bucket>/...``) received: counts, order, latencies."""

    def __init__(self) -> None:
        self.requests = 0
        self.records = 0
        self.warm = 0
        self.bad = 0
        self.duplicates = 0
        self.violations = 0
        self.ids: set[Any] = set()
        self.top: dict[str, int] = {}
        self.latencies: list[float] = []
        self.first: float | None = None
        self.last: float | None = None
        self.in_flight = 0
        self.peak_in_flight = 0

    def take(self, body: bytes, now: float) -> None:
        """Count one request's body, which arrived (complete) at ``now`` (``time.time()``)."""
        self.requests += 1
        try:
            data = json.loads(body)
        except ValueError:
            self.bad += 1
            return
        if isinstance(data, list):  # a batch: count the records and their distinct ids
            self._arrived(now)
            before = len(self.ids)
            self.ids.update([r.get("i") if isinstance(r, dict) else None for r in data])
            self.records += len(data)
            self.duplicates += len(data) - (len(self.ids) - before)
            return
        if not isinstance(data, dict):
            self.bad += 1
            return
        index = data.get("i")
        if isinstance(index, int) and index < 0:  # a warm-up message: not measured
            self.warm += 1
            return
        self._arrived(now)
        self.records += 1
        entity = data.get("entity")
        ident = (entity, data.get("seq")) if entity is not None else index
        if ident in self.ids:
            self.duplicates += 1
            return
        self.ids.add(ident)
        if entity is not None:
            seq = data.get("seq")
            top = self.top.get(entity)
            if top is not None and isinstance(seq, int) and seq < top:
                self.violations += 1
            else:
                self.top[entity] = seq  # type: ignore[assignment]
        stamp = data.get("ts")
        if isinstance(stamp, (int, float)):
            self.latencies.append(now * 1000 - stamp)

    def _arrived(self, now: float) -> None:
        if self.first is None:
            self.first = now
        self.last = now

    def figures(self, latencies: bool) -> dict[str, Any]:
        """The counts as JSON-ready data (the latencies in ms only when asked)."""
        found = {"requests": self.requests, "records": self.records, "distinct": len(self.ids),
                 "warm": self.warm, "bad": self.bad, "duplicates": self.duplicates,
                 "violations": self.violations, "first": self.first, "last": self.last,
                 "peak_in_flight": self.peak_in_flight}
        if latencies:
            found["latencies"] = self.latencies
        return found


class SinkState:
    """Everything one sink process counts, and how long it waits before answering."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.buckets: dict[str, Bucket] = {}
        self.connections = 0

    def bucket(self, name: str) -> Bucket:
        """The bucket of that name (made on first use)."""
        found = self.buckets.get(name)
        if found is None:
            found = self.buckets[name] = Bucket()
        return found


def _chunked(buffer: bytearray) -> tuple[bytes, int] | None:
    """A complete chunked body at the start of ``buffer``: (body, bytes used), or None."""
    body = bytearray()
    at = 0
    while True:
        end = buffer.find(b"\r\n", at)
        if end < 0:
            return None
        size = int(bytes(buffer[at:end]).split(b";")[0] or b"0", 16)
        at = end + 2
        if size == 0:
            trailer = buffer.find(b"\r\n\r\n", at - 2)
            return (bytes(body), trailer + 4) if trailer >= 0 else None
        if len(buffer) < at + size + 2:
            return None
        body += buffer[at:at + size]
        at += size + 2


class SinkConnection(asyncio.Protocol):
    """One HTTP/1.1 connection: requests one after another, each answered 200 after the delay."""

    def __init__(self, state: SinkState) -> None:
        self.state = state
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.head: tuple[str, int, bool, bool] | None = None  # target, length, chunked, close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Count the connection."""
        self.transport = transport  # type: ignore[assignment]
        self.state.connections += 1

    def data_received(self, data: bytes) -> None:
        """Take every complete request in the buffer."""
        self.buffer += data
        while self.transport is not None and self._one():
            pass

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the transport: delayed answers to it are dropped."""
        self.transport = None

    def _one(self) -> bool:
        buffer = self.buffer
        if self.head is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD and self.transport is not None:
                    self.transport.close()
                return False
            lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
            del buffer[:end + 4]
            target = lines[0].split(" ")[1] if lines[0].count(" ") >= 2 else "/"
            length, chunked, close = 0, False, False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value.strip() or 0)
                elif name == "transfer-encoding":
                    chunked = "chunked" in value.lower()
                elif name == "connection":
                    close = value.strip().lower() == "close"
            self.head = (target, length, chunked, close)
        target, length, chunked, close = self.head
        if chunked:
            found = _chunked(buffer)
            if found is None:
                return False
            body, used = found
        else:
            if len(buffer) < length:
                return False
            body, used = bytes(buffer[:length]), length
        del buffer[:used]
        self.head = None
        self._request(target, body, close)
        return True

    def _request(self, target: str, body: bytes, close: bool) -> None:
        now = time.time()
        path = target.split("?", 1)[0]
        if path.startswith("/_stats/"):
            name = path[len("/_stats/"):]
            self.state.connections -= 1  # a control connection (one request each) is not counted
            found = self.state.bucket(name).figures(latencies="latencies" in target)
            found["connections"] = self.state.connections
            data = json.dumps(found).encode()
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(data) + data)
            self.transport.close()
            return
        bucket = self.state.bucket(path.strip("/").split("/", 1)[0])
        bucket.take(body, now)
        bucket.in_flight += 1
        bucket.peak_in_flight = max(bucket.peak_in_flight, bucket.in_flight)
        if self.state.delay > 0:
            asyncio.get_running_loop().call_later(self.state.delay, self._answer, bucket, close)
        else:
            self._answer(bucket, close)

    def _answer(self, bucket: Bucket, close: bool) -> None:
        bucket.in_flight -= 1
        if self.transport is None:
            return
        self.transport.write(RESPONSE_CLOSE if close else RESPONSE)
        if close:
            self.transport.close()


async def serve_sink(delay: float) -> None:
    """Listen on a free loopback port, print it, answer until standard input closes."""
    loop = asyncio.get_running_loop()
    state = SinkState(delay)
    server = await loop.create_server(lambda: SinkConnection(state), "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    closed = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), lambda: os.read(sys.stdin.fileno(), 4096) or closed.set())
    await closed.wait()
    server.close()


class SinkProcess:
    """A sink in a child process; it ends when its standard input (a pipe from us) closes."""

    def __init__(self, delay: float, log: Path) -> None:
        self.delay = delay
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--sink", str(delay)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 15)
        line = self.process.stdout.readline() if ready else b""
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"the sink did not start (see {log})")
        self.port = int(line)
        self.url = f"http://127.0.0.1:{self.port}"

    def stats(self, bucket: str, latencies: bool = False) -> dict[str, Any]:
        """What the sink counted for ``bucket`` so far."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", f"/_stats/{bucket}" + ("?latencies" if latencies else ""))
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def stop(self) -> None:
        """End the sink: close its input, then SIGTERM, then SIGKILL."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(OSError):
            assert self.process.stdin is not None
            self.process.stdin.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# --- measuring the machine -----------------------------------------------------------------


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs so far, from ``/proc/stat``."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return total - idle, total


def schedstat(pid: int) -> dict[int, tuple[float, float]]:
    """Each live thread of ``pid``: (seconds on a CPU, seconds runnable but waiting for one),
    from ``/proc/PID/task/*/schedstat`` — what a busy machine costs a process."""
    found: dict[int, tuple[float, float]] = {}
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError), \
                    open(f"/proc/{pid}/task/{task}/schedstat") as f:
                fields = f.read().split()
                found[int(task)] = (int(fields[0]) / 1e9, int(fields[1]) / 1e9)
    return found


def load_text() -> str:
    """The load averages (1, 5, 15 minutes) as ``uptime`` shows them."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


@dataclass
class Meter:
    """CPU used by the service, its sink and the whole machine between ``start`` and ``stop``
    (``wall`` seconds)."""

    pid: int
    sink_pid: int
    service_cpu: float = 0.0
    sink_cpu: float = 0.0
    service_waited: float = 0.0
    reactor_waited: float = 0.0
    reactor_cpu: float = 0.0
    machine_busy: float = 0.0
    load_start: str = ""
    load_end: str = ""
    _cpu0: float = 0.0
    _sink0: float = 0.0
    wall: float = 0.0
    _sched0: dict[int, tuple[float, float]] = field(default_factory=dict)
    _ticks0: tuple[int, int] = (0, 0)

    def start(self) -> Meter:
        """Take the starting readings."""
        from common import cpu_seconds

        self.load_start = load_text()
        self._cpu0 = cpu_seconds(self.pid)
        self._sink0 = cpu_seconds(self.sink_pid)
        self._sched0 = schedstat(self.pid)
        self.wall = time.monotonic()
        self._ticks0 = machine_ticks()
        return self

    def stop(self) -> Meter:
        """Take the ending readings."""
        from common import cpu_seconds

        self.wall = time.monotonic() - self.wall
        with contextlib.suppress(OSError):
            self.service_cpu = cpu_seconds(self.pid) - self._cpu0
        with contextlib.suppress(OSError):
            self.sink_cpu = cpu_seconds(self.sink_pid) - self._sink0
        # Per thread, so that a thread that ended meanwhile takes nothing away.
        for tid, (ran, waited) in schedstat(self.pid).items():
            ran0, waited0 = self._sched0.get(tid, (0.0, 0.0))
            self.service_waited += waited - waited0
            if tid == self.pid:
                self.reactor_cpu, self.reactor_waited = ran - ran0, waited - waited0
        busy, total = machine_ticks()
        self.machine_busy = (busy - self._ticks0[0]) / max(1, total - self._ticks0[1])
        self.load_end = load_text()
        return self

    def text(self) -> str:
        """The readings, as printed."""
        seconds = self.wall
        share = self.service_cpu / seconds if seconds > 0 else 0.0
        return (f"service CPU {self.service_cpu:.1f} s ({share:.0%} of one core; the reactor "
                f"thread {self.reactor_cpu:.1f} s); waiting for a CPU: the reactor thread "
                f"{self.reactor_waited:.1f} s of {seconds:.1f} s, all its live threads "
                f"{self.service_waited:.1f} s; sink CPU {self.sink_cpu:.1f} s; machine "
                f"{self.machine_busy:.0%} busy (both cores), load {self.load_start} -> {self.load_end}")


class Profiler:
    """``py-spy record`` on the service for one phase (only with ``--py-spy DIR``): collapsed
    stacks per thread (``DIR/<phase>.folded``; speedscope or ``flamegraph.pl`` draw them)."""

    def __init__(self, folder: Path | None, pid: int, name: str, limit: float) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        self.output = folder / f"{name}.folded"
        with contextlib.suppress(OSError), open(folder / f"{name}.log", "ab") as err:
            self.process = subprocess.Popen(
                ["py-spy", "record", "--pid", str(pid), "-d", str(int(limit) + 1), "-r", "100",
                 "--threads", "--nonblocking", "--format", "raw", "-o", str(self.output)],
                stdout=subprocess.DEVNULL, stderr=err)

    def stop(self) -> None:
        """Stop sampling and let it write what it found."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
            print(f"  py-spy: {self.output}", flush=True)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class ReferenceConsumer:
    """A bare confluent-kafka consumer (a thread of the benchmark) reading the same topic as
    the job: the latency Kafka alone gives on this machine, beside the service's."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from confluent_kafka import Consumer

        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-reference",
                                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
        self.consumer.subscribe([topic])
        self.warm = 0
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reference-consumer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self.consumer.poll(0.2)
            if message is None or message.error() is not None:
                continue
            now = time.time()
            index = json.loads(message.value()).get("i", 0)
            if index < 0:
                self.warm += 1
            else:
                self.latencies.append(now * 1000 - message.timestamp()[1])

    def stop(self) -> None:
        """Stop reading and close the consumer."""
        self._stop.set()
        self._thread.join(10)
        self.consumer.close()


# --- producing -----------------------------------------------------------------------------


def produce(bootstrap: str, topic: str, items: Iterable[tuple[bytes | None, bytes, int]],
            linger_ms: int = 5) -> int:
    """Produce (key, value, partition) items (partition -1: the producer's partitioner picks,
    by key); in order per partition (idempotent); how many were acknowledged."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": linger_ms, "acks": "all",
                         "enable.idempotence": True, "batch.size": 1 << 20,
                         "queue.buffering.max.kbytes": 64 * 1024})
    counts = [0, 0]

    def delivered(err: Any, _msg: Any) -> None:
        counts[0 if err is None else 1] += 1

    for key, value, partition in items:
        while True:
            try:
                producer.produce(topic, value=value, key=key, partition=partition, on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    left = producer.flush(60)
    if counts[1] or left:
        print(f"  producing to {topic}: {counts[1]} failed, {left} not acknowledged", flush=True)
    return counts[0]


def entity_messages(count: int, keys: int, seed: int = 10) -> list[tuple[str, int]]:
    """``count`` (entity, seq) pairs over ``keys`` entities (each as often as the others, to
    one), shuffled with a fixed seed; each entity's seqs count up from 0 in this order."""
    order = [i % keys for i in range(count)]
    random.Random(seed).shuffle(order)
    counters = [0] * keys
    found = []
    for k in order:
        found.append((f"e{k}", counters[k]))
        counters[k] += 1
    return found


# --- the phases ----------------------------------------------------------------------------


@dataclass
class Outcome:
    """The figures of one phase."""

    name: str
    label: str
    wanted: int = 0
    got: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    rate: float = 0.0
    rate_from_create: float = 0.0
    startup: float = 0.0
    complete: bool = False
    meter: Meter | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Bench:
    """The running infrastructure, the service and the sinks, and the phases run on them."""

    def __init__(self, env: Any, service: Any, slow: SinkProcess, fast: SinkProcess,
                 profile: Path | None) -> None:
        self.env = env
        self.service = service
        self.slow = slow
        self.fast = fast
        self.profile = profile
        self.pid: int = service.process.pid

    def create_topic(self, topic: str) -> None:
        """A topic of ``PARTITIONS`` partitions."""
        self.env.kafka.create_topic(topic, PARTITIONS)

    def create_job(self, job: dict[str, Any]) -> str | None:
        """POST the job; what went wrong, if it was not created."""
        answer = self.service.request("POST", f"/job/{job['id']}", job, timeout=30)
        if answer.status != 201:
            return f"POST /job/{job['id']} answered {answer.status}: {answer.body[:400]!r}"
        return None

    def delete_job(self, job_id: str) -> None:
        """Remove the job (it stops on the service)."""
        with contextlib.suppress(OSError):
            self.service.request("DELETE", f"/job/{job_id}", timeout=30)

    def status(self, job_id: str) -> dict[str, Any]:
        """The job's status, or {} when it cannot be had."""
        with contextlib.suppress(OSError, ValueError):
            answer = self.service.request("GET", f"/job/{job_id}/status", timeout=30)
            if answer.status == 200:
                return answer.json
        return {}

    def wait_for(self, sink: SinkProcess, bucket: str, wanted: int, timeout: float,
                 label: str) -> tuple[dict[str, Any], bool]:
        """Poll the sink until ``wanted`` distinct records came (or ``timeout``, or the
        service ended); the last figures, and whether all came."""
        deadline = time.monotonic() + timeout
        report = time.monotonic() + 10
        while True:
            got = sink.stats(bucket)
            if got["distinct"] >= wanted:
                return got, True
            if time.monotonic() >= deadline or self.service.process.poll() is not None:
                return got, False
            if time.monotonic() >= report:
                print(f"  {label}: {got['distinct']}/{wanted} so far", flush=True)
                report += 10
            time.sleep(0.2)

    # -- 1. ordering ----------------------------------------------------------------------

    def ordering(self, name: str, messages: int, keys: int) -> Outcome:
        """Produce the entity messages, run a job with this phase's ordering on the slow sink."""
        ordering: Any = {"key": "key", "key-auto": "key", "by": {"by": "entity"},
                         "partition": "partition"}[name]
        label = json.dumps(ordering) + (' "auto"' if name == "key-auto" else "")
        outcome = Outcome(name, label, wanted=messages)
        print(f"\n== ordering {label}: {messages} messages, {keys} entities, "
              f"{'keyless, partition by crc32(entity)' if name == 'by' else 'key = entity'}", flush=True)
        topic = f"bench.order.{name}"
        self.create_topic(topic)
        items = []
        for entity, seq in entity_messages(messages, keys):
            value = json.dumps({"entity": entity, "seq": seq}).encode()
            if name == "by":
                items.append((None, value, zlib.crc32(entity.encode()) % PARTITIONS))
            else:
                items.append((entity.encode(), value, -1))
        produced = produce(self.env.kafka.bootstrap, topic, items)
        outcome.wanted = produced
        job_id = f"order-{name}"
        job = {"id": job_id, "owner": "bench", "type": "POST", "topic": topic,
               "datamap": {"entity": "$.msg.entity", "seq": "$.msg.seq", "ts": "$.meta.timestamp"},
               "url": f"{self.slow.url}/{name}/", "json_body": ["entity", "seq", "ts"],
               "ordering": ordering, "max_in_flight": 128}
        if name == "key-auto":
            del job["max_in_flight"]
        timeout = 60 + produced / 20  # 20 msg/s at worst: the partition ordering does ~80
        connections = self.slow.stats(name)["connections"]
        meter = Meter(self.pid, self.slow.process.pid).start()
        profiler = Profiler(self.profile, self.pid, f"order-{name}", timeout)
        created = time.time()
        outcome.error = self.create_job(job)
        if outcome.error is None:
            got, outcome.complete = self.wait_for(self.slow, name, produced, timeout, label)
        else:
            got = self.slow.stats(name)
        profiler.stop()
        outcome.meter = meter.stop()
        self._rates(outcome, got, created, self.slow.delay)
        outcome.extra["status"] = self.status(job_id)
        self.delete_job(job_id)
        time.sleep(1)  # let the delayed answers still under way go out before the counts
        outcome.got = self.slow.stats(name)
        outcome.extra["connections"] = outcome.got["connections"] - connections
        print(f"  {outcome.got['distinct']}/{produced} in {outcome.seconds:.1f} s: "
              f"{outcome.rate:.0f} messages/s, {outcome.got['violations']} order violations, "
              f"{outcome.got['duplicates']} repeats; in-flight limit at the end "
              f"{outcome.extra['status'].get('in_flight_limit')}; {meter.text()}", flush=True)
        return outcome

    @staticmethod
    def _rates(outcome: Outcome, got: dict[str, Any], created: float, delay: float) -> None:
        """Rates from the first arrival to the last answer, and from the job's creation."""
        first, last, count = got.get("first"), got.get("last"), got.get("distinct", 0)
        if first is None or last is None:
            return
        outcome.seconds = last + delay - first
        outcome.rate = count / outcome.seconds if outcome.seconds > 0 else 0.0
        outcome.rate_from_create = count / (last + delay - created)
        outcome.startup = first - created

    # -- 2. latency ---------------------------------------------------------------------------

    def latency(self, rate: float, seconds: float) -> Outcome:
        """Warm the job up, produce at ``rate`` for ``seconds`` with linger.ms=0, measure."""
        from confluent_kafka import Producer

        count = int(rate * seconds)
        outcome = Outcome("latency", "latency", wanted=count)
        print(f"\n== latency: {count} messages at {rate:.0f}/s, linger.ms=0, sink answering at once",
              flush=True)
        topic = "bench.latency"
        self.create_topic(topic)
        job_id = "latency"
        job = {"id": job_id, "owner": "bench", "type": "POST", "topic": topic,
               "datamap": {"i": "$.msg.i", "ts": "$.meta.timestamp"},
               "url": f"{self.fast.url}/latency/", "json_body": ["i", "ts"]}
        producer = Producer({"bootstrap.servers": self.env.kafka.bootstrap, "linger.ms": 0,
                             "acks": "all"})
        outcome.error = self.create_job(job)
        if outcome.error is not None:
            outcome.got = self.fast.stats("latency")
            return outcome
        reference = ReferenceConsumer(self.env.kafka.bootstrap, topic)
        try:
            self._latency(outcome, producer, topic, rate, seconds, reference)
        finally:
            reference.stop()
            self.delete_job(job_id)
        return outcome

    def _latency(self, outcome: Outcome, producer: Any, topic: str, rate: float, seconds: float,
                 reference: ReferenceConsumer) -> None:
        """The measured part of :meth:`latency`."""
        count = outcome.wanted
        # Warm-up: one message per partition a round, until a whole round arrives within 3 s
        # (every partition assigned and caught up).
        warm = 0
        deadline = time.monotonic() + 90
        ready = False
        while not ready and time.monotonic() < deadline:
            for p in range(PARTITIONS):
                warm += 1
                producer.produce(topic, json.dumps({"i": -warm}).encode(), partition=p)
            producer.flush(10)
            until = time.monotonic() + 3
            while time.monotonic() < until:
                if self.fast.stats("latency")["warm"] >= warm and reference.warm >= warm:
                    ready = True
                    break
                time.sleep(0.05)
        if not ready:
            outcome.error = "the job did not take the warm-up messages within 90 s"
            outcome.got = self.fast.stats("latency")
            return
        time.sleep(1)
        meter = Meter(self.pid, self.fast.process.pid).start()
        profiler = Profiler(self.profile, self.pid, "latency", seconds + 5)
        begin = time.perf_counter()
        late = 0.0
        for i in range(count):
            due = begin + i / rate
            now = time.perf_counter()
            if due > now:
                time.sleep(due - now)
            else:
                late = max(late, now - due)
            producer.produce(topic, json.dumps({"i": i}).encode(), partition=i % PARTITIONS)
            producer.poll(0)
        produced_in = time.perf_counter() - begin
        producer.flush(10)
        _, outcome.complete = self.wait_for(self.fast, "latency", count, 60, "latency")
        profiler.stop()
        outcome.meter = meter.stop()
        outcome.seconds = produced_in
        outcome.extra["produce_rate"] = count / produced_in
        outcome.extra["producer_late_ms"] = late * 1000
        outcome.got = self.fast.stats("latency", latencies=True)
        outcome.extra["status"] = self.status("latency")
        ref = sorted(reference.latencies)
        if ref:
            outcome.extra.update(ref_p50=percentile(ref, 50), ref_p99=percentile(ref, 99),
                                 ref_measured=len(ref))
        lat = sorted(outcome.got.pop("latencies"))
        if lat:
            outcome.extra.update(p50=percentile(lat, 50), p90=percentile(lat, 90),
                                 p99=percentile(lat, 99), max=lat[-1], mean=sum(lat) / len(lat),
                                 over_50=sum(1 for v in lat if v > 50), measured=len(lat))
            print(f"  {len(lat)} measured: p50 {outcome.extra['p50']:.1f} ms, p90 "
                  f"{outcome.extra['p90']:.1f} ms, p99 {outcome.extra['p99']:.1f} ms, max "
                  f"{lat[-1]:.1f} ms; a bare consumer of the topic: p50 "
                  f"{outcome.extra.get('ref_p50', float('nan')):.1f} ms, p99 "
                  f"{outcome.extra.get('ref_p99', float('nan')):.1f} ms; "
                  f"produced at {outcome.extra['produce_rate']:.0f}/s; "
                  f"{meter.text()}", flush=True)

    # -- 3. batch -----------------------------------------------------------------------------

    def batch(self, messages: int) -> Outcome:
        """Produce ``messages`` first, then create the batched job and time it to the last record."""
        outcome = Outcome("batch", "batch", wanted=messages)
        print(f"\n== batch mode: {messages} messages produced first, batches of 100", flush=True)
        topic = "bench.batch"
        self.create_topic(topic)
        begin = time.monotonic()
        produced = produce(self.env.kafka.bootstrap, topic,
                           ((None, b'{"i": %d, "name": "n%d"}' % (i, i), i % PARTITIONS)
                            for i in range(messages)), linger_ms=20)
        print(f"  produced {produced} in {time.monotonic() - begin:.1f} s", flush=True)
        outcome.wanted = produced
        job_id = "batch"
        job = {"id": job_id, "owner": "bench", "type": "POST", "topic": topic,
               "datamap": {"i": "$.msg.i", "name": "$.msg.name"},
               "url": f"{self.fast.url}/batch/", "json_body": ["i", "name"],
               "batch": {"max_messages": 100}}
        timeout = 60 + produced / 1000
        meter = Meter(self.pid, self.fast.process.pid).start()
        profiler = Profiler(self.profile, self.pid, "batch", timeout)
        created = time.time()
        outcome.error = self.create_job(job)
        if outcome.error is None:
            got, outcome.complete = self.wait_for(self.fast, "batch", produced, timeout, "batch")
        else:
            got = self.fast.stats("batch")
        profiler.stop()
        outcome.meter = meter.stop()
        self._rates(outcome, got, created, 0.0)
        outcome.extra["status"] = self.status(job_id)
        self.delete_job(job_id)
        outcome.got = self.fast.stats("batch")
        print(f"  {outcome.got['distinct']}/{produced} records in {outcome.got['requests']} requests: "
              f"{outcome.rate_from_create:.0f} records/s from the job's creation, "
              f"{outcome.rate:.0f}/s from the first batch; "
              f"{meter.text()}", flush=True)
        return outcome


def percentile(ordered: list[float], p: float) -> float:
    """The ``p``-th percentile of sorted values (nearest rank)."""
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.4999)))
    return ordered[rank - 1]


# --- the report ----------------------------------------------------------------------------


def met(ok: bool) -> str:
    """A verdict, as printed."""
    return "met" if ok else "NOT met"


def code_under_test() -> str:
    """The commit the service ran from, and uncommitted changes to its code, if any."""
    from common import REPO

    def git(*args: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        return ""

    changed = git("status", "--short", "--", "restconsumer").splitlines()
    text = f"commit {git('rev-parse', '--short', 'HEAD') or '?'}"
    if changed:
        text += f" + uncommitted changes to {', '.join(line.split(None, 1)[-1] for line in changed)}"
    return text


def report(outcomes: dict[str, Outcome], args: argparse.Namespace, load_start: str,
           code: str) -> None:
    """Every figure beside its target."""
    print("\n" + "=" * 100)
    print(f"restconsumer throughput, one run ({time.strftime('%Y-%m-%d %H:%M:%S')}), "
          f"{os.cpu_count()} cores; load average at the start {load_start}, at the end {load_text()}")
    print(f"service code: {code}")
    order = [outcomes[n] for n in ORDERING_PHASES if n in outcomes]
    if order:
        print(f"\n1. endpoint answering after 50 ms, {PARTITIONS} partitions, {args.messages} messages, "
              f"{args.keys} entities, max_in_flight 128 (key-auto: \"auto\")")
        print(f"   {'ordering':<18} {'messages/s':>10}  {'target':<16} {'violations':>10}  "
              f"{'target':<12} {'delivered':>11} {'repeats':>7} {'in flight':>9} {'conns':>6} "
              f"{'svc CPU':>8} {'machine':>7}  load (1 min)")
        for o in order:
            if o.error:
                print(f"   {o.label:<18} NOT RUN: {o.error}")
                continue
            g = o.got
            target = "(comparison)" if o.name == "partition" else f">= 1,000 {met(o.rate >= 1000)}"
            if o.name == "key-auto" and "key" in outcomes and outcomes["key"].rate:
                share = o.rate / outcomes["key"].rate
                target = f"{share:.2f}x key {met(share >= 0.95)}"
            vtarget = f"0 {met(g['violations'] == 0)}"
            done = f"{g['distinct']}/{o.wanted}" + ("" if o.complete else "!")
            assert o.meter is not None
            print(f"   {o.label:<18} {o.rate:>10.0f}  {target:<16} {g['violations']:>10}  {vtarget:<12} "
                  f"{done:>11} {g['duplicates']:>7} {g['peak_in_flight']:>9} {o.extra['connections']:>6} "
                  f"{o.meter.service_cpu:>7.1f}s {o.meter.machine_busy:>7.0%}  "
                  f"{o.meter.load_start.split(',')[0]} -> {o.meter.load_end.split(',')[0]}")
        print("   (messages/s from the first request's arrival to the last one's answer; "
              "\"!\" = not all arrived in time)")
        for o in order:
            if not o.error:
                assert o.meter is not None
                print(f"   {o.label}: {o.rate_from_create:.0f} messages/s counting from the job's "
                      f"creation (first request {o.startup:.1f} s after it); "
                      f"{o.meter.text()}")
    lat = outcomes.get("latency")
    if lat is not None:
        print(f"\n2. latency CreateTime -> request at a loopback sink answering at once, "
              f"{args.latency_rate:.0f} msg/s for {args.latency_seconds:.0f} s, linger.ms=0")
        if lat.error or "p50" not in lat.extra:
            print(f"   NOT RUN: {lat.error or 'nothing measured'}")
        else:
            e = lat.extra
            assert lat.meter is not None
            print(f"   p50 {e['p50']:7.1f} ms   target <= 10 ms   {met(e['p50'] <= 10)}")
            print(f"   p99 {e['p99']:7.1f} ms   target <= 50 ms   {met(e['p99'] <= 50)}")
            if "ref_p50" in e:
                print(f"   beside it, Kafka alone (a bare confluent-kafka consumer of the same topic, in "
                      f"the benchmark): p50 {e['ref_p50']:.1f} ms, p99 {e['ref_p99']:.1f} ms")
            print(f"   (p90 {e['p90']:.1f} ms, max {e['max']:.1f} ms, mean {e['mean']:.1f} ms, "
                  f"{e['over_50']} of {e['measured']} over 50 ms; produced at "
                  f"{e['produce_rate']:.0f}/s, the producer at most {e['producer_late_ms']:.0f} ms behind "
                  f"its schedule; {lat.got['duplicates']} repeats"
                  f"{'' if lat.complete else '; NOT ALL ARRIVED'}; {lat.meter.text()})")
    batch = outcomes.get("batch")
    if batch is not None:
        print(f"\n3. batch mode, batches of 100, json_body, {batch.wanted} messages produced first")
        if batch.error:
            print(f"   NOT RUN: {batch.error}")
        else:
            g = batch.got
            assert batch.meter is not None
            print(f"   {batch.rate_from_create:>9.0f} records/s from the job's creation   "
                  f"target >= 25,000   {met(batch.rate_from_create >= 25000)}")
            print(f"   ({batch.rate:.0f} records/s from the first batch's arrival, which came "
                  f"{batch.startup:.1f} s after the job's creation; {g['distinct']}/{batch.wanted} "
                  f"records{'' if batch.complete else ' (NOT ALL)'} in {g['requests']} requests, "
                  f"{g['duplicates']} repeats; "
                  f"{batch.meter.text()})")
    print("=" * 100)


# --- main ----------------------------------------------------------------------------------


def warm_up_groups(env: Any) -> None:
    """Have the fresh broker create its consumer-offsets topic before anything is measured:
    the first consumer group of a new broker waits seconds for it, which no running cluster
    does (the figures "from the job's creation" would otherwise count it)."""
    from confluent_kafka import Consumer

    env.kafka.create_topic("bench.warm-up", 1)
    consumer = Consumer({"bootstrap.servers": env.kafka.bootstrap, "group.id": "bench.warm-up"})
    assigned: list[Any] = []
    consumer.subscribe(["bench.warm-up"], on_assign=lambda c, p: assigned.extend(p))
    began = time.monotonic()
    try:
        while not assigned and time.monotonic() - began < 60:
            consumer.poll(0.2)
    finally:
        consumer.close()
    print(f"broker warmed up: a first consumer group joined in {time.monotonic() - began:.1f} s",
          flush=True)



def main() -> None:
    """Parse the options, start everything, run the phases, print the figures, clean up."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sink", type=float, metavar="DELAY", help=argparse.SUPPRESS)
    parser.add_argument("--messages", type=int, default=5000, help="messages per ordering run (5000)")
    parser.add_argument("--keys", type=int, default=500, help="distinct entities (500)")
    parser.add_argument("--latency-rate", type=float, default=500, help="messages/s produced (500)")
    parser.add_argument("--latency-seconds", type=float, default=20, help="seconds produced (20)")
    parser.add_argument("--batch-messages", type=int, default=200_000,
                        help="messages for batch mode (200,000)")
    parser.add_argument("--only", default=",".join(PHASES),
                        help=f"phases to run, comma-separated, of {','.join(PHASES)} (all)")
    parser.add_argument("--smoke", action="store_true",
                        help="small sizes: 500 messages of 50 entities, 5 s of latency, "
                             "20,000 batched messages")
    parser.add_argument("--quiet", type=float, nargs=2, metavar=("LOAD", "SECONDS"),
                        help="first wait (at most SECONDS) for the 1-minute load average to fall "
                             "to LOAD or below: other work on a shared machine lowers every figure")
    parser.add_argument("--py-spy", type=Path, metavar="DIR",
                        help="record the service's stacks with py-spy per phase into DIR (collapsed)")
    args = parser.parse_args()
    if args.sink is not None:
        asyncio.run(serve_sink(args.sink))
        return
    if args.smoke:
        args.messages, args.keys, args.latency_seconds, args.batch_messages = 500, 50, 5, 20_000
    phases = [p.strip() for p in args.only.split(",") if p.strip()]
    for p in phases:
        if p not in PHASES:
            parser.error(f"--only takes {', '.join(PHASES)}, not {p!r}")

    from common import infra, start_service, stop_service

    if args.quiet:
        wanted, patience = args.quiet
        deadline = time.monotonic() + patience
        while os.getloadavg()[0] > wanted and time.monotonic() < deadline:
            print(f"load average {load_text()}: waiting for {wanted} or below", flush=True)
            time.sleep(min(30.0, max(0.0, deadline - time.monotonic())))
    load_start = load_text()
    code = code_under_test()
    print(f"load average {load_start}; service code: {code}", flush=True)
    outcomes: dict[str, Outcome] = {}
    with infra("restconsumer-bench-throughput-") as env:
        slow = SinkProcess(0.05, env.work / "sink-slow.log")
        fast = SinkProcess(0.0, env.work / "sink-fast.log")
        try:
            started = start_service(env, "service")
            if isinstance(started, str):
                print(f"the service did not start: {started}", flush=True)
                return
            print(f"service pid {started.process.pid}; sinks at {slow.url} (50 ms), "
                  f"{fast.url} (at once)", flush=True)
            warm_up_groups(env)
            bench = Bench(env, started, slow, fast, args.py_spy)
            try:
                for phase in phases:
                    if phase in ORDERING_PHASES:
                        outcomes[phase] = bench.ordering(phase, args.messages, args.keys)
                    elif phase == "latency":
                        outcomes[phase] = bench.latency(args.latency_rate, args.latency_seconds)
                    else:
                        outcomes[phase] = bench.batch(args.batch_messages)
                    if started.process.poll() is not None:
                        print(f"the service ended (code {started.process.returncode}); "
                              f"its log:\n{started.log()[-3000:]}", flush=True)
                        break
            finally:
                problems = [line for line in started.log().splitlines()
                            if " error" in line.lower() or "traceback" in line.lower()]
                if problems:
                    print(f"\nthe service logged {len(problems)} error lines; the last ones:", flush=True)
                    for line in problems[-5:]:
                        print(f"  | {line[:300]}", flush=True)
                print(f"service: {stop_service(started)}", flush=True)
        finally:
            slow.stop()
            fast.stop()
    report(outcomes, args, load_start, code)


if __name__ == "__main__":
    main()
