"""Peak memory of one service process working through a large backlog with a slow sink.

SPEC §5 "Bounded memory", issue 8 "What it must show" point 2. Real Kafka (as in the
tests), real Redis, a real ``twistd -n restconsumer`` process driven through its HTTP API,
and a slow loopback HTTP sink (threaded; answers 200 after ``--delay`` seconds).

Before any job exists, one topic of 4 partitions is filled with a backlog of ``--backlog-mb``
MiB of 200 KiB JSON messages (``{"id": "m123", "blob": "…"}``) with ``--large`` messages
of 1 MiB spread evenly among them (the topic's ``max.message.bytes`` is raised so that
1 MiB plus overhead fits). Then, for each budget asked for, a fresh service process gets
one job that POSTs every message (id and blob) to the sink; the process' RSS is sampled
(``/proc/PID/status`` VmRSS, and VmHWM at the end) for ``--duration`` seconds or until
every message was delivered. Prints the budget, peak RSS, the target (budget + 150 MB)
and the messages delivered. Figures, not a test: nothing fails on a missed target.

    python3 bench/memory.py                      # default budget, then --max-buffer-mb 64
    python3 bench/memory.py --budget 64          # one run only (repeatable; "default" or MB)
    python3 bench/memory.py --quick              # 100 MiB backlog, 10 large, 30 s per run
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Infra,
    ServiceProcess,
    SlowSink,
    infra,
    mib,
    proc_figures,
    start_service,
    stop_service,
    verdict,
)

PARTITIONS = 4
SMALL = 200 * 1024
LARGE = 1024 * 1024
#: The topic's and the producer's message size limit: a 1 MiB message plus its framing fits.
MAX_MESSAGE = 2 * 1024 * 1024
DEFAULT_BUDGET_MB = 256  # SPEC §5: --max-buffer-mb defaults to 256
HEADROOM_MB = 150  # the target is budget + 150 MB
TOPIC = "bench.memory"


# --- the backlog ---------------------------------------------------------------------------


def is_large(i: int, total: int, large: int) -> bool:
    """Whether message ``i`` of ``total`` is one of the ``large`` 1 MiB ones (spread evenly)."""
    return (i * large) // total != ((i + 1) * large) // total


def backlog(total: int, large: int) -> Iterator[bytes]:
    """The messages: JSON objects of exactly 200 KiB, or 1 MiB for the large ones."""
    filler = base64.b64encode(os.urandom(LARGE))  # JSON-safe text: letters, digits, '+', '/'
    for i in range(total):
        size = LARGE if is_large(i, total, large) else SMALL
        head = b'{"id": "m%d", "blob": "' % i
        tail = b'"}'
        yield head + filler[:size - len(head) - len(tail)] + tail


def create_topic(bootstrap: str) -> None:
    """The backlog's topic: 4 partitions, messages up to ``MAX_MESSAGE`` bytes."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = NewTopic(TOPIC, PARTITIONS, 1, config={"max.message.bytes": str(MAX_MESSAGE)})
    for future in admin.create_topics([topic]).values():
        future.result(30)
    deadline = time.monotonic() + 30
    while len(admin.list_topics(TOPIC, timeout=5).topics[TOPIC].partitions) != PARTITIONS:
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {TOPIC} has not got its {PARTITIONS} partitions")
        time.sleep(0.1)


def produce_backlog(bootstrap: str, total: int, large: int) -> tuple[int, int]:
    """Produce the backlog round-robin over the partitions, fast; (messages, bytes) acknowledged."""
    producer = Producer({
        "bootstrap.servers": bootstrap, "acks": 1, "linger.ms": 100, "batch.size": LARGE,
        "compression.type": "none", "message.max.bytes": MAX_MESSAGE,
        "queue.buffering.max.kbytes": 256 * 1024,  # the benchmark's own memory stays modest
    })
    acked = [0, 0]
    errors: list[str] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is None:
            acked[0] += 1
            acked[1] += len(msg.value())
        elif len(errors) < 5:
            errors.append(str(err))

    for i, value in enumerate(backlog(total, large)):
        while True:
            try:
                producer.produce(TOPIC, value=value, partition=i % PARTITIONS, on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.2)
        producer.poll(0)
    left = producer.flush(120)
    if errors or left:
        print(f"  producing: {total - acked[0]} messages not acknowledged ({left} still queued); "
              f"first errors: {errors}", flush=True)
    return acked[0], acked[1]


