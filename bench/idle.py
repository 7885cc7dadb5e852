"""CPU, memory and threads of one service process running many jobs that have nothing to do.

Issue 8 "What it must show" point 6: 200 idle jobs on one process use at most 5 % of one
core. Real Kafka (as in the tests), real Redis and a real ``twistd -n restconsumer``
process, driven only through its HTTP API: ``--jobs`` jobs are created (``POST /job/{id}``),
each on a topic of its own that stays empty; once the service reports every one
``running`` (``GET /job/{id}/status``), it settles for ``--settle`` seconds, then the
process' CPU (utime + stime of ``/proc/PID/stat``, as % of one core), RSS and thread
count (``/proc/PID/status``) are measured over ``--measure`` seconds. Before the jobs,
the same figures are taken for ``--baseline`` seconds, for comparison. Then the floor,
measured the same way in the same run: as many bare confluent-kafka consumers (the jobs'
consumer settings, one thread each, polling as a quiet job's loop does) in a process of
their own and nothing else — what librdkafka's own threads cost, which no service built on
one consumer per job can go below. Figures, not a test: nothing fails on a missed target.

    python3 bench/idle.py [--jobs 200] [--measure 30] [--settle 35] [--baseline 10] [--no-floor]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient, NewTopic

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Infra,
    ServiceProcess,
    cpu_seconds,
    infra,
    mib,
    proc_figures,
    start_service,
    stop_service,
    thread_cpu,
    verdict,
)

TARGET_CPU = 5.0  # % of one core
SLICE = 5.0  # seconds: the measurement is also shown in slices this long


def topic(i: int) -> str:
    """The (empty) topic of job ``i``."""
    return f"bench.idle.{i}"


def job_id(i: int) -> str:
    """The id of job ``i``."""
    return f"idle-{i}"


def create_topics(env: Infra, count: int) -> None:
    """One topic of one partition per job, created in a few admin calls."""
    admin = AdminClient({"bootstrap.servers": env.kafka.bootstrap})
    for start in range(0, count, 50):
        new = [NewTopic(topic(i), 1, 1) for i in range(start, min(count, start + 50))]
        for future in admin.create_topics(new).values():
            future.result(60)
    deadline = time.monotonic() + 60
    while True:
        known = admin.list_topics(timeout=10).topics
        if all(topic(i) in known for i in range(count)):
            return
        if time.monotonic() > deadline:
            raise TimeoutError("the jobs' topics were not all created within 60 s")
        time.sleep(0.5)


def job(i: int) -> dict[str, Any]:
    """Job ``i``: reads its own topic, would POST to a port where nothing listens."""
    return {"id": job_id(i), "owner": "bench", "type": "POST", "topic": topic(i),
            "datamap": {"id": "$.msg.id"}, "url": "http://127.0.0.1:9/idle/{id}",
            "json_body": ["id"]}


def bulk_states(service: ServiceProcess, ids: set[str]) -> dict[str, str] | None:
    """Every job's state from one ``GET /jobs/status``, when the service has such a route
    (``/jobs/{owner}`` answers for an owner called "status" otherwise: no states in it)."""
    try:
        answer = service.request("GET", "/jobs/status", timeout=60)
        if answer.status != 200:
            return None
        body = answer.json
    except (OSError, ValueError):
        return None
    if isinstance(body, dict) and isinstance(body.get("jobs"), list | dict):
        body = body["jobs"]
    # A list of statuses with their "id", or an object of statuses by id.
    pairs = body.items() if isinstance(body, dict) else ((None, item) for item in body or [])
    states: dict[str, str] = {}
    for key, item in pairs:
        if isinstance(item, dict) and isinstance(item.get("state"), str):
            found = item.get("id", key)
            if found in ids:
                states[found] = item["state"]
    return states or None


def job_states(service: ServiceProcess, ids: set[str]) -> dict[str, str]:
    """The state of each job in ``ids`` as the service reports it ("?" where it did not answer)."""
    found = bulk_states(service, ids)
    if found is not None:
        return {i: found.get(i, "?") for i in ids}
    states: dict[str, str] = {}
    for i in sorted(ids):
        try:
            answer = service.request("GET", f"/job/{i}/status", timeout=30)
            states[i] = answer.json.get("state", "?") if answer.status == 200 else f"HTTP {answer.status}"
        except (OSError, ValueError):
            states[i] = "?"
    return states


def wait_running(service: ServiceProcess, count: int, timeout: float) -> tuple[int, float]:
    """Wait until every job reports "running"; (how many do, seconds waited)."""
    begin = time.monotonic()
    waiting = {job_id(i) for i in range(count)}
    next_report = begin + 10
    while waiting and time.monotonic() - begin < timeout:
        states = job_states(service, waiting)
        waiting = {i for i, state in states.items() if state != "running"}
        if waiting and time.monotonic() >= next_report:
            tally: dict[str, int] = defaultdict(int)
            for state in states.values():
                tally[state] += 1
            print(f"  {time.monotonic() - begin:5.0f} s: {count - len(waiting)}/{count} running; "
                  f"the others: {dict(tally)}", flush=True)
            next_report += 10
        if waiting:
            time.sleep(1)
    return count - len(waiting), time.monotonic() - begin


@dataclass
class Figures:
    """What one measurement found."""

    seconds: float
    cpu_percent: float
    slices: list[float]
    rss_mib: float
    rss_max_mib: float
    threads: int
    threads_max: int
    busiest: list[tuple[str, int, float]]  # thread name, how many, % of one core


def measure(pid: int, seconds: float) -> Figures:
    """CPU (% of one core), RSS and threads of ``pid`` over ``seconds``."""
    threads_before = thread_cpu(pid)
    begin = time.monotonic()
    cpu_begin = cpu_seconds(pid)
    slices: list[float] = []
    slice_begin, slice_cpu = begin, cpu_begin
    rss: list[int] = []
    threads: list[int] = []
    while True:
        now = time.monotonic()
        figures = proc_figures(pid)
        rss.append(figures.rss_kib)
        threads.append(figures.threads)
        done = now - begin >= seconds
        # A slice ends every SLICE seconds; the last one may be a little short.
        if now - slice_begin >= (SLICE / 2 if done else SLICE):
            cpu = cpu_seconds(pid)
            slices.append(100 * (cpu - slice_cpu) / (now - slice_begin))
            slice_begin, slice_cpu = now, cpu
        if done:
            break
        time.sleep(min(0.5, max(0.0, begin + seconds - now)))
    cpu_end = cpu_seconds(pid)
    elapsed = time.monotonic() - begin
    threads_after = thread_cpu(pid)
    by_name: dict[str, list[float]] = defaultdict(list)
    for tid, (name, cpu) in threads_after.items():
        # The main thread runs the reactor: shown apart from the jobs' Kafka threads.
        label = f"{name} (reactor)" if tid == pid else name
        by_name[label].append(cpu - threads_before.get(tid, (name, 0.0))[1])
    busiest = sorted(((name, len(used), 100 * sum(used) / elapsed) for name, used in by_name.items()),
                     key=lambda row: -row[2])
    total = 100 * (cpu_end - cpu_begin) / elapsed
    # Threads that ended during the measurement (and the odd clock tick).
    rest = max(0.0, total - sum(row[2] for row in busiest))  # stat and schedstat differ a little
    return Figures(elapsed, total, slices, mib(rss[-1]), mib(max(rss)), threads[-1], max(threads),
                   [*busiest[:5], ("other, ended threads", 0, rest)])


def show(title: str, figures: Figures) -> None:
    """Print one measurement."""
    print(f"{title} ({figures.seconds:.0f} s):")
    print(f"  CPU       {figures.cpu_percent:6.1f} % of one core  "
          f"({SLICE:.0f} s slices: {', '.join(f'{s:.1f}' for s in figures.slices)})")
    print(f"  RSS       {figures.rss_mib:6.0f} MB  (max {figures.rss_max_mib:.0f} MB)")
    print(f"  threads   {figures.threads:6d}     (max {figures.threads_max})")
    print("  by thread name: "
          + "; ".join(f"{name}{f' x{n}' if n else ''} {round(cpu, 1) + 0.0:.1f} %"
                    for name, n, cpu in figures.busiest))


def bare_consumers(bootstrap: str, count: int) -> None:
    """The floor (run in a process of its own): ``count`` consumers configured as the
    service's jobs are, each subscribed to one of the jobs' topics and polling in a thread
    of its own as a quiet job's loop does, until standard input closes."""
    import threading

    from confluent_kafka import Consumer

    from restconsumer.kafka.consumer import consumer_config

    stop = threading.Event()
    assigned: list[int] = []

    def run(i: int) -> None:
        consumer = Consumer(consumer_config({"bootstrap.servers": bootstrap}, f"floor-{i}"))
        consumer.subscribe([topic(i)], on_assign=lambda c, p: assigned.append(i))
        while not stop.is_set():
            consumer.consume(num_messages=1, timeout=5.0)
        consumer.close()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    while len(assigned) < count:
        time.sleep(0.2)
    print("assigned", flush=True)
    sys.stdin.read()
    stop.set()
    for t in threads:
        t.join(10)


