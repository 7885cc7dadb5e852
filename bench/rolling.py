"""A rolling restart of three instances under load (issue 22, "What it must show" 1 and 2).

Real Kafka (as in the tests), real Redis, three real ``twistd -n restconsumer`` processes
sharing one job: a topic of 12 partitions, ``ordering: "key"``, a loopback endpoint that
answers each request 20 ms after it came. A producer thread sends a steady 500 messages/s
over 60 keys (key ``k{n}`` always to partition ``n % 12``), each message carrying its key,
its per-key sequence number (0, 1, 2 ... in the order produced) and its produce time.
Once the three instances hold 4 partitions each and the steady state has run, each
instance in turn gets SIGTERM, is waited for until it has exited, is started again and
waited for until it is ready (``/health/ready`` 200) and the three hold their shares
again (read from their ``assigned``/``revoked``/``lost`` log lines); then every partition
must deliver again before the next one goes.

Figures, per phase (a message belongs to the phase in which it was *produced*; the restarts
phase begins 1 s before the first SIGTERM, since a message produced just before it may be
held by it, and ends once the last restarted instance's partitions all deliver again):

- latency: the first request's arrival at the endpoint minus the message's produce time
  (same machine, same clock): p50, p99, max, and how many took over 1 s;
- duplicates: requests for a (key, sequence) beyond its first;
- order violations (must be 0): a sequence number of a key delivered for the *first* time
  after a higher one of the same key had been delivered. A redelivery after a restart may
  repeat earlier numbers (at least once): a repeat is a duplicate, never a violation;
- lost (must be 0): produced and acknowledged by Kafka, never delivered;
- the longest gap of a kept partition: for each restart, the partitions that the two other
  instances held when it began and that no instance revoked or lost until the shares were
  back; the longest time between two deliveries of one of them within that window (a
  revocation's drain holds the job's Kafka thread, so fetching of kept partitions may wait
  for it; ``--revoke-grace`` is 2 s here).

Two modes in one run, each with a fresh topic, job and Redis database: the default (no
``--instance-id``: cooperative-sticky rebalancing moves the restarted instance's partitions
to the others and back), and static membership (``--instance-id roll-{1,2,3}``, the same
name again across the restart: nothing moves, the restarted instance's partitions wait for
it). Targets (the cooperative run, during the restarts): max <= 1.5 s, p99 <= 500 ms, at
most 50 of ~18,000 messages over 1 s; each mode's steady state is printed beside as the
baseline. Figures, not a test: nothing fails on a missed target (``tests/test_rolling.py``
runs the same scenario and asserts what must hold: nothing lost, no order violation,
kept partitions never revoked).

    python3 bench/rolling.py                       # both modes (about 4 minutes)
    python3 bench/rolling.py --modes cooperative --steady 5 --gap 0
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from confluent_kafka import KafkaError, Message, Producer  # noqa: E402

from tests.infra.ports import wait_for  # noqa: E402
from tests.infra.service import ServiceProcess  # noqa: E402
from tests.infra.sink import Received, Sink  # noqa: E402

#: Starts one service process with these extra arguments, without waiting for its API.
Start = Callable[[list[str]], ServiceProcess]

TARGET_MAX = 1.5
TARGET_P99 = 0.5
TARGET_OVER_1S = 50
#: Seconds before the first SIGTERM from which a message counts in the restarts phase.
GUARD = 1.0


# --- what was sent and what arrived ----------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """A message Kafka acknowledged."""

    key: str
    seq: int
    ts: float  # produce time, time.time()
    partition: int


@dataclass(frozen=True)
class Delivery:
    """A request as the endpoint received it (``arrived``: time.time() once its body was read)."""

    arrived: float
    key: str
    seq: int
    ts: float
    partition: int
    offset: int


class Recorder:
    """The endpoint's answer: note the request (in arrival order), answer 200 after ``delay``."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.bad = 0
        self._deliveries: list[Delivery] = []
        self._lock = threading.Lock()

    def __call__(self, got: Received) -> tuple[int, dict[str, str], bytes]:
        """Record ``got`` and answer it."""
        now = time.time()
        try:
            data = json.loads(got.body)
            delivery = Delivery(now, str(data["key"]), int(data["seq"]), float(data["ts"]),
                                int(data["p"]), int(data["o"]))
        except (ValueError, KeyError, TypeError):
            with self._lock:
                self.bad += 1
        else:
            with self._lock:
                self._deliveries.append(delivery)
        time.sleep(self.delay)
        return 200, {}, b"ok"

    def deliveries(self) -> list[Delivery]:
        """Every request so far, in the order they arrived."""
        with self._lock:
            return list(self._deliveries)

    def since(self, moment: float) -> set[int]:
        """The partitions delivered at or after ``moment``."""
        with self._lock:
            return {d.partition for d in self._deliveries if d.arrived >= moment}


