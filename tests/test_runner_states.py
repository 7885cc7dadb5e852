"""The whole running job as a state machine (SPEC §5 "Nothing waits for ever", §11).

Hypothesis drives a job's runner, and the runners the supervisor starts after it, through the
surface the Kafka loop and the supervisor use — ``assigned``, ``prepare``, ``arrived``,
``revoked``, ``can_take``/``update``, ``stop``, ``held_bytes``, ``stats`` and the shared
``ByteBudget`` — against an in-memory HTTP agent, dead letters, a Kafka loop and a Clock,
interleaving fetches, answers of every kind, hangs and timeouts, definition changes,
revocations, restarts and exceptions raised from inside the steps. Everything is judged from
the outside: which records a request carries (its body), which message a dead letter is of
(its value, the original bytes), what was committed.

Always: no commit (nor what ``revoked()`` returns) passes a message that has not ended; a
revoked partition or a stopped job has no request of ours under way; order groups and
``max_in_flight`` hold; a record is never dead-lettered for being throttled; a stopped job
holds no bytes of the budget. Once the endpoint answers finally (2xx or 4xx for everything)
and the clock has run past every wait the job states, every record fetched on a partition
still assigned has ended and the commit point of that partition is past it.
"""

from __future__ import annotations

import copy
import functools
import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent
from zope.interface import implementer

# All this test knows of restconsumer (module paths move: keep them here alone).
from restconsumer.delivery.budget import ByteBudget
from restconsumer.delivery.runner import JobRunner, Shared
from restconsumer.delivery.sender import HTTPSender
from restconsumer.jobs.model import validate
from tests.test_runner import FakeResponse

TOPIC = "t"
PARTITIONS = 3
TIMEOUT = 1.0
RETRY = {"max_attempts": 3, "initial_wait": 0.1, "max_wait": 0.5}
#: The longest a job's stated rule makes a record wait between two tries: a Retry-After is
#: honoured up to ten times max_wait, a probe goes at least every max_wait, then the request's
#: own time limit.
LONGEST_WAIT = RETRY["max_wait"] * 10 + TIMEOUT
GRACE = 2.0
#: Small enough that a few large messages pause a partition (a job may hold half of it, and
#: its consumer's pre-fetch reservation, 256 KiB, counts).
BUDGET = 640 * 1024
FILTER = "$[?(@.msg.keep == true)]"
#: Messages one fetch takes from a partition.
MAX_FETCH = 5
SETTLE_STEP = 0.25

Record = tuple[int, int]  # (partition, offset)


# -- fakes -------------------------------------------------------------------------------


