"""Delivery throughput: one service process, ``--workers 2``, and the ceilings, in one run.

Real Kafka (as in the tests), real Redis, nginx answering 200 on loopback (``apt-get install
nginx-light``). Each service run is a fresh service and a new job on a new topic of 4
partitions that gets 100,000 JSON messages, one request per message (5 datamap paths,
``json_body``, ``ordering: partition``: one request at a time per partition, so 4 under way).
Measured side by side:

- the ceiling: a bare Twisted ``Agent`` loop posting the same bodies to the same nginx with the
  same concurrency (4 loops, one request at a time each; ``bench/agent_baseline.py``);
- the same loop through treq (``treq.client.HTTPClient`` over the same ``Agent`` and pool,
  same body producer; ``bench/treq_baseline.py``), so the choice of the hot path stays
  measured;
- one service process (target: at least 0.9 x the bare-Agent ceiling);
- the service with ``--workers 2``: the main process spawns one worker and both consume the
  job's partitions (target: at least 1.3 x one process), on this machine where the broker
  and the sink share the cores;
- CPU seconds per 1,000 messages (requests) of each: for the service, utime + stime of every
  process in its session (the worker is a child of the main process, in its session) from
  ``/proc``, from just before its job is created until its last message is committed.

By default the job is created on the empty topic, the messages are produced once its
consumer group is settled (the status shows each process holding partitions, none twice),
and the rate is taken from the end of producing (a backlog of most of the messages by then)
until every message is committed. With ``--backlog-first`` the messages are produced before
the job is created, as a job started on a backlog sees it (the group then settles while
work is under way); the rate is then taken from the first commit once settled. A run whose
commits make no progress for ``--stall`` seconds is reported as stalled (its service log is
kept) and the others go on.

The machine is shared and noise only ever lowers a rate, so each figure is the best of
several runs taken in turns: ceilings, one process, --workers, ceilings, --workers, one
process, ceilings. The load average and the machine's busy CPU during each service run are
printed with the figures.

    python3 bench/run.py                 # the full run (about five minutes)
    python3 bench/run.py --messages 5000 --baseline-requests 2000 --rounds 1 --ceiling-runs 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import Infra, infra, start_service, stop_service  # noqa: E402

from tests.infra.kafka_io import produce  # noqa: E402
from tests.infra.ports import free_port, wait_for  # noqa: E402
from tests.infra.service import ServiceProcess  # noqa: E402

PARTITIONS = 4
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1
ONE_PROCESS_TARGET = 0.9
WORKERS_TARGET = 1.3
NGINX = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def message(i: int) -> dict[str, object]:
    """One test message: a person as Aether might send it."""
    return {"id": f"person-{i}", "name": f"Person {i}", "age": 20 + i % 60,
            "household": {"id": f"hh-{i // 4}", "size": 1 + i % 5}, "active": i % 3 != 0}


def body(msg: dict[str, object]) -> dict[str, object]:
    """The JSON body the job makes of a message."""
    return {"id": msg["id"], "name": msg["name"], "age": msg["age"],
            "household": msg["household"]["id"], "active": msg["active"]}  # type: ignore[index]


def start_nginx(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """nginx on a free loopback port, answering 200 to everything."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx-light"], check=True, timeout=600)
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX.format(dir=workdir, port=port))
    process = subprocess.Popen([binary, "-c", str(conf), "-p", str(workdir)])
    wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).status == 200,
             10, "nginx")
    return process, port


# --- CPU from /proc ----------------------------------------------------------------------


@dataclass
class Proc:
    """One process as ``/proc/PID/stat`` shows it."""

    pid: int
    ppid: int
    session: int
    cpu: float  # utime + stime, seconds, every thread