class SteadyProducer(threading.Thread):
    """Produces ``rate`` messages/s, keys ``k0`` .. ``k{keys-1}`` in turn, key ``k{n}`` to
    partition ``n % partitions``; per key, sequence numbers 0, 1, 2 ... in the order produced."""

    def __init__(self, bootstrap: str, topic: str, *, rate: float, keys: int, partitions: int) -> None:
        super().__init__(name="steady-producer", daemon=True)
        self.topic = topic
        self.rate = rate
        self.keys = keys
        self.partitions = partitions
        self.sent: list[Sent] = []
        self.failed: list[str] = []
        self.produced = 0
        self._halt = threading.Event()
        # Idempotence keeps each partition in the order produced, retries included.
        self._producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 2, "acks": "all",
                                   "enable.idempotence": True})

    def run(self) -> None:
        """Produce until stopped, then wait for every acknowledgement."""
        began = time.monotonic()
        while not self._halt.is_set():
            due = int((time.monotonic() - began) * self.rate) + 1
            while self.produced < due:
                n = self.produced
                key, seq = n % self.keys, n // self.keys
                sent = Sent(f"k{key}", seq, time.time(), key % self.partitions)
                value = json.dumps({"key": sent.key, "seq": seq, "ts": sent.ts}).encode()
                try:
                    self._producer.produce(self.topic, value=value, key=sent.key.encode(),
                                           partition=sent.partition, on_delivery=self._acked(sent))
                except BufferError:
                    self._producer.poll(0.05)
                    continue
                self.produced += 1
            self._producer.poll(0)
            self._halt.wait(0.005)  # pacing
        self._producer.flush(60)

    def _acked(self, sent: Sent) -> Callable[[KafkaError | None, Message], None]:
        def done(error: KafkaError | None, _: Message) -> None:
            if error is None:
                self.sent.append(sent)
            else:
                self.failed.append(f"{sent.key}/{sent.seq}: {error.str()}")
        return done

    def stop(self) -> None:
        """Stop producing; return once every message is acknowledged (or failed)."""
        self._halt.set()
        self.join(90)


# --- what the instances hold, from their logs -------------------------------------------------


def moves(log: str, job_id: str) -> list[tuple[str, set[int]]]:
    """The job's assignment events in a service log, in order: (assigned|revoked|lost, partitions)."""
    found = []
    for how, what in re.findall(rf"job {re.escape(job_id)}: (assigned|revoked|lost) ([^\n]*)", log):
        found.append((how, {int(p) for p in re.findall(r"\[(\d+)\]", what)}))
    return found


def holding(events: Iterable[tuple[str, set[int]]]) -> set[int]:
    """What the events leave held (each cooperative line names only what moved)."""
    held: set[int] = set()
    for how, partitions in events:
        held = held | partitions if how == "assigned" else held - partitions
    return held


def taken_away(events: Iterable[tuple[str, set[int]]]) -> set[int]:
    """Every partition the events revoke or lose."""
    return {p for how, partitions in events if how != "assigned" for p in partitions}


