"""What the resource benchmarks (``bench/memory.py``, ``bench/idle.py``) share.

The real broker, Redis and service come from ``tests/infra`` (as in ``bench/run.py``); this
module adds a temporary work area that cleans up after itself, a slow loopback HTTP sink
that only counts what it receives, and readers of a process' figures in ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.infra.kafka import KafkaBroker  # noqa: E402
from tests.infra.redis import RedisServer  # noqa: E402
from tests.infra.service import ServiceProcess  # noqa: E402

__all__ = ["REPO", "Infra", "ProcFigures", "ServiceProcess", "SlowSink", "cpu_seconds", "infra",
           "mib", "proc_figures", "start_service", "stop_service", "thread_cpu", "verdict"]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def mib(kib: int) -> float:
    """Kibibytes (as /proc gives them) in MiB."""
    return kib / 1024


def verdict(met: bool) -> str:
    """How a figure compares with its target, as printed."""
    return "MET" if met else "NOT MET"


# --- the infrastructure ------------------------------------------------------------------


@dataclass
class Infra:
    """A running broker and Redis, and the temporary folder they (and the service) use."""

    work: Path
    kafka: KafkaBroker
    redis: RedisServer


@contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """Send what this process (C libraries included) writes to standard error to ``path``;
    on an error, print the file's last lines to the real standard error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    except BaseException:
        sys.stderr.flush()
        os.dup2(saved, 2)
        sys.stderr.write("".join(path.read_text(errors="replace").splitlines(True)[-20:]))
        raise
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


@contextmanager
def infra(prefix: str) -> Iterator[Infra]:
    """Start a real Kafka broker and Redis in a fresh temporary folder; stop and remove both."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    kafka = KafkaBroker(work / "kafka")
    redis = RedisServer(work / "redis")
    try:
        print(f"starting Kafka and Redis in {work} ...", flush=True)
        # librdkafka's "connection refused" lines while the broker comes up go to a file.
        with stderr_to(work / "startup-stderr.log"):
            kafka.start()
        redis.start()
        yield Infra(work, kafka, redis)
    finally:
        try:
            redis.stop()
        finally:
            try:
                kafka.stop()
            finally:
                shutil.rmtree(work, ignore_errors=True)


def start_service(env: Infra, name: str, args: list[str] | None = None, redis_db: int = 0,
                  timeout: float = 30) -> ServiceProcess | str:
    """Start ``twistd -n restconsumer`` and wait for its API; if it did not start, what went
    wrong (one line: how it ended and the last line of its log; then the log's last lines).

    ``redis_db`` picks a Redis database of its own, so that a later run does not find (and
    start) an earlier run's jobs.
    """
    redis_url = env.redis.url.rsplit("/", 1)[0] + f"/{redis_db}"
    service = ServiceProcess(env.work / name, kafka=env.kafka.bootstrap, redis=redis_url, args=args)
    service.start(wait=False)
    assert service.process is not None
    deadline = time.monotonic() + timeout
    problem = f"its API did not answer within {timeout:.0f} s"
    while time.monotonic() < deadline:
        code = service.process.poll()
        if code is not None:
            problem = f"it exited with code {code}"
            break
        try:
            service.request("GET", "/health", token=None, timeout=2)
        except OSError:
            time.sleep(0.2)
        else:
            return service
    if service.process is not None and service.process.poll() is None:
        stop_service(service, timeout=20)
    service.process = None
    lines = [line.rstrip() for line in service.log().splitlines() if line.strip()]
    if lines:
        tail = "\n".join("    | " + line for line in lines[-8:])
        return f"{problem}: {lines[-1].strip()}\n  the last lines of its log:\n{tail}"
    return problem


def stop_service(service: ServiceProcess, timeout: float = 60) -> str:
    """Stop the service with SIGTERM (SIGKILL after ``timeout``); how it ended, as printed."""
    pid = service.process.pid if service.process is not None else None
    try:
        code = service.stop(timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"pid {pid} did not stop within {timeout:.0f} s of SIGTERM and was killed"
    if code < 0:  # twistd ends itself with the signal it got, once it has shut down
        return f"pid {pid} stopped, ended by {signal.Signals(-code).name}"
    return f"pid {pid} stopped, exit code {code}"


# --- a slow sink -------------------------------------------------------------------------


class SlowSink:
    """A threaded HTTP/1.1 server on loopback that answers 200 after ``delay`` seconds.

    It reads and discards each body, keeping only counts (so that the benchmark process
    itself does not hold what the service sends).
    """

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.requests = 0
        self.body_bytes = 0
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                left = length
                while left > 0:
                    chunk = self.rfile.read(min(left, 1 << 16))
                    if not chunk:
                        break
                    left -= len(chunk)
                time.sleep(sink.delay)
                with sink._lock:
                    sink.requests += 1
                    sink.body_bytes += length - left
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(b"ok")

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a connection the service closed (it stopped) is no news

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="sink", daemon=True)

    def start(self) -> SlowSink:
        """Start answering."""
        self._thread.start()
        return self

    def reset(self) -> None:
        """Start counting from zero."""
        with self._lock:
            self.requests = 0
            self.body_bytes = 0

    def stop(self) -> None:
        """Stop answering and close the listening socket."""
        self._server.shutdown()
        self._server.server_close()


# --- /proc ---------------------------------------------------------------------------------


@dataclass
class ProcFigures:
    """A process' memory and thread count, from ``/proc/PID/status``."""

    rss_kib: int
    hwm_kib: int
    threads: int


def proc_figures(pid: int) -> ProcFigures:
    """Read VmRSS, VmHWM and Threads of ``pid`` (OSError once it is gone)."""
    fields: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return ProcFigures(int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0]),
                       int(fields["Threads"]))


def _stat_cpu(path: str) -> tuple[str, float]:
    """The command name and utime+stime (seconds) of one ``/proc/…/stat`` file."""
    with open(path) as f:
        text = f.read()
    # The name is in parentheses and may itself hold spaces or parentheses.
    name = text[text.index("(") + 1:text.rindex(")")]
    rest = text[text.rindex(")") + 2:].split()
    # rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    return name, (int(rest[11]) + int(rest[12])) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, every thread) that ``pid`` has used so far."""
    return _stat_cpu(f"/proc/{pid}/stat")[1]


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Each live thread of ``pid``: tid → (thread name, CPU seconds so far).

    From ``schedstat`` (nanoseconds on the CPU) where the kernel has it: ``stat`` counts whole
    clock ticks per thread, and a thousand threads that each wake briefly round to nothing.
    """
    found: dict[int, tuple[str, float]] = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        base = f"/proc/{pid}/task/{task}"
        with contextlib.suppress(OSError, ValueError, IndexError):  # the thread ended meanwhile
            try:
                with open(f"{base}/schedstat") as f:
                    seconds = int(f.read().split()[0]) / 1e9
                with open(f"{base}/comm") as f:
                    name = f.read().strip()
            except FileNotFoundError:
                name, seconds = _stat_cpu(f"{base}/stat")
            found[int(task)] = (name, seconds)
    return found
