"""A job's delivery settings as one immutable value (SPEC §3, §5, §11, §12).

Plain data, no Twisted. :class:`Settings` is everything the delivery core reads of a job's
definition, built whole from a :class:`~restconsumer.jobs.model.Job` and swapped in one
assignment when the definition changes: no part of the core ever sees half of an old
definition and half of a new one. :meth:`Settings.takes_in_place` says which changes the
records under way do not depend on (a header, the URL, the retry policy...), and which need
the job rebuilt (its topics, ``ordering``, ``batch``, ``start_from``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from restconsumer.delivery.retry import RetryPolicy
from restconsumer.jobs.destinations import Destinations
from restconsumer.jobs.mapping import RequestBuilder
from restconsumer.jobs.model import DEFAULT_BATCH, DEFAULT_MAX_IN_FLIGHT_LIMIT, DEFAULT_TIMEOUT, Job
from restconsumer.jobs.work import OrderKey, order_key

__all__ = ["BatchSettings", "Current", "Settings"]


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """A batched job's ``batch`` (SPEC §11), defaults filled in."""

    max_messages: int
    max_bytes: int
    max_wait: float
    format: str

    @classmethod
    def of(cls, batch: dict[str, Any]) -> BatchSettings:
        """The settings of a definition's ``batch`` object."""
        merged = {**DEFAULT_BATCH, **batch}
        return cls(int(merged["max_messages"]), int(merged["max_bytes"]), float(merged["max_wait"]),
                   str(merged["format"]))


@dataclass(frozen=True, slots=True)
class Settings:
    """What delivering one job's records depends on."""

    job: Job
    builder: RequestBuilder
    policy: RetryPolicy
    timeout: float
    follow_redirects: bool
    ca_cert: str | None
    ratelimit: float
    success: frozenset[int]
    idempotency: bool
    #: The Standard Webhooks secret (SPEC §12), if the job signs its requests.
    signing_secret: str | None
    result_topic: str | None
    #: The job's ``oauth2`` settings (SPEC §12), if it has them.
    oauth2: dict[str, Any] | None
    #: The bound on requests under way: the job's number, or with ``adaptive`` the highest
    #: limit the controller may reach (``max_in_flight_limit``).
    max_in_flight: int
    #: ``max_in_flight: "auto"`` (the default): the limit is found by the job (SPEC §11).
    adaptive: bool
    ordering: Any
    order: OrderKey | None
    batch: BatchSettings | None
    #: The headers of a batch's request (a batch in NDJSON says so in its Content-Type).
    batch_headers: dict[bytes, list[bytes]]
    #: What the job's owner may reach besides public addresses (SPEC §8); None: an owner
    #: without a scoped token, not limited.
    granted: Destinations | None = None

    @classmethod
    def of(cls, job: Job, granted: Destinations | None = None) -> Settings:
        """The settings of ``job`` (its owner granted ``granted``); raises what building its
        request builder raises."""
        d = job.definition
        builder = RequestBuilder(job)
        ordering = d.get("ordering", "partition")
        batch = BatchSettings.of(d["batch"]) if "batch" in d else None
        adaptive = d.get("max_in_flight", "auto") == "auto"
        headers = builder.headers
        if batch is not None and batch.format == "ndjson":
            headers = {**headers, b"Content-Type": [b"application/x-ndjson"]}
        return cls(
            job=job, builder=builder, policy=RetryPolicy.of(job.retry),
            timeout=float(d.get("timeout", DEFAULT_TIMEOUT)),
            follow_redirects=bool(d.get("follow_redirects", False)),
            ca_cert=d.get("ca_cert"), ratelimit=float(d.get("ratelimit", 0)),
            success=frozenset(d.get("success_status", ())),
            idempotency=bool(d.get("idempotency_key")),
            signing_secret=d["signing"]["secret"] if "signing" in d else None,
            result_topic=d.get("result_topic"), oauth2=d.get("oauth2"),
            max_in_flight=int(d["max_in_flight"]) if adaptive is False else
            int(d.get("max_in_flight_limit", DEFAULT_MAX_IN_FLIGHT_LIMIT)),
            adaptive=adaptive,
            ordering=ordering, order=order_key(ordering), batch=batch, batch_headers=headers,
            granted=granted)

    @property
    def job_id(self) -> str:
        """The job's id."""
        return self.job.id

    def takes_in_place(self, other: Settings) -> bool:
        """Whether ``other`` may replace these settings while records are under way.

        Records already fetched were queued by their order group and, in a batched job,
        gathered into batches; the consumer was subscribed to the topics from where
        ``start_from`` says. A change of any of those needs the job rebuilt (its unfinished
        records are then released to the next consumer); anything else is read afresh by
        every attempt.
        """
        mine, theirs = self.job.definition, other.job.definition
        return (self.job.topics == other.job.topics and self.ordering == other.ordering
                and self.batch == other.batch
                and mine.get("start_from") == theirs.get("start_from"))


class Current:
    """The settings in force for one job: the runner swaps them whole, in one assignment;
    every part of the core reads them here, at the moment it needs them."""

    __slots__ = ("settings",)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