@dataclass
class Other:
    """One of the instances that stayed up through a restart: what it held when the restart
    began and once the shares were back, and what it was revoked (or lost) meanwhile."""

    name: str
    before: set[int]
    after: set[int]
    revoked: set[int]
    revoked_while_away: set[int]  # between SIGTERM and the new process' start


@dataclass
class Restart:
    """One instance's restart: the moments (time.time()) and what moved."""

    slot: int
    began: float  # SIGTERM sent
    exited: float
    ready: float  # the new process answered /health/ready 200
    settled: float  # the three held their shares again
    delivering: float  # every partition had delivered again since
    leaving: set[int]  # what the restarted instance held at SIGTERM
    arrived: set[int]  # what the new process holds once settled
    others: list[Other]

    @property
    def kept(self) -> set[int]:
        """The partitions the others held when it began and nobody revoked or lost until settled."""
        return {p for o in self.others for p in o.before - o.revoked}


@dataclass
class Settings:
    """The scenario's sizes."""

    partitions: int = 12
    keys: int = 60
    rate: float = 500.0
    delay: float = 0.02
    warmup: float = 1.0  # seconds of load first, left out of the figures (a fresh broker's JIT)
    steady: float = 8.0  # seconds of steady load measured before the first restart
    gap: float = 0.0  # bench only: seconds held after each restart once every partition delivers
    tail: float = 2.0  # seconds of load after the last restart
    static: bool = False
    revoke_grace: float = 2.0
    job_id: str = "rolling"
    extra: tuple[str, ...] = ()  # more options for every instance, e.g. --kafka-option K=V
    timeout: float = 60.0  # for each wait


@dataclass
class Outcome:
    """Everything a run saw; the figures are computed from it."""

    settings: Settings
    sent: list[Sent]
    failed: list[str]
    deliveries: list[Delivery]
    bad_requests: int
    restarts: list[Restart]
    load_began: float
    steady_began: float
    restarts_began: float
    restarts_ended: float
    load_ended: float


class Cluster:
    """Three instances of one job; ``slots[i]`` is the process now running as instance i."""

    def __init__(self, start: Start, settings: Settings, count: int = 3) -> None:
        self.start = start
        self.settings = settings
        self.slots: list[ServiceProcess] = []
        self.count = count

    def args(self, slot: int) -> list[str]:
        """The command line options of instance ``slot`` (the same across its restarts)."""
        args = ["--revoke-grace", f"{self.settings.revoke_grace:g}", *self.settings.extra]
        if self.settings.static:
            args += ["--instance-id", f"roll-{slot + 1}"]
        return args

    def launch(self) -> None:
        """Start every instance at once; return when each is ready."""
        self.slots = [self.start(self.args(slot)) for slot in range(self.count)]
        for service in self.slots:
            wait_for(lambda s=service: ready(s), self.settings.timeout, f"instance on port {service.port}",
                     every=0.2)

    def events(self, service: ServiceProcess) -> list[tuple[str, set[int]]]:
        """The job's assignment events in the service's log so far."""
        return moves(service.log(), self.settings.job_id)

    def settled(self) -> bool:
        """Whether every instance holds its share: none empty, none twice, every partition
        held, the shares within one of each other."""
        shares = [holding(self.events(s)) for s in self.slots]
        held = [p for share in shares for p in share]
        sizes = [len(share) for share in shares]
        return (len(held) == len(set(held)) == self.settings.partitions
                and min(sizes) > 0 and max(sizes) - min(sizes) <= 1)

    def restart(self, slot: int, recorder: Recorder) -> Restart:
        """SIGTERM instance ``slot``, wait for its end, start it again; return once it is ready,
        the shares are back and every partition has delivered again."""
        timeout = self.settings.timeout
        old = self.slots[slot]
        others = [s for i, s in enumerate(self.slots) if i != slot]
        marks = {id(s): len(s.log()) for s in others}
        before = {id(s): holding(self.events(s)) for s in others}
        leaving = holding(self.events(old))
        began = time.time()
        code = old.stop(signal.SIGTERM, timeout=self.settings.revoke_grace + 20)
        if code not in (0, -signal.SIGTERM):
            raise RuntimeError(f"instance {slot + 1} exited with {code} after SIGTERM:\n{old.log()[-3000:]}")
        exited = time.time()
        away = {id(s): len(s.log()) for s in others}
        new = self.slots[slot] = self.start(self.args(slot))
        wait_for(lambda: ready(new), timeout, f"instance {slot + 1} ready again", every=0.1)
        back = time.time()
        wait_for(self.settled, timeout, "the three shares back", every=0.1)
        settled = time.time()
        wait_for(lambda: len(recorder.since(settled)) == self.settings.partitions, timeout,
                 "every partition delivering again", every=0.05)
        delivering = time.time()
        found = []
        for s in others:
            log = s.log()
            job = self.settings.job_id
            found.append(Other(f"port {s.port}", before[id(s)], holding(moves(log, job)),
                               taken_away(moves(log[marks[id(s)]:], job)),
                               taken_away(moves(log[marks[id(s)]:away[id(s)]], job))))
        return Restart(slot, began, exited, back, settled, delivering, leaving,
                       holding(self.events(new)), found)