def processes() -> list[Proc]:
    """Every live (not zombie) process of the machine."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:  # it ended meanwhile
            continue
        # The name is in parentheses and may itself hold spaces or parentheses; after it,
        # rest[0] is field 3 (state), [1] ppid, [3] session, [11] utime, [12] stime.
        rest = text[text.rindex(")") + 2:].split()
        if rest[0] == "Z":
            continue
        found.append(Proc(int(entry), int(rest[1]), int(rest[3]),
                          (int(rest[11]) + int(rest[12])) / CLOCK_TICKS))
    return found


def session_of(leader: int, procs: list[Proc]) -> list[Proc]:
    """The processes of the session that ``leader`` started (the service and its workers)."""
    return [p for p in procs if p.session == leader]


def tree_of(root: int, procs: list[Proc]) -> list[Proc]:
    """``root`` and its descendants (nginx's master and worker)."""
    children: dict[int, list[Proc]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    found = [p for p in procs if p.pid == root]
    for p in found:
        found.extend(children.get(p.pid, []))
    return found


def machine_busy() -> tuple[float, float]:
    """Seconds of CPU the whole machine spent busy, and in all, over all cores (/proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    # user nice system idle iowait irq softirq steal
    total = sum(ticks)
    return (total - ticks[3] - ticks[4]) / CLOCK_TICKS, total / CLOCK_TICKS


@dataclass
class CpuSnapshot:
    """CPU used so far by each party of a service run."""

    service: float
    service_processes: int
    kafka: float
    nginx: float
    harness: float
    busy: float
    total: float
    wall: float

    @classmethod
    def take(cls, leader: int, kafka: int, nginx: int) -> CpuSnapshot:
        """Read them all now."""
        procs = processes()
        service = session_of(leader, procs)
        busy, total = machine_busy()
        return cls(service=sum(p.cpu for p in service), service_processes=len(service),
                   kafka=sum(p.cpu for p in tree_of(kafka, procs)),
                   nginx=sum(p.cpu for p in tree_of(nginx, procs)),
                   harness=time.process_time(), busy=busy, total=total, wall=time.perf_counter())


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` shows them."""
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


# --- the ceilings ----------------------------------------------------------------------------


def ceiling_run(script: str, sink: str, bodies: Path, timeout: float) -> dict[str, Any]:
    """One run of a baseline loop (``agent_baseline.py`` or ``treq_baseline.py``); its figures."""
    result = subprocess.run([sys.executable, str(REPO / "bench" / script), f"{sink}/people/",
                             str(bodies), str(PARTITIONS)],
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{script} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    figures: dict[str, Any] = json.loads(result.stdout)
    if figures["failures"]:
        raise RuntimeError(f"{script}: {figures['failures']} requests were not answered 200")
    return figures


# --- the service -----------------------------------------------------------------------------


@dataclass
class ServiceRun:
    """What one service run measured."""

    workers: int
    rate: float | None  # messages/s over the window; None when the run stalled
    window: int  # messages committed within the window (committed in all, when stalled)
    requests: int  # requests nginx received during the run
    cpu_per_1000: float  # CPU seconds of the service's processes per 1,000 messages
    processes: int  # processes in the service's session at the end of the run
    kafka_per_1000: float
    nginx_per_1000: float
    harness_per_1000: float
    busy_cores: float  # the whole machine's busy CPU during the run, in cores
    ours_cores: float  # of which the service, Kafka, nginx and this harness
    load: str
    notes: list[str] = field(default_factory=list)


class Committed:
    """Reads a job's committed offsets with one consumer kept open (creating one per look
    would cost this harness, and so the cores the service shares, far more)."""

    def __init__(self, bootstrap: str, job_id: str, topic: str) -> None:
        from confluent_kafka import Consumer, TopicPartition

        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"restconsumer.{job_id}",
                                   "enable.auto.commit": False})
        self._partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]

    def total(self) -> int | None:
        """Messages committed so far over every partition; None while the broker cannot say
        (a group coordinator still loading answers NOT_COORDINATOR for a moment)."""
        from confluent_kafka import KafkaException

        try:
            offsets = self._consumer.committed(self._partitions, timeout=10)
        except KafkaException:
            return None
        return sum(max(tp.offset, 0) for tp in offsets)

    def close(self) -> None:
        """Close the consumer."""
        self._consumer.close()


def settled(service: ServiceProcess, job_id: str, workers: int) -> bool:
    """Whether the job's status shows ``workers`` processes each holding partitions, every
    partition held once (reports are a second old at most)."""
    try:
        status = service.request("GET", f"/job/{job_id}/status", timeout=5).json
    except (OSError, ValueError):
        return False
    held = [p for instance in status.get("instances", []) for p in instance["partitions"]]
    return (len(status.get("instances", [])) == workers
            and all(instance["partitions"] for instance in status["instances"])
            and len(held) == len(set(held)) == PARTITIONS)