# --- one run -------------------------------------------------------------------------------


@dataclass
class Run:
    """The figures of one service process working through the backlog."""

    label: str
    budget_mb: int
    error: str | None = None
    idle_rss_mib: float = 0.0
    peak_rss_mib: float = 0.0
    delivered: int = 0
    seconds: float = 0.0
    ended: str = ""
    status: dict[str, Any] = field(default_factory=dict)

    @property
    def target_mib(self) -> float:
        """Peak RSS allowed: the budget plus 150 MB."""
        return self.budget_mb + HEADROOM_MB


def job(job_id: str, sink: str) -> dict[str, Any]:
    """A job sending every message, id and blob, to the slow sink."""
    return {"id": job_id, "owner": "bench", "type": "POST", "topic": TOPIC,
            "datamap": {"id": "$.msg.id", "blob": "$.msg.blob"},
            "url": f"{sink}/messages/{{id}}", "json_body": ["id", "blob"]}


def status_summary(status: dict[str, Any]) -> str:
    """The parts of a job status worth printing here: counters, lag, anything about bytes held."""
    shown = {key: status[key] for key in ("state", "counters", "total_lag") if key in status}
    for key, value in status.items():
        if key not in shown and any(word in key.lower() for word in ("buffer", "bytes", "held", "memory")):
            shown[key] = value
    return ", ".join(f"{key}={value}" for key, value in shown.items())


def run_one(env: Infra, sink: SlowSink, budget: str, index: int, total: int,
            duration: float) -> Run:
    """Start a service with ``budget`` ("default" or MB), give it the job, sample its memory."""
    budget_mb = DEFAULT_BUDGET_MB if budget == "default" else int(budget)
    label = f"default budget ({DEFAULT_BUDGET_MB} MB)" if budget == "default" else f"--max-buffer-mb {budget}"
    run = Run(label, budget_mb)
    args = [] if budget == "default" else ["--max-buffer-mb", budget]
    print(f"\n== {label}", flush=True)
    started = start_service(env, f"service-{index}", args, redis_db=index)
    if isinstance(started, str):
        first, _, rest = started.partition("\n")
        run.error = f"the service did not start ({first})"
        if "--max-buffer-mb" in first and "not recognized" in first:
            run.error = f"this build has no --max-buffer-mb yet ({first})"
        print(f"  NOT RUN: {run.error}\n{rest}", flush=True)
        return run
    service: ServiceProcess = started
    assert service.process is not None
    pid = service.process.pid
    job_id = f"memory-{index}"
    try:
        run.idle_rss_mib = mib(proc_figures(pid).rss_kib)
        print(f"  service pid {pid} up, RSS {run.idle_rss_mib:.0f} MB before the job", flush=True)
        sink.reset()
        answer = service.request("POST", f"/job/{job_id}", job(job_id, sink.url))
        if answer.status != 201:
            run.error = f"POST /job/{job_id} answered {answer.status}: {answer.body[:300]!r}"
            print(f"  NOT RUN: {run.error}", flush=True)
            return run
        begin = time.monotonic()
        next_report = begin + 10
        peak_kib = 0
        while True:
            now = time.monotonic()
            if service.process.poll() is not None:
                run.ended = f"the service exited with code {service.process.returncode} during the run"
                break
            try:
                figures = proc_figures(pid)
            except OSError:
                continue  # it is ending; poll() says so next time round
            peak_kib = max(peak_kib, figures.rss_kib, figures.hwm_kib)
            if sink.requests >= total:
                run.ended = "every message delivered"
                break
            if now - begin >= duration:
                run.ended = f"stopped after {duration:.0f} s"
                break
            if now >= next_report:
                print(f"  {now - begin:5.0f} s: RSS {mib(figures.rss_kib):6.0f} MB, peak "
                      f"{mib(peak_kib):6.0f} MB, delivered {sink.requests}/{total}", flush=True)
                next_report += 10
            time.sleep(0.2)
        run.seconds = time.monotonic() - begin
        run.delivered = sink.requests
        with contextlib.suppress(OSError):
            peak_kib = max(peak_kib, proc_figures(pid).hwm_kib)
        run.peak_rss_mib = mib(peak_kib)
        if service.process.poll() is None:
            try:
                answer = service.request("GET", f"/job/{job_id}/status", timeout=30)
                if answer.status == 200:
                    run.status = answer.json
            except OSError:
                pass
            with contextlib.suppress(OSError):
                service.request("DELETE", f"/job/{job_id}", timeout=30)
        print(f"  {run.ended}: {run.delivered} delivered in {run.seconds:.0f} s, "
              f"peak RSS {run.peak_rss_mib:.0f} MB", flush=True)
        if run.status:
            print(f"  job status: {status_summary(run.status)}", flush=True)
        return run
    finally:
        print(f"  {stop_service(service)}", flush=True)