def ready(service: ServiceProcess) -> bool:
    """Whether the service answers ``/health/ready`` 200 (an ended process raises)."""
    if service.process is None or service.process.poll() is not None:
        raise RuntimeError(f"the service on port {service.port} ended:\n{service.log()[-3000:]}")
    return service.request("GET", "/health/ready", token=None, timeout=2).status == 200


def job_of(settings: Settings, topic: str, sink: str) -> dict[str, object]:
    """The shared job: one POST per message with its key, sequence, produce time and coordinates."""
    return {"id": settings.job_id, "owner": "ops", "type": "POST", "topic": topic, "ordering": "key",
            "datamap": {"key": "$.msg.key", "seq": "$.msg.seq", "ts": "$.msg.ts",
                        "p": "$.meta.partition", "o": "$.meta.offset"},
            "url": f"{sink}/r/{{key}}", "json_body": ["key", "seq", "ts", "p", "o"]}


def run(start: Start, bootstrap: str, topic: str, settings: Settings,
        say: Callable[[str], None] = print) -> Outcome:
    """The whole scenario on a fresh topic of ``settings.partitions``; its outcome."""
    recorder = Recorder(settings.delay)
    sink = Sink(recorder).start()
    producer: SteadyProducer | None = None
    try:
        cluster = Cluster(start, settings)
        cluster.launch()
        job = job_of(settings, topic, sink.url)
        answer = cluster.slots[0].request("POST", f"/job/{settings.job_id}", job)
        if answer.status != 201:
            raise RuntimeError(f"the job was refused: {answer}")
        wait_for(cluster.settled, settings.timeout, "the job's partitions shared by the three", every=0.2)
        producer = SteadyProducer(bootstrap, topic, rate=settings.rate, keys=settings.keys,
                                  partitions=settings.partitions)
        producer.start()
        load_began = time.time()

        def produced(count: int) -> Callable[[], bool]:
            mark = producer.produced + count  # type: ignore[union-attr]
            return lambda: producer.produced >= mark  # type: ignore[union-attr]

        wait_for(produced(int(settings.warmup * settings.rate)), settings.warmup * 3 + 10,
                 "the warm-up's messages", every=0.05)
        steady_began = time.time()
        wait_for(produced(int(settings.steady * settings.rate)), settings.steady * 3 + 10,
                 "the steady phase's messages", every=0.05)
        say(f"  steady: {len(recorder.deliveries())} delivered of {producer.produced} produced")
        restarts_began = time.time()
        restarts = []
        for slot in range(len(cluster.slots)):
            restart = cluster.restart(slot, recorder)
            restarts.append(restart)
            say(f"  {describe(restart)}")
            if settings.gap and slot < len(cluster.slots) - 1:
                time.sleep(settings.gap)  # bench only: a steady stretch between restarts
        restarts_ended = time.time()
        wait_for(produced(int(settings.tail * settings.rate)), settings.tail * 3 + 10,
                 "the tail's messages", every=0.05)
        producer.stop()
        load_ended = time.time()
        sent = list(producer.sent)

        def all_delivered() -> bool:
            got = {(d.key, d.seq) for d in recorder.deliveries()}
            return all((s.key, s.seq) in got for s in sent)

        with contextlib.suppress(TimeoutError):  # the caller counts what is missing
            wait_for(all_delivered, settings.timeout, "every message delivered", every=0.25)
        return Outcome(settings, sent, list(producer.failed), recorder.deliveries(), recorder.bad, restarts,
                       load_began, steady_began, restarts_began, restarts_ended, load_ended)
    finally:
        if producer is not None and producer.is_alive():
            producer.stop()
        sink.stop()