@dataclass
class Options:
    """How the service runs go (from the command line)."""

    messages: int
    backlog_first: bool
    stall: float
    logs: Path
    #: The job's ``max_in_flight``: "auto" (left out, the default) or a number.
    max_in_flight: str = "auto"
    #: Where ``py-spy record`` writes each service run's stacks (None: not profiled).
    profile: Path | None = None


def spy(folder: Path | None, pid: int, name: str) -> subprocess.Popen[bytes] | None:
    """``py-spy record`` on the service's main process until stopped (SIGINT), or None."""
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "-r", "200", "--nonblocking",
                             "--format", "raw", "-o", str(folder / f"{name}.folded")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def job_of(name: str, topic: str, sink: str, max_in_flight: str = "auto") -> dict[str, Any]:
    """The benchmark's job: a person to ``POST /people/{id}``, 5 datamap paths, ``json_body``
    (``max_in_flight`` left out, so "auto", unless a number is given)."""
    job: dict[str, Any] = {"id": name, "owner": "bench", "type": "POST", "topic": topic,
                           "datamap": {"id": "$.msg.id", "name": "$.msg.name", "age": "$.msg.age",
                                       "household": "$.msg.household.id", "active": "$.msg.active"},
                           "url": f"{sink}/people/{{id}}",
                           "json_body": ["id", "name", "age", "household", "active"]}
    if max_in_flight != "auto":
        job["max_in_flight"] = int(max_in_flight)
    return job


def produce_messages(bootstrap: str, topic: str, count: int) -> tuple[int, float]:
    """Produce ``count`` test messages round-robin over the partitions; how many, how long."""
    began = time.perf_counter()
    produced = produce(bootstrap, topic, (json.dumps(message(i)).encode() for i in range(count)),
                       partitions=PARTITIONS)
    return produced, time.perf_counter() - began


