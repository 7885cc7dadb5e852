"""A job's circuit (SPEC §5 "Outage, not poison"): is the endpoint down, or a message bad?

Plain data, no Twisted. A run of retryable failures (refused or reset connections,
timeouts, 5xx; not a throttled answer: a 429, a 503 with Retry-After) across ``threshold``
*different* records, with no good answer in between, means the endpoint is down: the
circuit opens. One record failing again and again is not an outage: it may be poison, and
is dead-lettered once its retries are used up — but only if the job got a good answer
(2xx, or a non-retryable one: the endpoint is up and judging) since that record first
failed; otherwise the circuit opens instead. The first success closes it.
"""

from __future__ import annotations

from collections.abc import Hashable

__all__ = ["THRESHOLD", "Circuit"]

#: Distinct records failing in a row that open the circuit. With the default ordering a job
#: has one record under way per partition, so an outage fails this many different records
#: within the first round of a job of three partitions or more; fewer partitions open it
#: when the first record's retries are used up with no good answer since.
THRESHOLD = 3


class Circuit:
    """Closed or open, since when and why; counts the good answers the job got."""

    def __init__(self, threshold: int = THRESHOLD) -> None:
        self.threshold = threshold
        self.is_open = False
        self.since: float | None = None
        self.reason: str | None = None
        #: Good answers so far (2xx or non-retryable): "did the endpoint work since?".
        self.good = 0
        self._failing: set[Hashable] = set()

    def succeeded(self) -> bool:
        """A 2xx: the run of failures ends; True if this closed the circuit."""
        self.good += 1
        self._failing.clear()
        if not self.is_open:
            return False
        self.is_open = False
        self.since, self.reason = None, None
        return True

    def answered(self) -> None:
        """A non-retryable answer: the endpoint is up (the record is bad)."""
        self.good += 1
        self._failing.clear()

    def failed(self, record: Hashable, reason: str, now: float) -> bool:
        """A retryable failure of ``record``; True if this opened the circuit."""
        if self.is_open:
            self.reason = reason
            return False
        self._failing.add(record)
        if len(self._failing) >= self.threshold:
            return self.open(f"{len(self._failing)} different records failed in a row; last: {reason}",
                             now)
        return False

    def open(self, reason: str, now: float) -> bool:
        """Open (the endpoint looks down); True if it was closed."""
        if self.is_open:
            return False
        self.is_open = True
        self.since = now
        self.reason = reason
        self._failing.clear()
        return True