# --- the figures -------------------------------------------------------------------------------


def order_violations(deliveries: Iterable[Delivery]) -> list[tuple[str, int, int]]:
    """Per key, in arrival order: each (key, seq, higher) where ``seq`` arrived for the first
    time after ``higher`` of the same key had arrived. A repeat of a sequence already
    delivered (a redelivery) is not judged."""
    top: dict[str, int] = {}
    seen: set[tuple[str, int]] = set()
    found = []
    for d in deliveries:
        if (d.key, d.seq) in seen:
            continue
        seen.add((d.key, d.seq))
        highest = top.get(d.key, -1)
        if d.seq < highest:
            found.append((d.key, d.seq, highest))
        else:
            top[d.key] = d.seq
    return found


def lost(sent: Iterable[Sent], deliveries: Iterable[Delivery]) -> list[Sent]:
    """What Kafka acknowledged and no request carried."""
    got = {(d.key, d.seq) for d in deliveries}
    return [s for s in sent if (s.key, s.seq) not in got]


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile ``q`` (0-1) of ``values`` (nan when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class Figures:
    """One phase's figures (latencies in seconds)."""

    name: str
    messages: int
    delivered: int
    duplicates: int
    p50: float
    p99: float
    max: float
    over_1s: int
    kept_gap: float | None = None  # the longest gap of a kept partition (restarts only)
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        """The figures as one printed line."""
        gap = "" if self.kept_gap is None else f", longest kept-partition gap {self.kept_gap * 1000:.0f} ms"
        return (f"{self.name}: {self.messages} messages ({self.delivered} delivered), {self.duplicates} "
                f"duplicates, latency p50 {self.p50 * 1000:.1f} ms, p99 {self.p99 * 1000:.1f} ms, "
                f"max {self.max * 1000:.0f} ms, {self.over_1s} over 1 s{gap}")


def phase(outcome: Outcome, name: str, began: float, ended: float) -> Figures:
    """The figures of the messages produced in [began, ended)."""
    inside = {(s.key, s.seq) for s in outcome.sent if began <= s.ts < ended}
    first: dict[tuple[str, int], Delivery] = {}
    duplicates = 0
    for d in outcome.deliveries:
        ident = (d.key, d.seq)
        if ident not in inside:
            continue
        if ident in first:
            duplicates += 1
        else:
            first[ident] = d
    latencies = [d.arrived - d.ts for d in first.values()]
    return Figures(name, len(inside), len(first), duplicates, percentile(latencies, 0.5),
                   percentile(latencies, 0.99), max(latencies, default=math.nan),
                   sum(1 for v in latencies if v > 1.0))


def kept_gap(outcome: Outcome, restart: Restart) -> float:
    """The longest time between two deliveries of one kept partition during ``restart``
    (from SIGTERM until the shares were back; the last delivery before it counts as a start)."""
    longest = 0.0
    for partition in restart.kept:
        times = sorted(d.arrived for d in outcome.deliveries if d.partition == partition)
        before = [t for t in times if t < restart.began]
        inside = [t for t in times if restart.began <= t <= restart.settled]
        points = before[-1:] + inside + [restart.settled]
        longest = max([longest] + [b - a for a, b in itertools.pairwise(points)])
    return longest


def figures(outcome: Outcome) -> list[Figures]:
    """Steady state (after the warm-up), the restarts, and after them. A message produced in
    the last second before the first SIGTERM counts in the restarts (it may be held by it)."""
    boundary = max(outcome.steady_began, outcome.restarts_began - GUARD)
    steady = phase(outcome, "steady", outcome.steady_began, boundary)
    restarts = phase(outcome, "restarts", boundary, outcome.restarts_ended)
    restarts.kept_gap = max((kept_gap(outcome, r) for r in outcome.restarts), default=0.0)
    after = phase(outcome, "after", outcome.restarts_ended, outcome.load_ended)
    return [steady, restarts, after]


def describe(restart: Restart, outcome: Outcome | None = None) -> str:
    """One restart as a printed line (with the longest kept-partition gap once the outcome is known)."""
    r = restart
    moved = {o.name: sorted(o.revoked) for o in r.others if o.revoked}
    gap = "" if outcome is None else f", longest gap {kept_gap(outcome, r) * 1000:.0f} ms"
    return (f"restart {r.slot + 1}: SIGTERM -> exit {r.exited - r.began:.1f} s, ready "
            f"{r.ready - r.began:.1f} s, shares back {r.settled - r.began:.1f} s, every partition delivering "
            f"{r.delivering - r.began:.1f} s; held {sorted(r.leaving)}, got {sorted(r.arrived)}; revoked "
            f"from the others: {moved or 'none'}; {len(r.kept)} kept{gap}")


def kept_but_revoked(restart: Restart) -> dict[str, set[int]]:
    """Per other instance: partitions it held before and after the restart that were revoked
    (or lost) meanwhile — what cooperative rebalancing must never do."""
    found = {o.name: (o.before & o.after) & o.revoked for o in restart.others}
    return {name: partitions for name, partitions in found.items() if partitions}


def revoked_not_moved(restart: Restart) -> dict[str, set[int]]:
    """Per other instance: partitions revoked from it that did not go to the restarted instance."""
    return {o.name: o.revoked - restart.arrived for o in restart.others if o.revoked - restart.arrived}


# --- the benchmark ------------------------------------------------------------------------------


def main() -> None:
    """Run both modes and print their figures beside the steady state and the targets."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="cooperative,static",
                        help="which runs, in order: cooperative, static (both)")
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="seconds of load before the steady state is measured (10; a fresh broker "
                             "is slow for its first seconds)")
    parser.add_argument("--steady", type=float, default=10.0, help="seconds of steady load measured (10)")
    parser.add_argument("--gap", type=float, default=4.0,
                        help="seconds of load between restarts, once every partition delivers again (4)")
    parser.add_argument("--rate", type=float, default=500.0, help="messages/s (500)")
    parser.add_argument("--revoke-grace", type=float, default=2.0, help="the instances' --revoke-grace (2)")
    parser.add_argument("--kafka-option", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to every instance as --kafka-option (repeatable), e.g. "
                             "heartbeat.interval.ms=500")
    parser.add_argument("--keep-logs", type=Path, default=None, help="copy the service logs there")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"cooperative", "static"}:
        parser.error("--modes takes cooperative and/or static")

    from bench.common import infra, stop_service

    print(f"load average at the start: {', '.join(f'{v:.2f}' for v in os.getloadavg())} "
          f"({os.cpu_count()} cores)", flush=True)
    results: dict[str, tuple[Outcome, list[Figures]]] = {}
    with infra("restconsumer-rolling-") as env:
        for index, mode in enumerate(modes):
            extra = tuple(a for option in args.kafka_option for a in ("--kafka-option", option))
            settings = Settings(warmup=args.warmup, steady=args.steady, gap=args.gap, rate=args.rate,
                                static=mode == "static", revoke_grace=args.revoke_grace,
                                job_id=f"rolling-{mode}", extra=extra)
            topic = f"bench.rolling.{mode}"
            env.kafka.create_topic(topic, settings.partitions)
            redis_url = env.redis.url.rsplit("/", 1)[0] + f"/{index + 1}"
            started: list[ServiceProcess] = []

            def start(extra: list[str], mode: str = mode, redis_url: str = redis_url,
                      started: list[ServiceProcess] = started) -> ServiceProcess:
                service = ServiceProcess(env.work / mode, kafka=env.kafka.bootstrap, redis=redis_url,
                                         args=extra)
                started.append(service)
                return service.start(wait=False)

            print(f"{mode}: three instances{' (--instance-id roll-1..3)' if settings.static else ''}, "
                  f"{settings.partitions} partitions, {settings.rate:.0f} messages/s over "
                  f"{settings.keys} keys, a {settings.delay * 1000:.0f} ms endpoint"
                  + (f", {' '.join(extra)}" if extra else ""), flush=True)
            try:
                outcome = run(start, env.kafka.bootstrap, topic, settings,
                              say=lambda text: print(text, flush=True))
                results[mode] = (outcome, figures(outcome))
            finally:
                for service in started:
                    if service.process is not None:
                        stop_service(service, timeout=30)
                if args.keep_logs is not None:
                    args.keep_logs.mkdir(parents=True, exist_ok=True)
                    for service in started:
                        if service.log_path.exists():
                            shutil.copy(service.log_path, args.keep_logs / f"{mode}-{service.log_path.name}")
    report(results)


def report(results: dict[str, tuple[Outcome, list[Figures]]]) -> None:
    """Print each mode's phases side by side, the targets beside the cooperative restarts."""
    print()
    print("latency: produce -> the request's arrival at the endpoint, first delivery of each message; "
          "a message counts in the phase it was produced in")
    header = (f"{'':24}{'messages':>9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'>1 s':>7}{'dups':>7}"
              f"{'kept gap ms':>13}")
    print(header)
    for mode, (outcome, found) in results.items():
        for f in found:
            gap = "" if f.kept_gap is None else f"{f.kept_gap * 1000:13.0f}"
            print(f"{mode + ' ' + f.name:24}{f.messages:9d}{f.p50 * 1000:9.1f}{f.p99 * 1000:9.1f}"
                  f"{f.max * 1000:9.0f}{f.over_1s:7d}{f.duplicates:7d}{gap}")
        problems = []
        if missing := lost(outcome.sent, outcome.deliveries):
            problems.append(f"{len(missing)} LOST")
        if violations := order_violations(outcome.deliveries):
            problems.append(f"{len(violations)} ORDER VIOLATIONS")
        if outcome.failed:
            problems.append(f"{len(outcome.failed)} not acknowledged by Kafka")
        for r in outcome.restarts:
            if moved := kept_but_revoked(r):
                problems.append(f"restart {r.slot + 1}: kept partitions revoked {moved}")
        print(f"{'':24}{len(outcome.sent)} produced, {len(outcome.deliveries)} requests; "
              + ("; ".join(problems) if problems else "nothing lost, 0 order violations"))
        for r in outcome.restarts:
            print(f"{'':24}{describe(r, outcome)}")
    if "cooperative" in results:
        f = results["cooperative"][1][1]

        def verdict(met: bool) -> str:
            return "MET" if met else "NOT MET"

        print()
        print("targets, cooperative run during the restarts:")
        print(f"  max   {f.max:6.2f} s   (target <= {TARGET_MAX} s)    {verdict(f.max <= TARGET_MAX)}")
        print(f"  p99   {f.p99 * 1000:6.0f} ms  (target <= {TARGET_P99 * 1000:.0f} ms)   "
              f"{verdict(f.p99 <= TARGET_P99)}")
        print(f"  >1 s  {f.over_1s:6d} of {f.messages} (target <= {TARGET_OVER_1S} of ~18,000)   "
              f"{verdict(f.over_1s <= TARGET_OVER_1S)}")
    print(f"load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"the machine is shared: figures are as measured")


if __name__ == "__main__":
    main()