def service_run(env: Infra, name: str, workers: int, options: Options, *, sink: str,
                nginx: subprocess.Popen[bytes], access_log: Path, redis_db: int) -> ServiceRun:
    """Start a service (``--workers`` when above 1), run one job on a new topic, stop it."""
    assert env.kafka.process is not None
    topic = f"bench.{name}"
    env.kafka.create_topic(topic, PARTITIONS)
    produced = 0
    if options.backlog_first:
        produced, took = produce_messages(env.kafka.bootstrap, topic, options.messages)
        print(f"  {name}: produced {produced} messages in {took:.1f} s before the job", flush=True)
    args = ["--workers", str(workers)] if workers > 1 else None
    service = start_service(env, name, args=args, redis_db=redis_db)
    if isinstance(service, str):
        raise RuntimeError(f"the service ({name}) did not start: {service}")
    assert service.process is not None
    leader = service.process.pid
    notes: list[str] = []
    committed: Committed | None = None
    keep_log = False
    try:
        wait_for(lambda: len(session_of(leader, processes())) >= workers, 30,
                 f"{workers} processes of the service")
        before_requests = _lines(access_log)
        load = load_average()
        start = CpuSnapshot.take(leader, env.kafka.process.pid, nginx.pid)
        answer = service.request("POST", f"/job/{name}", job_of(name, topic, sink, options.max_in_flight))
        if answer.status != 201:
            raise RuntimeError(f"the job was refused: {answer}")
        committed = Committed(env.kafka.bootstrap, name, topic)
        if not options.backlog_first:
            try:
                wait_for(lambda: settled(service, name, workers), 60, "the job's consumer group to settle",
                         every=0.25)
            except TimeoutError:
                notes.append("the group had not settled 60 s after the job was created")
            produced, took = produce_messages(env.kafka.bootstrap, topic, options.messages)
            print(f"  {name}: produced {produced} messages in {took:.1f} s", flush=True)
        profiler = spy(options.profile, leader, name)
        deadline = time.monotonic() + max(120.0, produced / 200)
        first: tuple[float, int] | None = None  # the first commit seen
        steady: tuple[float, int] | None = None  # the first commit seen once settled
        progress = (time.monotonic(), -1)  # when the committed count last moved, and to what
        next_status = 0.0
        stalled = False
        while True:
            now, known = time.perf_counter(), committed.total()
            done = known or 0
            if known is not None and done >= produced:
                break
            if done > 0 and first is None:
                first = (now, done)
            if done > 0 and steady is None and now >= next_status:
                if settled(service, name, workers):
                    steady = (now, done)
                next_status = now + 0.25
            if done != progress[1]:
                progress = (time.monotonic(), done)
            elif time.monotonic() - progress[0] > options.stall:
                stalled = True
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: {done} of {produced} messages committed after "
                                   f"{max(120.0, produced / 200):.0f} s")
            time.sleep(0.05 if steady is None else 0.1)
        end = CpuSnapshot.take(leader, env.kafka.process.pid, nginx.pid)
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(30)
        rate: float | None = None
        window = done
        if stalled:
            keep_log = True
            notes.append(f"STALLED: {done} of {produced} committed, none more for {options.stall:.0f} s; "
                         f"{stall_detail(service, name)}")
        else:
            if steady is None:
                notes.append("the group never showed settled before the end; rate from the first commit")
                steady = first or (now, 0)
            rate, window = (produced - steady[1]) / max(now - steady[0], 1e-9), produced - steady[1]
        if end.service_processes != workers:
            notes.append(f"{end.service_processes} processes at the end, not {workers}")
        answer = service.request("POST", f"/job/{name}/stop")
        if answer.status != 200:
            notes.append(f"stopping the job answered {answer.status}")
        thousands = max(done, 1) / 1000
        return ServiceRun(
            workers=workers, rate=rate, window=window,
            requests=_lines(access_log) - before_requests,
            cpu_per_1000=(end.service - start.service) / thousands, processes=end.service_processes,
            kafka_per_1000=(end.kafka - start.kafka) / thousands,
            nginx_per_1000=(end.nginx - start.nginx) / thousands,
            harness_per_1000=(end.harness - start.harness) / thousands,
            busy_cores=(end.busy - start.busy) / (end.total - start.total) * CORES,
            ours_cores=sum(getattr(end, k) - getattr(start, k)
                           for k in ("service", "kafka", "nginx", "harness")) / (end.wall - start.wall),
            load=load, notes=notes)
    except BaseException:
        keep_log = True
        raise
    finally:
        if committed is not None:
            committed.close()
        print(f"  {name}: {stop_service(service)}", flush=True)
        try:
            wait_for(lambda: not session_of(leader, processes()), 30, "every process of the service to end")
        except TimeoutError:
            print(f"  {name}: processes of the service still running 30 s after it stopped", flush=True)
        tracebacks = service.log().count("Traceback")
        if tracebacks:
            keep_log = True
            print(f"  {name}: {tracebacks} tracebacks in its log", flush=True)
        if keep_log:
            options.logs.mkdir(parents=True, exist_ok=True)
            kept = options.logs / f"{name}.log"
            shutil.copy(service.log_path, kept)
            print(f"  {name}: its log is kept in {kept}", flush=True)


def stall_detail(service: ServiceProcess, job_id: str) -> str:
    """What the status says of a stalled job: lag per partition, each process' partitions."""
    try:
        status = service.request("GET", f"/job/{job_id}/status", timeout=5).json
    except (OSError, ValueError) as e:
        return f"no status ({e})"
    lag = {p: n for p, n in status.get("lag", {}).items() if n}
    held = ", ".join(f"pid {i['instance'].split(':')[1]}: {' '.join(i['partitions'])}"
                     for i in status.get("instances", []))
    return f"lag {lag}, {held}; bytes held {status.get('bytes_held')}; circuit {status['circuit']['state']}"


def _lines(path: Path) -> int:
    """Lines in a file so far (0 if there is none yet)."""
    if not path.exists():
        return 0
    with path.open("rb") as f:
        return sum(1 for _ in f)


# --- the run ---------------------------------------------------------------------------------


def best(values: list[float | None]) -> float | None:
    """The best of several runs (noise on a shared machine only ever lowers a rate); None
    when no run finished."""
    done = [v for v in values if v is not None]
    return max(done) if done else None