class _Collect:
    """The consumer a body producer writes into."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


@dataclass(eq=False)
class Pending:
    """A request the fake agent holds until the machine answers it (or it is cancelled)."""

    body: bytes
    d: Deferred[FakeResponse]
    records: list[Record] = field(default_factory=list)
    #: Which runner (by its start count) sent it.
    gen: int = 0


@implementer(IAgent)
class FakeAgent:
    """Holds every request for the machine; ``raise_next`` makes the next ``request()`` raise."""

    def __init__(self, machine: JobMachine) -> None:
        self._machine = machine
        self._requests: list[Pending] = []
        self.raise_next: BaseException | None = None

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Any:  # noqa: N803
        body = _Collect()
        if bodyProducer is not None:
            bodyProducer.startProducing(body)
        pending = Pending(body.data, Deferred(lambda _: self._machine.cancelled(pending)))
        self._machine.requested(pending, self.open())
        if self.raise_next is not None:
            error, self.raise_next = self.raise_next, None
            self._machine.note(pending.records, "raised")
            raise error
        self._requests.append(pending)
        return pending.d

    def open(self) -> list[Pending]:
        """Requests neither answered nor cancelled, oldest first."""
        self._requests = [r for r in self._requests if not r.d.called]
        return list(self._requests)


class FakeDeadLetters:
    """Takes every dead letter and acknowledges it at once."""

    def __init__(self, machine: JobMachine) -> None:
        self._machine = machine

    def send(self, topic: str, key: bytes | None, value: bytes | None,
             headers: list[tuple[str, bytes]]) -> Deferred[None]:
        self._machine.dead_lettered(value, dict(headers).get("restconsumer.reason", b"").decode())
        return succeed(None)


class FakeMessage:
    """A fetched Kafka message as the job's ``prepare`` reads it (confluent-kafka's accessors)."""

    def __init__(self, partition: int, offset: int, key: bytes | None, value: bytes) -> None:
        self._partition, self._offset, self._key, self._value = partition, offset, key, value

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes:
        return self._value

    def headers(self) -> None:
        return None

    def timestamp(self) -> tuple[int, int]:
        return 1, 1_700_000_000_000  # TIMESTAMP_CREATE_TIME

    def error(self) -> None:
        return None


class FakeLoop:
    """Stands in for the job's Kafka loop, keeping the real one's timing.

    A revocation runs alone (the real loop's thread waits inside the rebalance callback:
    nothing is fetched meanwhile, and a stop waits for it); a stop then closes the consumer,
    which revokes what is left — after ``close_delay`` seconds, when Kafka is slow to answer
    — and gives up waiting after ``close_timeout``, as the real loop does. What is committed
    once the consumer is closed (or given up on) no longer reaches Kafka.
    """

    def __init__(self, machine: JobMachine, reactor: Any, name: str, config: dict[str, Any],
                 topics: list[str], handler: Any, **options: Any) -> None:
        self._machine = machine
        self._clock = reactor
        self.handler = handler
        self.close_timeout = float(options.get("close_timeout", 15.0))
        self.close_delay = 0.0
        self.assignment: set[int] = set()
        self.paused: set[int] = set()
        self.lag: dict[Any, int] = {}
        #: The partitions a revocation under way lets go of.
        self.revoking: set[int] | None = None
        self.closed = False
        self.gave_up = False
        self.gen = machine.gen
        self._after_revoke: list[Callable[[], None]] = []
        self._stopped: Deferred[None] | None = None
        self._timer: Any = None
        machine.loop_made(self)

    def start(self) -> None:
        pass

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        for (_, p), offset in offsets.items():
            self._machine.committed_offset(self, p, offset, "committed")

    def pause(self, tp: tuple[str, int]) -> None:
        self.paused.add(tp[1])

    def resume(self, tp: tuple[str, int]) -> None:
        self.paused.discard(tp[1])

    def assign(self, partitions: set[int]) -> None:
        self.assignment |= partitions
        self.handler.assigned([(TOPIC, p) for p in sorted(partitions)])

    def revoke(self, partitions: set[int], lost: bool) -> None:
        self.revoking = set(partitions)

        def done(offsets: Any) -> None:
            if isinstance(offsets, Failure):
                self._machine.problem("raised", f"revoked() failed: {offsets.value!r}")
                offsets = {}
            for (_, p), offset in (offsets or {}).items():
                if offset is not None:
                    how = "lost, yet returned" if lost else "revoked"
                    self._machine.committed_offset(self, p, offset, how)
            self._machine.revocation_ended(self, partitions)
            self.assignment -= partitions
            self.paused -= partitions
            self.revoking = None
            after, self._after_revoke = self._after_revoke, []
            for then in after:
                then()

        try:
            d = self.handler.revoked([(TOPIC, p) for p in sorted(partitions)], lost)
        except Exception as e:
            self._machine.problem("raised", f"revoked() raised {e!r}")
            d = succeed({})
        d.addBoth(done)

    def stop(self) -> Deferred[None]:
        if self._stopped is None:
            self._stopped = Deferred()
            self._timer = self._clock.callLater(self.close_timeout, self._give_up)
            if self.revoking is not None:
                self._after_revoke.append(self._close)
            else:
                self._close()
        return self._stopped

    def _close(self) -> None:
        if self.close_delay:
            self._clock.callLater(self.close_delay, self._revoke_rest)
        else:
            self._revoke_rest()

    def _revoke_rest(self) -> None:
        rest = set(self.assignment)
        if not rest:
            self._closed()
            return
        self._after_revoke.append(self._closed)
        self.revoke(rest, False)

    def _closed(self) -> None:
        self.closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        assert self._stopped is not None
        if not self._stopped.called:
            self._stopped.callback(None)

    def _give_up(self) -> None:
        self.closed = self.gave_up = True
        assert self._stopped is not None
        if not self._stopped.called:
            self._stopped.callback(None)


def reported_failure(runner: Any) -> bool:
    """Whether the runner says its job failed (SPEC §5: an exception in intake puts the job in
    ``error``, and the supervisor restarts it). Looked for as a fired Deferred or a set value
    named ``failed``, ``failure`` or ``error``; nothing of the kind is a job that goes on."""
    for name in ("failed", "failure", "error"):
        value = getattr(runner, name, None)
        if isinstance(value, Deferred):
            if value.called:
                return True
        elif value is not None and not callable(value) and not isinstance(value, (int, float)) and value:
            return True
    return False


def records_of(body: bytes) -> list[Record]:
    """The records a request carries: its JSON body, a JSON array of bodies, or NDJSON."""
    text = body.decode("utf-8")
    try:
        document = json.loads(text)
        documents = document if isinstance(document, list) else [document]
    except ValueError:
        documents = [json.loads(line) for line in text.splitlines() if line.strip()]
    found = []
    for d in documents:
        partition, offset = d["id"].split("-")
        found.append((int(partition), int(offset)))
    return found


# -- the job's definitions ---------------------------------------------------------------

def _definitions(ordering: st.SearchStrategy[str | None]) -> st.SearchStrategy[dict[str, Any]]:
    """The parts of the job's definition a test varies (``ordering`` None: the one it has)."""
    common = {"url_placeholder": st.booleans(), "headers": st.booleans(),
              "max_in_flight": st.integers(1, 4), "filter": st.booleans()}
    single = st.fixed_dictionaries({"batch": st.none(), "ordering": ordering, **common})
    batched = st.fixed_dictionaries({
        "batch": st.fixed_dictionaries({
            "max_messages": st.integers(1, 4),
            "max_wait": st.sampled_from([0.2, 0.5, 1.0]),
            "format": st.sampled_from(["json_array", "ndjson"]),
        }),
        # A batched job keeps partition order, and its URL holds no placeholder.
        "ordering": st.just("partition"), **common, "url_placeholder": st.just(False),
    })
    return st.one_of(single, batched)