def measure_floor(env: Infra, count: int, settle: float, seconds: float) -> Figures | None:
    """CPU of ``count`` bare consumers (see :func:`bare_consumers`), measured as the service is."""
    import subprocess

    print(f"\nthe floor: {count} bare consumers, settling {settle:.0f} s, measuring {seconds:.0f} s ...",
          flush=True)
    repo = Path(__file__).resolve().parent.parent
    child = subprocess.Popen([sys.executable, __file__, "--bare", env.kafka.bootstrap, "--jobs", str(count)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(repo)})
    assert child.stdin is not None and child.stdout is not None
    try:
        if child.stdout.readline().strip() != "assigned":
            print("NOT RUN: the bare consumers did not start")
            return None
        time.sleep(settle)
        return measure(child.pid, seconds)
    finally:
        child.stdin.close()
        try:
            child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()


def main() -> None:
    """Parse the options, start the service, create and start the jobs, measure."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200, help="idle jobs to run (default 200)")
    parser.add_argument("--measure", type=float, default=30, help="seconds measured (default 30)")
    parser.add_argument("--settle", type=float, default=35,
                        help="seconds between all running and the measurement (default 35: "
                             "a job's loop polls less often after half a minute of quiet)")
    parser.add_argument("--baseline", type=float, default=10,
                        help="seconds measured before any job exists; 0 skips it (default 10)")
    parser.add_argument("--wait", type=float, default=300,
                        help="longest wait for the jobs to be running (default 300)")
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the floor: as many bare confluent-kafka consumers, nothing else")
    parser.add_argument("--bare", metavar="BOOTSTRAP", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        bare_consumers(args.bare, args.jobs)
        return

    with infra("restconsumer-bench-idle-") as env:
        print(f"creating {args.jobs} topics ...", flush=True)
        create_topics(env, args.jobs)
        started = start_service(env, "service")
        if isinstance(started, str):
            print(f"NOT RUN: the service did not start ({started})")
            return
        service: ServiceProcess = started
        assert service.process is not None
        pid = service.process.pid
        try:
            baseline = None
            if args.baseline > 0:
                time.sleep(2)  # past start-up
                print(f"service pid {pid}; measuring it without jobs for {args.baseline:.0f} s ...",
                      flush=True)
                baseline = measure(pid, args.baseline)
            print(f"creating {args.jobs} jobs ...", flush=True)
            begin = time.monotonic()
            refused = 0
            for i in range(args.jobs):
                answer = service.request("POST", f"/job/{job_id(i)}", job(i), timeout=30)
                if answer.status != 201:
                    refused += 1
                    if refused <= 3:
                        print(f"  POST /job/{job_id(i)} answered {answer.status}: {answer.body[:200]!r}")
            print(f"  {args.jobs - refused} created in {time.monotonic() - begin:.1f} s"
                  + (f", {refused} refused" if refused else ""), flush=True)
            print("waiting until the service reports them running ...", flush=True)
            running, waited = wait_running(service, args.jobs, args.wait)
            print(f"  {running}/{args.jobs} running after {waited:.0f} s", flush=True)
            print(f"settling {args.settle:.0f} s, then measuring {args.measure:.0f} s ...", flush=True)
            time.sleep(args.settle)
            figures = measure(pid, args.measure)
            still = sum(1 for state in job_states(service, {job_id(i) for i in range(args.jobs)}).values()
                        if state == "running")
            print()
            if baseline is not None:
                show("the service without jobs", baseline)
            show(f"the service with {args.jobs} idle jobs ({running} running before, "
                 f"{still} after the measurement)", figures)
            met = figures.cpu_percent <= TARGET_CPU
            print(f"\nidle CPU: {figures.cpu_percent:.1f} % of one core with {args.jobs} jobs "
                  f"(target <= {TARGET_CPU:.0f} %) -> {verdict(met)}; RSS {figures.rss_mib:.0f} MB, "
                  f"{figures.threads} threads")
            if running < args.jobs:
                print(f"note: only {running} of {args.jobs} jobs were running when measured")
        finally:
            print(stop_service(service, timeout=120), flush=True)
        if not args.no_floor:
            floor = measure_floor(env, args.jobs, args.settle, args.measure)
            if floor is not None:
                show(f"the floor: {args.jobs} bare confluent-kafka consumers with the jobs' settings, "
                     f"each polling in a thread of its own, nothing else", floor)
                print(f"\nidle CPU: the service {figures.cpu_percent:.1f} %, librdkafka's floor "
                      f"{floor.cpu_percent:.1f} % (the service above it: "
                      f"{figures.cpu_percent - floor.cpu_percent:+.1f} %) of one core")


if __name__ == "__main__":
    main()