def main() -> None:
    """Run everything in turns and print the figures side by side."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000,
                        help="messages produced for, and delivered by, each service run (100,000)")
    parser.add_argument("--baseline-requests", type=int, default=20_000,
                        help="requests of each ceiling run (20,000)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="service runs of each kind, taken in turns (2; at most 7)")
    parser.add_argument("--ceiling-runs", type=int, default=2,
                        help="runs of each ceiling loop between service runs (2)")
    parser.add_argument("--workers", type=int, default=2,
                        help="the --workers of the service compared with one process (2)")
    parser.add_argument("--backlog-first", action="store_true",
                        help="produce the messages before creating the job (the group settles "
                             "while work is under way)")
    parser.add_argument("--stall", type=float, default=30.0,
                        help="seconds without a commit after which a service run counts as stalled (30)")
    parser.add_argument("--logs", type=Path, default=None,
                        help="where the logs of stalled or failed service runs are kept "
                             "(default: a new /tmp/restconsumer-bench-logs-* folder)")
    parser.add_argument("--max-in-flight", default="auto",
                        help='the job\'s max_in_flight: "auto" (the default, left out) or a number')
    parser.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                        help="record each service run's stacks with py-spy into DIR (raw, collapsed)")
    args = parser.parse_args()
    if args.max_in_flight != "auto" and not args.max_in_flight.isdigit():
        parser.error('--max-in-flight is "auto" or a number')
    if not 1 <= args.rounds <= 7 or args.ceiling_runs < 1 or args.workers < 2 or args.stall <= 0:
        parser.error("--rounds is 1 to 7, --ceiling-runs at least 1, --workers at least 2, "
                     "--stall above 0")
    options = Options(messages=args.messages, backlog_first=args.backlog_first, stall=args.stall,
                      max_in_flight=args.max_in_flight, profile=args.py_spy,
                      logs=args.logs or Path(tempfile.gettempdir()) /
                      f"restconsumer-bench-logs-{time.strftime('%Y%m%d-%H%M%S')}")
    started = time.monotonic()
    print(f"load average at the start: {load_average()} ({CORES} cores)", flush=True)
    with infra("restconsumer-bench-") as env:
        nginx, port = start_nginx(env.work / "nginx")
        try:
            sink = f"http://127.0.0.1:{port}"
            access_log = env.work / "nginx" / "access.log"
            bodies = env.work / "bodies.jsonl"
            with bodies.open("w") as f:
                for i in range(args.baseline_requests):
                    m = message(i)
                    f.write(json.dumps({"id": m["id"], "body": body(m)}) + "\n")
            ceiling_timeout = max(120.0, args.baseline_requests / 100)
            ceilings: dict[str, list[dict[str, Any]]] = {"agent": [], "treq": []}

            def ceiling_turn() -> None:
                for _ in range(args.ceiling_runs):
                    for kind in ("agent", "treq"):
                        run = ceiling_run(f"{kind}_baseline.py", sink, bodies, ceiling_timeout)
                        ceilings[kind].append(run)
                        print(f"  {kind} loop: {run['per_second']:.0f} requests/s, "
                              f"{run['cpu_seconds'] / run['requests'] * 1000:.3f} CPU s/1,000",
                              flush=True)

            runs: dict[int, list[ServiceRun]] = {1: [], args.workers: []}
            ceiling_turn()
            for r in range(args.rounds):
                order = [1, args.workers] if r % 2 == 0 else [args.workers, 1]
                for workers in order:
                    name = f"one-{r + 1}" if workers == 1 else f"workers{workers}-{r + 1}"
                    run = service_run(env, name, workers, options, sink=sink, nginx=nginx,
                                      access_log=access_log, redis_db=2 * r + (workers > 1))
                    runs[workers].append(run)
                    rate = "stalled" if run.rate is None else f"{run.rate:.0f} messages/s"
                    print(f"  {name}: {rate}, {run.cpu_per_1000:.3f} CPU s/1,000 "
                          f"({run.processes} processes), load {run.load}", flush=True)
                ceiling_turn()
        finally:
            nginx.terminate()
            try:
                nginx.wait(20)
            except subprocess.TimeoutExpired:
                nginx.kill()
                nginx.wait(10)
    report(args, ceilings, runs, time.monotonic() - started)


def report(args: argparse.Namespace, ceilings: dict[str, list[dict[str, Any]]],
           runs: dict[int, list[ServiceRun]], took: float) -> None:
    """Print the figures side by side."""
    def per_1000(run: dict[str, Any]) -> float:
        return run["cpu_seconds"] / run["requests"] * 1000

    def rates(values: list[float | None]) -> str:
        return ", ".join("stalled" if v is None else f"{v:.0f}" for v in values)

    def cpus(values: list[float]) -> str:
        return ", ".join(f"{v:.3f}" for v in values)

    def ratio(label: str, value: float | None, of: float | None, target: float) -> None:
        if value is None or of is None:
            print(f"{label:32}   n/a (target {target:.2f}): no run finished -> MISSED")
            return
        met = value / of >= target
        print(f"{label:32}{value / of:6.2f} (target {target:.2f}) -> {'MET' if met else 'MISSED'}")

    agent = best([run["per_second"] for run in ceilings["agent"]])
    treq = best([run["per_second"] for run in ceilings["treq"]])
    assert agent is not None and treq is not None
    agent_cpu, treq_cpu = min(map(per_1000, ceilings["agent"])), min(map(per_1000, ceilings["treq"]))
    mode = "produced before the job was created" if args.backlog_first else \
        "produced once the job's group had settled; rate from the end of producing"
    print()
    print(f"{PARTITIONS} partitions, concurrency {PARTITIONS} (one request at a time per partition); "
          f"ceilings: {args.baseline_requests} requests a run; service: {args.messages} JSON messages "
          f"a run ({mode}), 5 datamap paths, json_body, max_in_flight {args.max_in_flight}. "
          f"Rate: the best run; CPU s/1,000: the lowest "
          f"run; every run in brackets.")
    print(f"{'':34}{'rate /s':>9}  {'CPU s/1,000':>11}")
    print(f"{'bare Agent loop (ceiling)':34}{agent:9.0f}  {agent_cpu:11.3f}"
          f"   runs ({rates([r['per_second'] for r in ceilings['agent']])})"
          f" cpu ({cpus([per_1000(r) for r in ceilings['agent']])})")
    print(f"{'treq over the same Agent and pool':34}{treq:9.0f}  {treq_cpu:11.3f}"
          f"   runs ({rates([r['per_second'] for r in ceilings['treq']])})"
          f" cpu ({cpus([per_1000(r) for r in ceilings['treq']])})")
    for workers, label in ((1, "restconsumer, one process"),
                           (args.workers, f"restconsumer, --workers {args.workers}")):
        done = runs[workers]
        top = best([r.rate for r in done])
        finished = [r.cpu_per_1000 for r in done if r.rate is not None]
        print(f"{label:34}{'stalled' if top is None else f'{top:.0f}':>9}  "
              f"{min(finished) if finished else float('nan'):11.3f}"
              f"   runs ({rates([r.rate for r in done])}) cpu ({cpus([r.cpu_per_1000 for r in done])})")
    one, many = best([r.rate for r in runs[1]]), best([r.rate for r in runs[args.workers]])
    print()
    print(f"{'treq / bare Agent:':32}{treq / agent:6.2f} (rate); {treq_cpu / agent_cpu:.2f} x the CPU "
          f"per request")
    ratio("one process / bare Agent:", one, agent, ONE_PROCESS_TARGET)
    ratio(f"--workers {args.workers} / one process:", many, one, WORKERS_TARGET)
    print()
    print("each service run: rate; messages in the rate window; requests nginx received; CPU s per "
          "1,000 messages of the service / Kafka / nginx / this harness (producing included); the "
          "machine's busy cores (ours of them); load average at the start")
    for workers in (1, args.workers):
        for run in runs[workers]:
            rate = "stalled" if run.rate is None else f"{run.rate:.0f}/s"
            print(f"  --workers {workers}: {rate:>7}; {run.window:6d}; {run.requests:6d}; "
                  f"{run.cpu_per_1000:.3f} / {run.kafka_per_1000:.3f} / {run.nginx_per_1000:.3f} / "
                  f"{run.harness_per_1000:.3f}; {run.busy_cores:.2f} ({run.ours_cores:.2f}) cores; "
                  f"load {run.load}" + "".join(f"; {note}" for note in run.notes))
    print(f"load average at the end: {load_average()}; the whole run took {took / 60:.1f} min")


if __name__ == "__main__":
    main()