ORDERINGS = ["partition", "key", "none"]
definitions = _definitions(st.sampled_from(ORDERINGS))
changes = _definitions(st.none() | st.sampled_from(ORDERINGS))


def make_job(parts: dict[str, Any], job_id: str) -> Any:
    definition: dict[str, Any] = {
        "id": job_id, "owner": "o", "type": "POST", "topic": TOPIC,
        "datamap": {"id": "$.msg.id"}, "json_body": ["id"],
        "url": "http://sink.test/p/{id}" if parts["url_placeholder"] else "http://sink.test/in",
        "retry": RETRY, "timeout": TIMEOUT, "ordering": parts["ordering"],
        "max_in_flight": parts["max_in_flight"],
    }
    if parts["headers"]:
        definition["headers"] = {"X-Version": "2"}
    if parts["filter"]:
        definition["filter"] = FILTER
    if parts["batch"] is not None:
        definition["batch"] = dict(parts["batch"])
    return validate(definition)


partitions = st.sampled_from([(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)])
#: ok: JSON the filter keeps; skip: JSON a filter leaves out; bytes: undecodable; big: ~12 kB.
messages = st.tuples(st.sampled_from(["ok", "skip", "bytes", "big"]), st.sampled_from([None, b"a", b"b"]))
answers = st.sampled_from(["ok", "bad", "down", "slow", "refused", "unknown"])


@dataclass
class Message:
    key: bytes | None
    value: bytes
    keep: bool
    decodable: bool


def _checked(f: Callable[..., Any]) -> Callable[..., Any]:
    """Marks the machine broken when a step or check fails: its teardown then only cleans up."""

    @functools.wraps(f)
    def run(self: JobMachine, *args: Any, **kwargs: Any) -> Any:
        try:
            return f(self, *args, **kwargs)
        except BaseException:
            self.broken = True
            raise

    return run


# -- the machine -------------------------------------------------------------------------


