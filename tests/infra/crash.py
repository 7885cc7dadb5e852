"""What a crash may re-send (SPEC §5): a sink that tells the runs of a service apart, and the check.

A message's offset is committed only after its request succeeded (or it was dead-lettered),
so a service killed and started again re-sends only records at or past its group's committed
offset of their partition — what was under way, or finished past the lowest unfinished
message, when the kill came. Reading the committed offsets once the killed process is gone
gives that window exactly, with no guess at how fast the machine delivers.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

from tests.infra.sink import Received

__all__ = ["Record", "Runs", "redelivered"]

#: (partition, offset) of the record a request carries.
Record = tuple[int, int]


class Runs:
    """A sink's responder noting, for every request, the run of the service it came in
    (``run`` is raised by the test between a kill and the next start) and its record."""

    def __init__(self, record_of: Callable[[Received], Record],
                 respond: Callable[[Received], tuple[int, dict[str, str], bytes]]) -> None:
        self.run = 1
        self._record_of = record_of
        self._respond = respond
        self._lock = threading.Lock()
        self._seen: list[tuple[int, Record]] = []

    def __call__(self, got: Received) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self._seen.append((self.run, self._record_of(got)))
        return self._respond(got)

    def seen(self, run: int) -> Counter[Record]:
        """How often each record came in ``run``."""
        with self._lock:
            return Counter(record for r, record in self._seen if r == run)


def redelivered(runs: Runs, committed_at_kill: list[int]) -> tuple[int, int]:
    """Check what the run after the kill sent again; (records sent again, the window).

    The endpoint answered every request 200, so within one run no record is sent twice;
    a record of both runs was past its partition's committed offset at the kill, and so
    among the records the first run had sent there (the window).
    """
    first, second = runs.seen(1), runs.seen(2)
    assert [r for r, n in first.items() if n > 1] == [], "a record sent twice before the kill"
    assert [r for r, n in second.items() if n > 1] == [], "a record sent twice after the restart"
    window = {(p, o) for p, o in first if o >= committed_at_kill[p]}
    again = set(first) & set(second)
    below = sorted((p, o) for p, o in again if o < committed_at_kill[p])
    assert below == [], f"committed before the kill, yet sent again: {below[:10]}"
    return len(again), len(window)