def report(runs: list[Run], total: int, produced_mib: float) -> None:
    """The figures of every run, beside their targets."""
    print(f"\nbacklog: {total} messages, {produced_mib:.0f} MiB, {PARTITIONS} partitions; "
          "RSS in MiB (MB below means MiB)")
    print(f"{'run':<28} {'budget':>7} {'peak RSS':>9} {'target':>7} {'delivered':>14}  verdict")
    for run in runs:
        if run.error:
            print(f"{run.label:<28} {run.budget_mb:>4} MB {'-':>9} {run.target_mib:>4.0f} MB "
                  f"{'-':>14}  NOT RUN: {run.error}")
            continue
        met = run.peak_rss_mib <= run.target_mib
        print(f"{run.label:<28} {run.budget_mb:>4} MB {run.peak_rss_mib:>6.0f} MB "
              f"{run.target_mib:>4.0f} MB {f'{run.delivered}/{total}':>14}  {verdict(met)}"
              f" (peak - budget = {run.peak_rss_mib - run.budget_mb:.0f} MB; {run.ended})")


def main() -> None:
    """Parse the options, produce the backlog once, run the service once per budget."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", action="append", metavar="default|MB",
                        help='a budget to run with, "default" (no option) or a --max-buffer-mb '
                             "value; repeatable (default: default and 64)")
    parser.add_argument("--backlog-mb", type=int, default=800,
                        help="MiB of 200 KiB messages in the backlog (default 800)")
    parser.add_argument("--large", type=int, default=100,
                        help="1 MiB messages among them (default 100)")
    parser.add_argument("--duration", type=float, default=90,
                        help="seconds to sample each run, unless all is delivered sooner (default 90)")
    parser.add_argument("--delay", type=float, default=0.15,
                        help="seconds the sink takes to answer each request (default 0.15)")
    parser.add_argument("--quick", action="store_true",
                        help="a quick try: 100 MiB backlog, 10 large messages, 30 s per run")
    args = parser.parse_args()
    if args.quick:
        args.backlog_mb, args.large, args.duration = 100, 10, 30
    budgets: list[str] = args.budget or ["default", "64"]
    for budget in budgets:
        if budget != "default" and not budget.isdigit():
            parser.error(f'--budget takes "default" or a number of MB, not {budget!r}')
    total = args.backlog_mb * 1024 * 1024 // SMALL + args.large

    with infra("restconsumer-bench-memory-") as env:
        create_topic(env.kafka.bootstrap)
        print(f"producing {total} messages ({args.backlog_mb} MiB in 200 KiB, {args.large} of 1 MiB) "
              f"to {TOPIC} ...", flush=True)
        begin = time.monotonic()
        produced, produced_bytes = produce_backlog(env.kafka.bootstrap, total, args.large)
        seconds = time.monotonic() - begin
        print(f"  {produced} messages, {produced_bytes / 2**20:.0f} MiB acknowledged in {seconds:.0f} s "
              f"({produced_bytes / 2**20 / seconds:.0f} MiB/s)", flush=True)
        sink = SlowSink(args.delay).start()
        print(f"slow sink at {sink.url}, {args.delay * 1000:.0f} ms per answer", flush=True)
        runs: list[Run] = []
        try:
            for index, budget in enumerate(budgets):
                runs.append(run_one(env, sink, budget, index, produced, args.duration))
        finally:
            sink.stop()
        report(runs, produced, produced_bytes / 2**20)


if __name__ == "__main__":
    main()
