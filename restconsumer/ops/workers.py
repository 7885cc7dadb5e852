"""``--workers N``: jobs run in N processes on one machine (SPEC §11 "All cores").

The main process spawns N - 1 worker processes of itself (``twistd restconsumer
--worker``). A worker is a whole restconsumer instance minus the API, the jobs folder and
the embedded parts: it runs every job, as a member of each job's consumer group, so Kafka
spreads the partitions over the processes exactly as it does over instances on several
machines, and it reports its counters to Redis like any instance, so status adds up.
Nothing else is shared, so nothing needs a lock across processes. Settings reach a worker
through its environment (never its command line, which others can read), and it stops
when its standard input closes: when the main process ends, however it ends.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import protocol
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.stdio import StandardIO
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["ParentWatch", "WorkerPool", "worker_environment"]

log = Logger()


def worker_environment(options: Any) -> dict[str, str]:
    """The environment that gives a worker the main process's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESTCONSUMER_")}
    env.update({
        "KAFKA_BOOTSTRAP_SERVERS": options["kafka"],
        "REDIS_URL": options["redis"],
        "RESTCONSUMER_MAX_BUFFER_MB": str(options["max-buffer-bytes"] // (1024 * 1024)),
        "RESTCONSUMER_REVOKE_GRACE": repr(options["revoke-grace"]),
        "RESTCONSUMER_RECONCILE_EVERY": repr(options["reconcile-seconds"]),
        "RESTCONSUMER_LOG_FORMAT": options["log-format"],
        # A worker needs no API credentials; this keeps it from generating a token.
        "RESTCONSUMER_API_TOKEN": "worker-has-no-api",
    })
    if options["kafka-options"]:
        env["RESTCONSUMER_KAFKA_OPTIONS"] = "\n".join(
            f"{k}={v}" for k, v in options["kafka-options"].items()) + "\n"
    if options.get("schema-registry"):
        env["RESTCONSUMER_SCHEMA_REGISTRY"] = options["schema-registry"]
        if options.get("schema-registry-options"):
            # In the environment, never on the command line: they may hold credentials.
            env["RESTCONSUMER_SCHEMA_REGISTRY_OPTIONS"] = "\n".join(
                f"{k}={v}" for k, v in options["schema-registry-options"].items()) + "\n"
    if options["ca-file"]:
        env["RESTCONSUMER_CA_FILE"] = options["ca-file"]
    if options.get("instance-id"):
        env["RESTCONSUMER_INSTANCE_ID"] = options["instance-id"]
    if options["allow-hosts"]:
        env["RESTCONSUMER_ALLOW_HOSTS"] = options["allow-hosts"]
    for name in ("log-level",):
        if options.get(name):
            env["RESTCONSUMER_" + name.upper().replace("-", "_")] = str(options[name])
    return env


class _Worker(protocol.ProcessProtocol):
    def __init__(self, pool: WorkerPool, number: int) -> None:
        self.pool = pool
        self.number = number
        self.ended: Deferred[None] = Deferred()

    pid: int | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None  # set by makeConnection before connectionMade
        self.pid = self.transport.pid
        log.info("worker {n} started (pid {pid})", n=self.number, pid=self.pid)

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)
        self.pool.ended(self, reason)


class WorkerPool(Service):
    """Keeps ``count`` worker processes running; stops them when it stops."""

    def __init__(self, reactor: Any, count: int, env: dict[str, str], *,
                 argv: list[str] | None = None, stop_timeout: float = 60.0,
                 on_ended: Callable[[int], None] | None = None) -> None:
        self._reactor = reactor
        self._on_ended = on_ended
        self._count = count
        self._env = env
        self._argv = argv or [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                              "-n", "--pidfile=", "restconsumer", "--worker"]
        self._stop_timeout = stop_timeout
        self._workers: dict[int, _Worker] = {}

    def startService(self) -> None:
        """Spawn the workers."""
        super().startService()
        for number in range(2, self._count + 2):
            self._spawn(number)

    def _spawn(self, number: int) -> None:
        worker = _Worker(self, number)
        self._workers[number] = worker
        # Standard input is a pipe the worker watches; its output is ours.
        env = dict(self._env)
        if "RESTCONSUMER_INSTANCE_ID" in env:
            # Static membership: each process is a member of its own (``{ID}-{n}``).
            env["RESTCONSUMER_INSTANCE_ID"] = f"{env['RESTCONSUMER_INSTANCE_ID']}-{number}"
        self._reactor.spawnProcess(worker, self._argv[0], self._argv, env=env,
                                   childFDs={0: "w", 1: 1, 2: 2})

    def ended(self, worker: _Worker, reason: Failure) -> None:
        """A worker ended: while running, another takes its place after a second."""
        if self._workers.get(worker.number) is worker:
            del self._workers[worker.number]
        if self._on_ended is not None and worker.pid is not None:
            self._on_ended(worker.pid)
        if self.running:
            log.error("worker {n} ended ({reason}); starting it again", n=worker.number,
                      reason=reason.getErrorMessage())

            def respawn() -> None:
                if self.running:
                    self._spawn(worker.number)

            self._reactor.callLater(1.0, respawn)

    def stopService(self) -> Deferred[Any]:
        """Ask every worker to stop (SIGTERM), kill what has not ended in time."""
        super().stopService()
        waiting = []
        for worker in list(self._workers.values()):
            if worker.transport is None:
                continue
            try:
                worker.transport.signalProcess("TERM")
            except Exception:
                continue
            ended = worker.ended
            timer = self._reactor.callLater(self._stop_timeout, _kill, worker)
            ended.addBoth(_cancel_timer, timer)
            waiting.append(ended)
        return DeferredList(waiting) if waiting else succeed(None)


def _cancel_timer(result: Failure | None, timer: IDelayedCall) -> Failure | None:
    if timer.active():
        timer.cancel()
    return result


def _kill(worker: _Worker) -> None:
    log.warn("worker {n} did not stop in time; killing it", n=worker.number)
    if worker.transport is None:
        return
    with contextlib.suppress(Exception):
        worker.transport.signalProcess("KILL")


class _Watch(protocol.Protocol):
    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        log.info("the main process is gone; this worker stops")
        if self._reactor.running:
            self._reactor.stop()


class ParentWatch(Service):
    """In a worker: stop when standard input (the pipe from the main process) closes."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._stdio: StandardIO | None = None

    def startService(self) -> None:
        """Watch standard input."""
        super().startService()
        # twisted.internet.stdio picks its class with platform.isWindows(), which mypy cannot
        # follow: it checks the Windows signature, which has no stdin/stdout.
        self._stdio = StandardIO(_Watch(self._reactor), stdin=0, stdout=os.dup(1),  # type: ignore[call-arg]
                                 reactor=self._reactor)
