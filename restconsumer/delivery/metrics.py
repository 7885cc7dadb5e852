"""Prometheus metrics (SPEC §9), with prometheus-client.

One :class:`Metrics` per process. With ``--workers N`` every process of the service writes
its samples with prometheus-client's multiprocess mode into one folder that the main
process creates, and the main process's ``/metrics`` adds them all up — so the metrics,
like the status, answer for the whole service on this machine. prometheus-client reads
``PROMETHEUS_MULTIPROC_DIR`` when it is first imported, so it is imported here lazily,
once that variable is set (or known to be absent).

Counters count records as the status does; the gauges (lag, bytes held, circuits) are
refreshed from the running jobs every couple of seconds.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.internet import TimerService
from twisted.web.resource import Resource

__all__ = ["CONTENT_TYPE", "MULTIPROC_ENV", "Metrics", "MetricsFlusher", "MetricsResource", "code_class"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Request durations: from a loopback answer (~1 ms) to the default timeout (30 s).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def code_class(status: int | None) -> str:
    """The ``code`` label of an answer: ``2xx`` … ``5xx``, or ``error`` without one."""
    if status is None or not 100 <= status < 600:
        return "error"
    return f"{status // 100}xx"


class Metrics:
    """The service's metric families, in a registry of their own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        registry = CollectorRegistry()
        self._registry = registry
        self.messages = Counter("restconsumer_messages", "Records finished, by outcome "
                                "(delivered, dead_lettered, filtered)", ["job", "outcome"],
                                registry=registry)
        self.requests = Counter("restconsumer_requests", "Requests sent, by answer class "
                                "(2xx..5xx, or error for connection failures and timeouts)",
                                ["job", "code"], registry=registry)
        self.duration = Histogram("restconsumer_request_duration_seconds",
                                  "Time from sending a request to its answer", ["job"],
                                  buckets=BUCKETS, registry=registry)
        self.retries = Counter("restconsumer_retries", "Attempts that will be tried again",
                               ["job"], registry=registry)
        self.lag = Gauge("restconsumer_consumer_lag", "Messages of a partition not yet committed",
                         ["job", "topic", "partition"], registry=registry,
                         multiprocess_mode="livemostrecent")
        self.buffered = Gauge("restconsumer_buffered_bytes", "Bytes held of messages fetched but "
                              "not finished (pre-fetch reservations included)", registry=registry,
                              multiprocess_mode="livesum")
        self.oldest = Gauge("restconsumer_oldest_unfinished_seconds", "Seconds the oldest "
                            "unfinished message of a partition has waited (0: none)",
                            ["job", "topic", "partition"], registry=registry,
                            multiprocess_mode="livemostrecent")
        self.circuit = Gauge("restconsumer_circuit_open", "1 while the job's circuit is open",
                             ["job"], registry=registry, multiprocess_mode="livemax")
        self.in_flight_limit = Gauge("restconsumer_in_flight_limit", "The job's bound on requests "
                                     "under way now (found by the job with max_in_flight \"auto\")",
                                     ["job"], registry=registry, multiprocess_mode="livesum")
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        # Counted per request at thousands a second, so kept here and written to
        # prometheus-client's families in one go (flush): its locked calls, three per
        # request, cost more than the request's own bookkeeping.
        self._answers: list[tuple[str, int | None, float]] = []
        self._outcomes: dict[tuple[str, str], int] = {}
        self._lag_labels: set[tuple[str, str, str]] = set()
        self._oldest_labels: set[tuple[str, str, str]] = set()
        self._circuit_labels: set[str] = set()

    def _child(self, family: Any, *labels: str) -> Any:
        # labels() takes a lock and builds a key each time: this is on every request.
        key = (id(family), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*labels)
        return child

    def delivered(self, job: str, n: int = 1) -> None:
        """Count delivered records."""
        key = (job, "delivered")
        self._outcomes[key] = self._outcomes.get(key, 0) + n

    def dead_lettered(self, job: str, n: int = 1) -> None:
        """Count dead-lettered records (acknowledged by Kafka)."""
        self._child(self.messages, job, "dead_lettered").inc(n)

    def filtered(self, job: str, n: int = 1) -> None:
        """Count records a filter left out."""
        self._child(self.messages, job, "filtered").inc(n)

    def answered(self, job: str, status: int | None, seconds: float) -> None:
        """Count one request and its duration."""
        self._answers.append((job, status, seconds))
        if len(self._answers) >= 10_000:
            self.flush()

    def flush(self) -> None:
        """Write what was counted since the last flush to the metric families (done before
        each exposition, and every quarter of a second: see :class:`MetricsFlusher`)."""
        answers, self._answers = self._answers, []
        outcomes, self._outcomes = self._outcomes, {}
        by_code: dict[tuple[str, str], int] = {}
        for job, status, seconds in answers:
            key = (job, code_class(status))
            by_code[key] = by_code.get(key, 0) + 1
            self._child(self.duration, job).observe(seconds)
        for (job, code), n in by_code.items():
            self._child(self.requests, job, code).inc(n)
        for (job, outcome), n in outcomes.items():
            self._child(self.messages, job, outcome).inc(n)

    def retried(self, job: str) -> None:
        """Count one retry."""
        self._child(self.retries, job).inc()

    def refresh(self, runners: dict[str, Any], held: int) -> None:
        """Set the gauges from the running jobs: lag and the oldest unfinished message per
        partition, bytes held, circuits, concurrency limits."""
        self.buffered.set(held)
        lag_labels = set()
        oldest_labels = set()
        circuits = set()
        for job_id, runner in runners.items():
            for (topic, partition), lag in list(runner.loop.lag.items()):
                labels = (job_id, topic, str(partition))
                self.lag.labels(*labels).set(lag)
                lag_labels.add(labels)
            ages = runner.oldest_unfinished()
            for tp in list(runner.loop.assignment):
                labels = (job_id, tp[0], str(tp[1]))
                self.oldest.labels(*labels).set(round(ages.get(tp, 0.0), 3))
                oldest_labels.add(labels)
            self.circuit.labels(job_id).set(1 if runner.held else 0)
            self.in_flight_limit.labels(job_id).set(runner.in_flight_limit)
            circuits.add(job_id)
        for labels in self._lag_labels - lag_labels:
            self._forget(self.lag, labels)
        for labels in self._oldest_labels - oldest_labels:
            self._forget(self.oldest, labels)
        self._oldest_labels = oldest_labels
        for job_id in self._circuit_labels - circuits:
            self._forget(self.circuit, (job_id,))
            self._forget(self.in_flight_limit, (job_id,))
        self._lag_labels, self._circuit_labels = lag_labels, circuits

    def _forget(self, gauge: Any, labels: tuple[str, ...]) -> None:
        if self.multiprocess:
            # Another process may own it now and write it more recently; this one says 0.
            gauge.labels(*labels).set(0)
        else:
            gauge.remove(*labels)

    def exposition(self) -> bytes:
        """The text format of every metric (of every process of the service, with workers)."""
        from prometheus_client import CollectorRegistry, generate_latest

        self.flush()
        if not self.multiprocess:
            return generate_latest(self._registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

    @staticmethod
    def process_ended(pid: int) -> None:
        """A worker process ended: its live gauges no longer count."""
        if os.environ.get(MULTIPROC_ENV):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid)


class MetricsFlusher(TimerService):
    """Flushes the counts of :class:`Metrics` every quarter of a second and when stopping
    (with ``--workers``, other processes read them from the shared folder)."""

    def __init__(self, metrics: Metrics, every: float = 0.25) -> None:
        super().__init__(every, metrics.flush)
        self._metrics = metrics

    def stopService(self) -> Any:
        """Stop the timer, then flush what is left."""
        stopped = super().stopService()
        self._metrics.flush()
        return stopped


class MetricsResource(Resource):
    """``GET /metrics`` on a listener of its own (``--metrics``), without auth."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Any) -> bytes:
        """The text format; 404 for any other path."""
        if request.path != b"/metrics":
            request.setResponseCode(404)
            return b"not found: the metrics are at /metrics\n"
        request.setHeader(b"Content-Type", CONTENT_TYPE.encode())
        return self._metrics.exposition()