class JobMachine(RuleBasedStateMachine):
    """One job over three partitions of one topic, run as the Kafka loop and the supervisor
    would run it."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.agent = FakeAgent(self)
        self.budget = ByteBudget(BUDGET)
        self.shared = Shared(self.clock, {"bootstrap.servers": "fake:9092"},
                             HTTPSender(self.clock, agent=self.agent),
                             FakeDeadLetters(self),  # type: ignore[arg-type]
                             self.budget, revoke_grace=GRACE,
                             loop_factory=lambda *a, **kw: FakeLoop(self, *a, **kw))
        self.log: dict[int, list[Message]] = {p: [] for p in range(PARTITIONS)}
        self.whose: dict[bytes, Record] = {}
        #: Records that ended (in any assignment, by any runner), and how.
        self.ended: dict[Record, str] = {}
        self._prefix = [0] * PARTITIONS
        #: What Kafka holds as the group's committed offsets.
        self.committed: dict[int, int] = {}
        #: Per partition assigned now: where its assignment began, the next offset to fetch.
        self.begin: dict[int, int] = {}
        self.position: dict[int, int] = {}
        #: Per record, what its requests met since it was last fetched.
        self.history: dict[Record, list[str]] = defaultdict(list)
        self.problems: dict[str, list[str]] = defaultdict(list)
        self.gen = 0
        self.runners: list[Any] = []
        self.stopped_ids: list[str] = []
        self.runner: Any = None
        self.loop: FakeLoop | None = None
        self.parts: dict[str, Any] = {}
        self.job_id = ""
        self.stopping = False
        self.in_flight_bound = 0
        self.batch_bound = 1
        #: Per order group: the lowest offset of the last request for it.
        self.order: dict[Any, int] = {}
        self.delivered_records = 0
        self.dead_letters = 0
        self.injected_intake = False
        self.final = 200
        self.broken = False

    # -- what the fakes report -----------------------------------------------------------

    def problem(self, kind: str, text: str) -> None:
        self.problems[kind].append(f"at {self.clock.seconds():.2f} s: {text}")

    def loop_made(self, loop: FakeLoop) -> None:
        self.loop = loop

    def _end(self, record: Record, how: str) -> None:
        self.ended.setdefault(record, how)

    def _ended_prefix(self, p: int) -> int:
        while (p, self._prefix[p]) in self.ended:
            self._prefix[p] += 1
        return self._prefix[p]

    def committed_offset(self, loop: FakeLoop, p: int, offset: int, how: str) -> None:
        first = self._ended_prefix(p)
        if offset > first:
            fetched = first < len(self.log[p])
            self.problem("commit", f"{how} offset {offset} of partition {p}, past offset {first}, "
                                   f"which {'has not ended' if fetched else 'was never fetched'}")
        if loop is self.loop and not loop.closed and p in loop.assignment and how != "lost, yet returned":
            self.committed[p] = offset

    def revocation_ended(self, loop: FakeLoop, partitions: set[int]) -> None:
        for r in self.agent.open():
            if r.gen == loop.gen and any(p in partitions for p, _ in r.records):
                self.problem("under way", f"partitions {sorted(partitions)} revoked with a request "
                                          f"for {r.records} still under way")

    def requested(self, pending: Pending, under_way: list[Pending]) -> None:
        try:
            pending.records = records_of(pending.body)
        except (ValueError, KeyError, UnicodeDecodeError):
            self.problem("request", f"a request whose records cannot be told: {pending.body!r}")
            return
        pending.gen = self.gen
        records = pending.records
        if self.runner is None:
            self.problem("under way", f"a request for {records} with no job running")
        if len(under_way) >= self.in_flight_bound:
            self.problem("in flight", f"a request for {records} with {len(under_way)} under way "
                                      f"(max_in_flight {self.in_flight_bound})")
        if len(records) > 1:
            offsets = [o for _, o in records]
            if len({p for p, _ in records}) > 1 or offsets != sorted(set(offsets)) \
                    or len(records) > self.batch_bound:
                self.problem("batch", f"a batch of {records} (max_messages {self.batch_bound})")
        mine = [r for r in under_way if r.gen == self.gen]
        for group, first in self._groups(records).items():
            busy = [r.records for r in mine if group in self._groups(r.records)]
            if busy:
                self.problem("order", f"a request for {records} while {busy[0]} of its order group "
                                      f"{group} is under way")
            last = self.order.get(group)
            if last is not None and first < last:
                self.problem("order", f"a request for {records} after one for offset {last} of "
                                      f"its order group {group}")
            self.order[group] = first if last is None else max(last, first)

    def _groups(self, records: list[Record]) -> dict[Any, int]:
        """The order groups of ``records`` (SPEC §11), each with its lowest offset there."""
        ordering = self.parts.get("ordering", "partition")
        groups: dict[Any, int] = {}
        for p, o in records:
            if ordering == "partition":
                group: Any = p
            elif ordering == "key" and self.log[p][o].key is not None:
                group = (p, self.log[p][o].key)
            else:
                continue
            groups[group] = min(groups.get(group, o), o)
        return groups

    def note(self, records: list[Record], what: str) -> None:
        for record in records:
            self.history[record].append(what)

    def cancelled(self, pending: Pending) -> None:
        self.note(pending.records, "cancelled")

    def dead_lettered(self, value: bytes | None, reason: str) -> None:
        record = self.whose.get(value or b"")
        if record is None:
            self.problem("dead letter", f"a dead letter of no message fetched: {value!r}")
            return
        if reason.startswith("internal error") and "raised by the agent" not in reason:
            # Only what the machine raises may dead-letter a record as an internal error.
            self.problem("dead letter", f"record {record} dead-lettered for a fault of ours: {reason}")
        self.dead_letters += 1
        seen = self.history.get(record, [])
        if seen and all(s == "slow" for s in seen):
            self.problem("throttled", f"record {record} dead-lettered though its endpoint only "
                                      f"asked it to slow down ({len(seen)} x 429)")
        self._end(record, "dead-lettered")

    # -- driving the runner --------------------------------------------------------------

    def _start(self, parts: dict[str, Any], assigned: set[int]) -> None:
        """What the supervisor does: a runner for the job, started, given its partitions."""
        self.gen += 1
        self.job_id = f"j{self.gen}"
        self.parts = parts
        self.in_flight_bound = parts["max_in_flight"]
        self.batch_bound = parts["batch"]["max_messages"] if parts["batch"] else 1
        self.order.clear()
        runner = JobRunner(make_job(parts, self.job_id), self.shared)
        self.runners.append(runner)
        self.runner = runner
        runner.start()
        self._assign(assigned)

    def _assign(self, partitions: set[int]) -> None:
        assert self.loop is not None
        for p in partitions:
            self.begin[p] = self.position[p] = self.committed.get(p, 0)
            self.order = {g: o for g, o in self.order.items() if g != p and not (
                isinstance(g, tuple) and g[0] == p)}
        try:
            self.loop.assign(partitions)
        except Exception as e:
            self.problem("raised", f"assigned() raised {e!r}")

    def _restart(self, parts: dict[str, Any] | None = None, close_delay: float = 0.0,
                 again: bool = True) -> None:
        """What the supervisor does with a runner it must replace: stop it, and once it has
        stopped start a new one over the same partitions (its unfinished records are released)."""
        runner, loop = self.runner, self.loop
        assert loop is not None
        self.stopping = True
        loop.close_delay = close_delay
        keep = set(loop.assignment) - (loop.revoking or set())
        parts = parts or self.parts
        try:
            d = runner.stop()
        except Exception as e:
            self.problem("raised", f"stop() raised {e!r}")
            d = succeed(None)

        def stopped(result: Any) -> None:
            if isinstance(result, Failure):
                self.problem("raised", f"stop() failed: {result.value!r}")
            self.stopping = False
            self.stopped_ids.append(self.job_id)
            for r in self.agent.open():
                if r.gen == loop.gen:
                    self.problem("under way", f"job stopped with a request for {r.records} under way")
            if again:
                self._start(parts, keep)
            else:
                self.runner = None

        d.addBoth(stopped)

    def _supervise(self) -> None:
        if self.runner is not None and not self.stopping and reported_failure(self.runner):
            self._restart()

    def _produce(self, p: int, kind: str, key: bytes | None) -> None:
        o = len(self.log[p])
        ident = f"{p}-{o}"
        if kind == "bytes":
            value, keep, decodable = b"\xff\xfe" + ident.encode(), True, False
        else:
            doc: dict[str, Any] = {"id": ident, "keep": kind != "skip"}
            if kind == "big":
                doc["pad"] = "x" * 12_000
            value, keep, decodable = json.dumps(doc).encode(), kind != "skip", True
        self.log[p].append(Message(key, value, keep, decodable))
        self.whose[value] = (p, o)

    def _fetchable(self) -> bool:
        return self.runner is not None and not self.stopping and self.loop is not None \
            and self.loop.revoking is None

    def _fetch(self, which: list[int], malformed: int | None = None) -> None:
        """One batch of the Kafka loop: what the partitions (assigned, not paused) have next."""
        assert self.loop is not None
        batch, fetched = [], []
        for p in sorted(which):
            if p not in self.loop.assignment or p in self.loop.paused:
                continue
            start = self.position[p]
            for o in range(start, min(len(self.log[p]), start + MAX_FETCH)):
                m = self.log[p][o]
                batch.append(self.runner.prepare(FakeMessage(p, o, m.key, m.value)))
                fetched.append((p, o))
                self.position[p] = o + 1
        if not batch:
            return
        spoiled = None
        if malformed is not None:
            spoiled = malformed % len(batch)
            # A Prepared that intake cannot read: an exception inside intake.
            bad = copy.copy(batch[spoiled])
            bad.records = None
            batch[spoiled] = bad
        left_out = []
        for i, (p, o) in enumerate(fetched):
            self.history.pop((p, o), None)
            m = self.log[p][o]
            # Counted ended before arrived() runs: it may commit them there and then.
            if i != spoiled and self.parts["filter"] and m.decodable and not m.keep \
                    and (p, o) not in self.ended:
                left_out.append((p, o))
                self._end((p, o), "filtered")
        self.injected_intake = spoiled is not None
        try:
            self.runner.arrived(batch)
        except Exception as e:
            if not self.injected_intake:
                self.problem("raised", f"arrived() raised {e!r}")
            # Intake failed part of the way: a record the filter would leave out has ended
            # only if the commit point went past it.
            for p, o in left_out:
                if self.committed.get(p, 0) <= o:
                    del self.ended[(p, o)]
                    self._prefix[p] = min(self._prefix[p], o)
        self.injected_intake = False

    def _answer(self, pending: Pending, how: str, retry_after: int = 1) -> None:
        self.note(pending.records, how)
        if how == "ok":
            for record in pending.records:
                self._end(record, "delivered")
            self.delivered_records += len(pending.records)
            pending.d.callback(FakeResponse(200, b"ok"))
        elif how == "bad":
            pending.d.callback(FakeResponse(400, b"refused"))
        elif how == "down":
            pending.d.callback(FakeResponse(503, b"down"))
        elif how == "slow":
            pending.d.callback(FakeResponse(429, b"slow down", {"Retry-After": str(retry_after)}))
        elif how == "refused":
            pending.d.errback(ConnectionRefusedError("connection refused"))
        else:  # an exception judge does not know
            pending.d.errback(KeyError("raised by the agent"))

    def _advance(self, seconds: float) -> None:
        target = self.clock.seconds() + seconds
        while True:
            try:
                self.clock.advance(max(0.0, target - self.clock.seconds()))
                return
            except Exception as e:  # the reactor would log it and go on
                self.problem("raised", f"a timer of the job raised {e!r}")

    def _charge_raises_once(self) -> None:
        budget = self.budget
        if "charge" in vars(budget):
            return

        def charge(job: str, size: int) -> None:
            del budget.charge  # type: ignore[attr-defined]
            self.injected_intake = True
            raise RuntimeError("charging the budget failed")

        budget.charge = charge  # type: ignore[method-assign]

    def _disarm(self) -> None:
        self.agent.raise_next = None
        if "charge" in vars(self.budget):
            del self.budget.charge  # type: ignore[attr-defined]

    # -- rules ---------------------------------------------------------------------------

    @initialize(parts=definitions, assigned=partitions, final=st.sampled_from([200, 400]))
    @_checked
    def begin_job(self, parts: dict[str, Any], assigned: tuple[int, ...], final: int) -> None:
        """The job starts on ``assigned`` partitions; in the end its endpoint answers every
        request ``final``."""
        self.final = final
        self._start(parts, set(assigned))

    @precondition(lambda self: self._fetchable())
    @rule(which=partitions, new=st.lists(messages, min_size=1, max_size=4),
          malformed=st.none() | st.integers(0, 7))
    @_checked
    def fetch(self, which: tuple[int, ...], new: list[tuple[str, bytes | None]],
              malformed: int | None) -> None:
        """Messages produced to ``which`` partitions (in turn), then one batch fetched from them;
        with ``malformed``, one message of the batch is one intake cannot read."""
        for i, (kind, key) in enumerate(new):
            self._produce(which[i % len(which)], kind, key)
        self._fetch(list(which), malformed)
        self._supervise()

    @precondition(lambda self: self.agent.open())
    @rule(which=st.none() | st.integers(0, 3), how=answers, retry_after=st.integers(0, 3))
    @_checked
    def answer(self, which: int | None, how: str, retry_after: int) -> None:
        """Answer one request under way (``which``, counted from the oldest), or all of them."""
        under_way = self.agent.open()
        for pending in under_way if which is None else [under_way[which % len(under_way)]]:
            if not pending.d.called:
                self._answer(pending, how, retry_after)
        self._supervise()

    @rule(how=st.sampled_from(["down", "refused", "timeout", "slow"]), rounds=st.integers(1, 4))
    @_checked
    def outage(self, how: str, rounds: int) -> None:
        """The endpoint fails for a while: every request under way (retries included) fails
        ``how``, ``rounds`` times over, with a little time between."""
        for _ in range(rounds):
            if how == "timeout":
                self._advance(TIMEOUT + 0.1)
            else:
                for pending in self.agent.open():
                    if not pending.d.called:
                        self._answer(pending, how, 0)
                self._advance(0.3)
        self._supervise()

    @rule(seconds=st.sampled_from([0.1, 0.3, TIMEOUT + 0.1, 2.5, 8.0]))
    @_checked
    def advance(self, seconds: float) -> None:
        self._advance(seconds)
        self._supervise()

    @precondition(lambda self: self._fetchable() and self.loop.assignment)
    @rule(which=partitions, lost=st.booleans())
    @_checked
    def revoke(self, which: tuple[int, ...], lost: bool) -> None:
        assert self.loop is not None
        chosen = {p for p in which if p in self.loop.assignment} or {min(self.loop.assignment)}
        self.loop.revoke(chosen, lost)
        self._supervise()

    @precondition(lambda self: self._fetchable() and len(self.loop.assignment) < PARTITIONS)
    @rule(which=partitions)
    @_checked
    def assign(self, which: tuple[int, ...]) -> None:
        assert self.loop is not None
        free = set(range(PARTITIONS)) - self.loop.assignment
        self._assign({p for p in which if p in free} or {min(free)})
        self._supervise()

    @precondition(lambda self: self.runner is not None and not self.stopping)
    @rule(parts=changes)
    @_checked
    def change_definition(self, parts: dict[str, Any]) -> None:
        """The job's definition changes: the runner takes it if it can, else the supervisor
        replaces the runner."""
        if parts["ordering"] is None:
            parts = {**parts, "ordering": self.parts["ordering"]}
        job = make_job(parts, self.job_id)
        if not self.runner.can_take(job):
            self._restart(parts)
            return
        # What was under way before the change may still be, beside what the change lets start.
        self.in_flight_bound = max(self.in_flight_bound, parts["max_in_flight"])
        if parts["batch"]:
            self.batch_bound = max(self.batch_bound, parts["batch"]["max_messages"])
        try:
            self.runner.update(job)
        except Exception as e:
            self.problem("raised", f"update() raised {e!r}")
            return
        self.parts = parts
        self._supervise()

    @precondition(lambda self: self.runner is not None and not self.stopping)
    @rule(close_delay=st.sampled_from([0.0, 20.0]))
    @_checked
    def restart(self, close_delay: float) -> None:
        """The supervisor replaces the runner (a change it cannot take, a failed job); with a
        ``close_delay``, Kafka is slow to close the old consumer."""
        self._restart(close_delay=close_delay)

    @rule(what=st.sampled_from(["send raises", "charge raises"]))
    @_checked
    def inject(self, what: str) -> None:
        """An exception from inside a step: the agent's next ``request()`` raises one judge does
        not know, or the budget's next ``charge`` (in intake) raises."""
        if what == "send raises":
            self.agent.raise_next = ZeroDivisionError("raised by the agent")
        else:
            self._charge_raises_once()

    # -- settling ------------------------------------------------------------------------

    def _answer_under_way(self, how: str) -> None:
        for _ in range(10_000):
            under_way = self.agent.open()
            if not under_way:
                return
            for pending in under_way:
                if not pending.d.called:
                    self._answer(pending, how)

    def _progress(self) -> tuple[Any, ...]:
        return len(self.ended), tuple(sorted(self.committed.items())), self.gen, self.stopping

    def _settle(self, final: int) -> None:
        """The endpoint answers everything finally, the clock runs well past every wait the job
        states; then every record fetched on a partition still assigned has ended, and its
        partition's commit point is past it."""
        how = "ok" if final < 300 else "bad"
        self._disarm()
        waited = quiet = 0.0
        while waited < 300.0:
            before = self._progress()
            if self._fetchable():
                self._fetch(list(range(PARTITIONS)))
            self._answer_under_way(how)
            self._advance(SETTLE_STEP)
            self._answer_under_way(how)
            self._supervise()
            waited += SETTLE_STEP
            quiet = 0.0 if self._progress() != before else quiet + SETTLE_STEP
            busy = self.stopping or (self.loop is not None and self.loop.revoking is not None)
            if waited >= 3 * LONGEST_WAIT and quiet >= 2 * LONGEST_WAIT and not busy:
                break
        assert not self.stopping, "the job's stop never ended"
        assert self.loop is not None and self.loop.revoking is None, "a revocation never ended"
        for p in sorted(self.loop.assignment):
            waiting = [o for o in range(self.begin[p], self.position[p]) if (p, o) not in self.ended]
            assert not waiting, (
                f"partition {p}: offsets {waiting} fetched and never ended (neither delivered, "
                f"dead-lettered nor filtered) {waited:.0f} s after the endpoint answered all "
                f"{final}; their requests met {[self.history.get((p, o), []) for o in waiting[:3]]}")
            if self.position[p] > self.begin[p]:
                point = self.committed.get(p)
                assert point is not None and point >= self.position[p], (
                    f"partition {p}: commit point {point}, though every record up to offset "
                    f"{self.position[p] - 1} has ended")

    def teardown(self) -> None:
        if self.broken or self.runner is None:
            return
        self.broken = True  # whatever fails here, fails once
        self._settle(self.final)
        if self.runner is not None and not self.stopping:
            self._restart(again=False)
        for _ in range(200):
            if not self.stopping:
                break
            self._advance(0.5)
            self._answer_under_way("ok")
        assert not self.stopping, "the job's stop never ended"
        self.holds()

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    @_checked
    def holds(self) -> None:
        """Everything that holds after every step (each check fails on its own line)."""
        self._no_commit_passes_an_unfinished_message()
        self._nothing_under_way_after_its_partition_or_job_is_gone()
        self._order_groups_and_max_in_flight_hold()
        self._throttling_never_dead_letters()
        self._no_step_raises_unexpectedly()
        self._a_stopped_job_holds_no_bytes()
        self._counts_are_no_more_than_what_happened()

    def _no_commit_passes_an_unfinished_message(self) -> None:
        assert not self.problems["commit"], self.problems["commit"][0]

    def _nothing_under_way_after_its_partition_or_job_is_gone(self) -> None:
        assert not self.problems["under way"], self.problems["under way"][0]

    def _order_groups_and_max_in_flight_hold(self) -> None:
        assert not self.problems["order"], self.problems["order"][0]
        assert not self.problems["in flight"], self.problems["in flight"][0]
        assert not self.problems["batch"], self.problems["batch"][0]
        assert not self.problems["request"], self.problems["request"][0]

    def _throttling_never_dead_letters(self) -> None:
        assert not self.problems["throttled"], self.problems["throttled"][0]

    def _no_step_raises_unexpectedly(self) -> None:
        assert not self.problems["raised"], self.problems["raised"][0]
        assert not self.problems["dead letter"], self.problems["dead letter"][0]

    def _a_stopped_job_holds_no_bytes(self) -> None:
        budget = self.budget
        for job_id in self.stopped_ids:
            assert budget.held_by(job_id) == 0, (
                f"stopped job {job_id} holds {budget.held_by(job_id)} bytes of the budget")
        for runner in self.runners if self.runner is None else self.runners[:-1]:
            assert runner.held_bytes == 0, f"a stopped runner holds {runner.held_bytes} bytes"
        now = budget.held_by(self.job_id) if self.runner is not None else 0
        assert now >= 0, f"job {self.job_id} holds {now} bytes"
        assert budget.held == now, f"the budget holds {budget.held} bytes, the running job {now}"

    def _counts_are_no_more_than_what_happened(self) -> None:
        delivered = sum(getattr(r.stats, "delivered", 0) for r in self.runners)
        dead = sum(getattr(r.stats, "dead_lettered", 0) for r in self.runners)
        assert delivered <= self.delivered_records, (
            f"{delivered} records counted delivered, {self.delivered_records} answered 2xx")
        assert dead <= self.dead_letters, f"{dead} counted dead-lettered, {self.dead_letters} produced"


JobMachine.TestCase.settings = settings(
    max_examples=400, stateful_step_count=30, deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestJobRunnerStates = JobMachine.TestCase
