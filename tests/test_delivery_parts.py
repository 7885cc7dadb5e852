"""Each part of the delivery core (restconsumer.delivery) alone, on its own rule: the breaker's
probe, the settings' in-place changes, the outcomes' release-once, the deliverer's no-hole,
the intake's broken job, the dispatcher's order groups and the replay's one way.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from typing import Any

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from restconsumer.delivery.attempt import Attempts
from restconsumer.delivery.breaker import Breaker
from restconsumer.delivery.budget import ByteBudget
from restconsumer.delivery.circuit import Circuit
from restconsumer.delivery.dispatch import Dispatcher
from restconsumer.delivery.ledger import Ledger
from restconsumer.delivery.metrics import Metrics
from restconsumer.delivery.outcomes import JobStats, Outcomes
from restconsumer.delivery.replay import Replays
from restconsumer.delivery.retry import Verdict
from restconsumer.delivery.runner import JobRunner, Shared
from restconsumer.delivery.sender import HTTPSender
from restconsumer.delivery.settings import Current, Settings
from restconsumer.delivery.units import Message, Unit
from restconsumer.jobs.model import Job, validate
from restconsumer.jobs.work import Incoming, prepare
from tests.test_runner import FakeAgent, FakeDeadLetters, FakeLoop, Harness, T, make_job

# -- the breaker: open => a probe armed or under way ----------------------------------------

OK = Verdict(True, False, 200, "delivered", answered=True)
DOWN = Verdict(False, True, 503, "HTTP 503")
SLOW_DOWN = Verdict(False, True, 502, "HTTP 502", retry_after=7.0)
THROTTLED = Verdict(False, True, 429, "HTTP 429", retry_after=1.0, answered=True, throttled=True)
BAD = Verdict(False, False, 400, "HTTP 400", answered=True)
REFUSED = Verdict(False, False, None, "host not allowed")

events = st.lists(st.one_of(
    st.tuples(st.just("park"), st.integers(0, 5)),
    st.tuples(st.just("verdict"), st.integers(0, 5),
              st.sampled_from([OK, DOWN, SLOW_DOWN, THROTTLED, BAD, REFUSED])),
    st.tuples(st.just("forget"), st.integers(0, 5)),
    st.tuples(st.just("open"), st.just(0)),
    st.tuples(st.just("advance"), st.floats(0.0, 20.0)),
), max_size=40)


class BreakerModel:
    def __init__(self) -> None:
        self.clock = Clock()
        self.started_one = 0
        self.breaker: Breaker[int] = Breaker(self.clock, lambda: 4.0, lambda u: u, opened=lambda: None,
                                             closed=lambda: None, start_one=self.start_one,
                                             circuit=Circuit(threshold=2))
        self.waits: dict[int, Deferred[None]] = {}

    def start_one(self) -> None:
        # The dispatcher starts one new record as the probe, when one is queued.
        if self.breaker.may_start():
            self.started_one += 1
            self.breaker.started(100 + self.started_one)


@given(events)
@settings(max_examples=400, deadline=None)
def test_an_open_circuit_always_has_a_probe_armed_or_under_way(steps: list[tuple[Any, ...]]) -> None:
    m = BreakerModel()
    b = m.breaker
    for step in steps:
        kind = step[0]
        if kind == "park":
            unit = step[1]
            if unit not in m.waits or m.waits[unit].called:
                m.waits[unit] = b.park(unit)
        elif kind == "verdict":
            b.verdict(step[1], step[2])
        elif kind == "forget":
            d = m.waits.pop(step[1], None)
            if d is not None and not d.called:
                d.cancel()  # its owner leaves (revoked): the breaker is told through the cancel
            b.forget(step[1])
        elif kind == "open":
            b.open("retries used up")
        else:
            m.clock.advance(step[1])
        if b.is_open:
            assert b.armed(), f"open with no probe armed nor under way: {b.describe()}"
        else:
            assert all(d.called for d in m.waits.values()), "closed, yet records still parked"


def test_a_probe_answered_4xx_closes_the_circuit_and_the_parked_records_go() -> None:
    m = BreakerModel()
    b = m.breaker
    b.verdict(1, DOWN)
    b.verdict(2, DOWN)
    assert b.is_open
    waits = {u: b.park(u) for u in (1, 2, 3)}
    m.clock.advance(4.0)
    assert waits[1].called and not waits[2].called, "the oldest probes"
    b.verdict(1, BAD)
    assert not b.is_open and all(d.called for d in waits.values())


def test_throttled_answers_of_any_number_of_records_never_open_the_circuit() -> None:
    """SPEC §5: a 429 is back-pressure, not an outage."""
    m = BreakerModel()
    b = m.breaker
    for unit in range(50):
        b.verdict(unit, THROTTLED)
    assert not b.is_open
    b.verdict(51, DOWN)
    b.verdict(52, DOWN)
    b.verdict(53, THROTTLED)  # the endpoint answers: the run of failures ends
    b.verdict(54, DOWN)
    assert not b.is_open


def test_a_probe_answered_429_closes_the_circuit() -> None:
    m = BreakerModel()
    b = m.breaker
    b.open("down")
    waits = {u: b.park(u) for u in (1, 2)}
    m.clock.advance(4.0)
    b.verdict(1, THROTTLED)  # up and asking to slow down: the job's limit takes over
    assert not b.is_open and all(d.called for d in waits.values())


def test_a_probe_refused_before_the_wire_re_arms_the_next_one() -> None:
    m = BreakerModel()
    b = m.breaker
    b.open("down")
    waits = {u: b.park(u) for u in (1, 2)}
    m.clock.advance(4.0)
    b.verdict(1, REFUSED)  # dead-lettered: the endpoint was never asked
    b.forget(1)
    assert b.is_open and b.armed()
    m.clock.advance(4.0)
    assert waits[2].called, "the next oldest probes"


def test_a_probe_cancelled_by_a_revocation_re_arms() -> None:
    m = BreakerModel()
    b = m.breaker
    b.open("down")
    wait = b.park(1)
    m.clock.advance(4.0)
    assert wait.called
    b.forget(1)  # revoked while probing
    assert b.armed()
    m.clock.advance(4.0)
    assert m.started_one == 1, "with nothing parked, one new record starts as the probe"


def test_retry_after_holds_the_next_probe_longer() -> None:
    m = BreakerModel()
    b = m.breaker
    b.open("down")
    wait = b.park(1)
    m.clock.advance(4.0)
    b.verdict(1, SLOW_DOWN)
    again = b.park(1)
    assert b.probe_interval() == 7.0
    m.clock.advance(6.9)
    assert wait.called and not again.called
    m.clock.advance(0.2)
    assert again.called


def test_stop_cancels_the_probe_timer() -> None:
    m = BreakerModel()
    m.breaker.open("down")
    m.breaker.park(1)
    assert m.clock.getDelayedCalls()
    m.breaker.stop()
    assert not m.clock.getDelayedCalls()


# -- settings: one value, and what it takes in place ----------------------------------------

def test_settings_take_in_place_only_what_records_under_way_do_not_depend_on() -> None:
    base = make_job(batch={"max_messages": 10, "max_wait": 2})
    here = Settings.of(base)

    def changed(**more: Any) -> Settings:
        return Settings.of(dataclasses.replace(base, definition={**base.definition, **more}))

    assert here.takes_in_place(changed(headers={"X-New": "1"}))
    assert here.takes_in_place(changed(url="http://sink.test/q/{id}"))
    assert here.takes_in_place(changed(max_in_flight=4, ratelimit=0.5))
    assert not here.takes_in_place(changed(batch={"max_messages": 20, "max_wait": 2}))
    assert not here.takes_in_place(changed(batch={"max_messages": 10, "max_wait": 2, "format": "ndjson"}))
    without = dict(base.definition)
    del without["batch"]
    assert not here.takes_in_place(Settings.of(dataclasses.replace(base, definition=without)))
    assert not here.takes_in_place(changed(ordering="key"))
    assert not here.takes_in_place(changed(start_from="latest"))


def test_a_busy_batched_job_changed_in_place_keeps_and_sends_its_waiting_records() -> None:
    h = Harness(make_job(batch={"max_messages": 100, "max_wait": 4}, url="http://sink.test/p/batch"))
    h.runner.assigned([(T, 0)])
    h.arrive(*[h.message({"id": f"m{i}"}) for i in range(5)])
    assert h.agent.requests == []
    job = h.runner.job
    new = dataclasses.replace(job, definition={**job.definition, "headers": {"X-New": "1"}}, hash="h2")
    assert h.runner.can_take(new)
    h.runner.update(new)
    h.clock.advance(4)
    [batch] = h.agent.open()
    assert [r["id"] for r in json.loads(batch.body or b"")] == [f"m{i}" for i in range(5)]
    assert batch.header("X-New") == "1", "the batch goes with the settings in force"
    batch.answer(200)
    assert h.loop.commits == {(T, 0): 5}


def test_update_refuses_a_change_that_needs_a_rebuild() -> None:
    h = Harness(make_job(batch={"max_messages": 100, "max_wait": 4}))
    job = h.runner.job
    new = dataclasses.replace(job, definition={**job.definition, "batch": {"max_messages": 5}}, hash="h2")
    assert not h.runner.can_take(new)
    with pytest.raises(ValueError):
        h.runner.update(new)


# -- outcomes: bytes charged once, released once --------------------------------------------

def held_message(ledger: Ledger, offset: int, size: int = 1000) -> Message:
    incoming = Incoming(T, 0, offset, None, b"{}", [], None)
    ticket = ledger.fetched((T, 0), offset)
    assert ticket is not None
    return Message(prepare(Settings.of(make_job()).builder, incoming), ticket, size, 1)


def make_outcomes(budget: ByteBudget) -> tuple[Outcomes, Ledger, list[dict[Any, int]]]:
    ledger = Ledger()
    ledger.assign((T, 0))
    commits: list[dict[Any, int]] = []
    outcomes = Outcomes(Clock(), Current(Settings.of(make_job())), ledger, budget,
                        FakeDeadLetters(), Metrics(), JobStats(),  # type: ignore[arg-type]
                        commit=commits.append, settled=lambda _: None)
    return outcomes, ledger, commits


def test_a_message_is_released_once_whatever_lets_go_of_it() -> None:
    budget = ByteBudget(1 << 20)
    outcomes, ledger, _ = make_outcomes(budget)
    first, second = held_message(ledger, 0), held_message(ledger, 1)
    outcomes.hold([first, second])
    assert budget.held_by("j") == 2000
    outcomes.finish(first)
    assert budget.held_by("j") == 1000
    outcomes.release_all()  # the job stops while the second is under way
    outcomes.release([(T, 0)])  # ... and the revocation runs on after it
    outcomes.finish(second)  # ... and its request ends after that
    outcomes.finish(first)
    assert budget.held_by("j") == 0 and budget.held == 0


def test_a_stop_whose_revocation_outlives_it_leaves_the_budget_at_zero() -> None:
    # Fault 6 of issue 19: the stop gave up on the consumer while its revocation waited for a
    # request; the revocation then released the same bytes again.
    h = Harness(grace=30.0)
    h.loop.stop = lambda: succeed(None)  # type: ignore[method-assign]  # gave up on the close
    h.runner.assigned([(T, 0)])
    h.arrive(h.message({"id": "a"}))
    [pending] = h.agent.open()
    revoking = h.runner.revoked([(T, 0)], False)  # the close's revocation waits for it
    h.runner.stop()  # ... which ends before the revocation: what it left is abandoned
    assert pending.cancelled
    assert revoking.called, "the revocation ran on and let go of the partition after the stop"
    assert h.budget.held_by("j") == 0 and h.budget.held == 0


# -- the deliverer: nothing ends in a hole --------------------------------------------------

class RaisingAgent(FakeAgent):
    """Answers with an exception outside every list the retry policy knows."""

    def __init__(self, error: Exception, at_once: bool) -> None:
        super().__init__()
        self.error, self.at_once = error, at_once

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Any:  # noqa: N803
        self.requests.append(uri)  # type: ignore[arg-type]
        if self.at_once:
            raise self.error
        return fail(self.error)


@pytest.mark.parametrize("at_once", [True, False])
def test_an_exception_judge_does_not_know_dead_letters_the_record(at_once: bool) -> None:
    h = Harness(agent=RaisingAgent(KeyError("surprise"), at_once))
    h.runner.assigned([(T, 0)])
    h.arrive(h.message({"id": "a"}), h.message({"id": "b"}))
    assert [r.split(":")[0] for r in h.dead_letters.reasons()] == ["internal error"] * 2
    assert "KeyError" in h.dead_letters.reasons()[0]
    assert h.loop.commits == {(T, 0): 2}


def test_an_exception_building_a_batch_dead_letters_its_records(monkeypatch: pytest.MonkeyPatch) -> None:
    import restconsumer.delivery.deliverer as deliverer

    def broken(bodies: list[bytes], form: str) -> bytes:
        raise RuntimeError("no batch today")

    monkeypatch.setattr(deliverer, "batch_body", broken)
    h = Harness(make_job(batch={"max_messages": 2}, url="http://sink.test/p/batch"),
                agent=FakeAgent(auto=200))
    h.runner.assigned([(T, 0)])
    h.arrive(h.message({"id": "a"}), h.message({"id": "b"}))
    assert h.dead_letters.reasons() == ["internal error: RuntimeError: no batch today"] * 2
    assert h.loop.commits == {(T, 0): 2}


def test_an_exception_while_ending_a_record_breaks_the_job() -> None:
    h = Harness(agent=FakeAgent(auto=200))
    broken: list[str] = []
    h.runner.on_error = lambda runner, reason: broken.append(reason)
    h.runner.assigned([(T, 0)])

    def fails(*args: Any, **kwargs: Any) -> None:
        raise LookupError("the ledger lost its place")

    h.runner.outcomes.delivered = fails  # type: ignore[method-assign]
    h.arrive(h.message({"id": "a"}))
    assert len(broken) == 1 and "LookupError" in broken[0]
    assert h.loop.commits == {}


# -- intake: an exception there breaks the job, never a hole --------------------------------

def test_an_exception_taking_a_batch_in_breaks_the_job_and_commits_nothing_past_it() -> None:
    h = Harness(agent=FakeAgent(auto=200))
    broken: list[str] = []
    h.runner.on_error = lambda runner, reason: broken.append(reason)
    h.runner.assigned([(T, 0)])
    h.arrive(h.message({"id": "a"}))
    assert h.loop.commits == {(T, 0): 1}
    good, bad, after = h.message({"id": "b"}), h.message({"id": "c"}), h.message({"id": "d"})
    bad.records = None  # type: ignore[assignment]  # a bug of ours in intake
    h.arrive(good, bad, after)
    assert len(broken) == 1 and "internal error taking messages in" in broken[0]
    assert h.runner.failure == broken[0]
    assert h.loop.commits[(T, 0)] <= 2, "the commit point passed a message that never entered"
    h.arrive(h.message({"id": "e"}))
    assert h.loop.commits[(T, 0)] <= 2, "a broken job took more in"
    assert (T, 0) in h.loop.paused


# -- replay: the job's one way ---------------------------------------------------------------

WEBHOOK_SECRET = "whsec_" + "cmVwbGF5LXVuaXQtdGVzdC1zZWNyZXQ="


class FakeReader:
    """A dead-letter topic of the letters the test gives."""

    def __init__(self, letters: list[tuple[Incoming, int | None]]) -> None:
        self._letters = letters
        self.marks: list[int] = []

    def replay_plan(self, job_id: str, topic: str) -> Deferred[dict[int, tuple[int, int]]]:
        return succeed({0: (0, len(self._letters))})

    def letters(self, job_id: str, topic: str, partition: int, start: int,
                end: int) -> Deferred[list[tuple[int, Incoming | None, int | None]]]:
        return succeed([(i, incoming, record) for i, (incoming, record)
                        in enumerate(self._letters[start:end], start)])

    def done(self, job_id: str, topic: str, partition: int, offset: int) -> Deferred[None]:
        self.marks.append(offset)
        return succeed(None)


def replay_job(**more: Any) -> Job:
    return validate({"id": "j", "owner": "o", "type": "POST", "topic": T, "datamap": {"id": "$.msg.id"},
                     "url": "http://sink.test/p/{id}", "json_body": ["id"],
                     "headers": {"Authorization": "${env:RESTCONSUMER_SECRET_TOKEN}"},
                     "signing": {"secret": WEBHOOK_SECRET}, "success_status": [409],
                     "retry": {"max_attempts": 2, "initial_wait": 1, "max_wait": 2}, **more})


def avro_of(ids: list[str]) -> bytes:
    out = io.BytesIO()
    schema = {"type": "record", "name": "P", "fields": [{"name": "id", "type": "string"}]}
    fastavro.writer(out, fastavro.parse_schema(schema), [{"id": i} for i in ids])
    return out.getvalue()


def run_replay(job: Job, letters: list[tuple[Incoming, int | None]], agent: FakeAgent,
               resolved: Job | None = None) -> tuple[Replays, FakeDeadLetters, Clock]:
    clock = Clock()
    clock.advance(time.time())  # signatures are checked against the wall clock
    dead_letters = FakeDeadLetters()
    shared = Shared(clock, {}, HTTPSender(clock, agent=agent), dead_letters,  # type: ignore[arg-type]
                    ByteBudget(1 << 20), loop_factory=FakeLoop)
    replays = Replays(FakeReader(letters), shared, runnable=lambda stored: resolved or job)  # type: ignore[arg-type]
    d = Deferred.fromCoroutine(replays.start(job.definition))
    assert d.called
    return replays, dead_letters, clock


def test_a_replay_sends_what_the_job_sends_resolved_signed_and_with_its_success_status() -> None:
    job = replay_job()
    resolved = dataclasses.replace(job, definition={**job.definition,
                                                    "headers": {"Authorization": "Bearer tok-1"}})
    agent = FakeAgent(auto=409)
    letters = [(Incoming(T, 0, n, None, json.dumps({"id": f"r{n}"}).encode(), [], None), None)
               for n in range(3)]
    replays, dead_letters, _ = run_replay(job, letters, agent, resolved)
    assert [r.path for r in agent.requests] == ["p/r0", "p/r1", "p/r2"]
    check = Webhook(WEBHOOK_SECRET)
    for request in agent.requests:
        assert request.header("Authorization") == "Bearer tok-1"
        check.verify(request.body or b"", {name: request.header(name) or "" for name in
                                           ("webhook-id", "webhook-timestamp", "webhook-signature")})
    progress = replays.progress("j")
    assert progress is not None
    assert (progress["state"], progress["delivered"], progress["dead_lettered"]) == ("done", 3, 0)
    assert dead_letters.sent == []


def test_a_replay_of_one_record_of_a_container_sends_that_record_only() -> None:
    agent = FakeAgent(auto=200)
    letter = Incoming(T, 0, 7, None, avro_of(["a", "b", "c"]), [], None)
    run_replay(replay_job(), [(letter, 1)], agent)
    assert [r.path for r in agent.requests] == ["p/b"]


def test_a_replay_of_a_batched_jobs_letter_is_a_batch_of_one_with_its_records_key() -> None:
    agent = FakeAgent(auto=200)
    job = replay_job(batch={"max_messages": 10}, idempotency_key=True, url="http://sink.test/p/batch")
    letter = Incoming(T, 0, 7, None, avro_of(["a", "b"]), [], None)
    run_replay(job, [(letter, 1)], agent)
    [request] = agent.requests
    assert json.loads(request.body or b"") == [{"id": "b"}]
    assert request.header("Idempotency-Key") == f"j:{T}:0:7:1"


def test_a_replay_that_fails_again_is_a_new_dead_letter_keeping_its_source() -> None:
    agent = FakeAgent(auto=400)
    letter = Incoming(T, 2, 9, None, json.dumps({"id": "x"}).encode(), [], None)
    _, dead_letters, _ = run_replay(replay_job(), [(letter, None)], agent)
    [(_, _, headers, _)] = dead_letters.sent
    assert headers["restconsumer.reason"].decode().startswith("replayed: HTTP 400")
    assert (headers["restconsumer.partition"], headers["restconsumer.offset"]) == (b"2", b"9")


def test_a_replay_shares_the_running_jobs_circuit() -> None:
    h = Harness(replay_job())
    h.runner.breaker.open("down")
    agent = h.agent
    replays = Replays(FakeReader([(Incoming(T, 0, 0, None, b'{"id": "z"}', [], None), None)]),
                      h.runner._shared, runnable=lambda stored: h.runner.job,  # type: ignore[arg-type]
                      runner_of=lambda job_id: h.runner)
    Deferred.fromCoroutine(replays.start(h.runner.job.definition))
    assert agent.requests == [], "a replay waits for the job's probe like the job's records"
    h.clock.advance(2.0)
    [probe] = agent.open()
    probe.answer(200)
    assert not h.runner.breaker.is_open
    assert replays.progress("j")["delivered"] == 1  # type: ignore[index]


def test_the_runner_is_a_thin_controller() -> None:
    # Issue 19: the class that coordinates is the thinnest; every rule lives in a part.
    import inspect

    import restconsumer.delivery as package
    from restconsumer.delivery import attempt, breaker, deliverer, dispatch, intake, outcomes, replay, runner

    assert len(inspect.getsource(JobRunner).splitlines()) < 300
    for module in (attempt, breaker, deliverer, dispatch, intake, outcomes, replay, runner):
        assert module.__doc__ and len(module.__doc__) > 200, module.__name__
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__:
                assert len(inspect.getsource(cls).splitlines()) < 300, cls.__name__
    assert package.__doc__ and "Intake" in package.__doc__



# -- the dispatcher: an order group goes on only when its unit has ended ---------------------

class DispatchModel:
    """A dispatcher whose units end when the test says."""

    def __init__(self, **more: Any) -> None:
        self.clock = Clock()
        self.current = Current(Settings.of(make_job(**more)))
        self.ledger = Ledger()
        self.offsets: dict[Any, int] = {}
        self.started: list[tuple[Unit, Deferred[None]]] = []
        self.breaker: Breaker[Unit] = Breaker(self.clock, lambda: 4.0, lambda u: u.seq, opened=lambda: None,
                                              closed=lambda: None, start_one=self.pump)
        self.dispatcher = Dispatcher(self.clock, self.current, self.breaker, self.start)

    def pump(self) -> None:
        self.dispatcher.pump()

    def start(self, unit: Unit) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.started.append((unit, d))
        return d

    def add(self, partition: int, *ids: str) -> None:
        """Messages of ``partition`` (one record each), queued and pumped."""
        tp = (T, partition)
        settings = self.current.settings
        for id_ in ids:
            if tp not in self.offsets:
                self.ledger.assign(tp)
            offset = self.offsets.get(tp, 0)
            self.offsets[tp] = offset + 1
            incoming = Incoming(T, partition, offset, None, json.dumps({"id": id_}).encode(), [], None)
            prepared = prepare(settings.builder, incoming, settings.order)
            ticket = self.ledger.fetched(tp, offset)
            assert ticket is not None
            message = Message(prepared, ticket, 10, len(prepared.records))
            for record in prepared.records:
                self.dispatcher.record(tp, message, record)
        self.dispatcher.pump()

    def under_way(self) -> list[str]:
        """The ids of the units started and not ended, in the order they started."""
        return [_id_of(u) for u, d in self.started if not d.called]

    def end(self, id_: str) -> None:
        [d] = [d for u, d in self.started if _id_of(u) == id_ and not d.called]
        d.callback(None)


def _id_of(unit: Unit) -> str:
    assert unit.record is not None and unit.record.request is not None
    return unit.record.request.url.rsplit(b"/", 1)[-1].decode()


def test_the_dispatcher_lets_an_order_group_go_on_only_when_its_unit_has_ended() -> None:
    m = DispatchModel()  # ordering: partition
    m.add(0, "a0", "a1", "a2")
    m.add(1, "b0", "b1")
    assert m.under_way() == ["a0", "b0"], "one unit per partition, partitions side by side"
    m.end("b0")
    assert m.under_way() == ["a0", "b1"]
    m.end("a0")
    m.end("a1")
    assert m.under_way() == ["b1", "a2"]
    assert m.dispatcher.under_way == 2


def test_the_dispatcher_keeps_to_max_in_flight_across_groups() -> None:
    m = DispatchModel(ordering="none", max_in_flight=3)
    m.add(0, *[f"m{i}" for i in range(6)])
    assert m.under_way() == ["m0", "m1", "m2"]
    m.end("m1")
    assert m.under_way() == ["m0", "m2", "m3"]
    m.current.settings = dataclasses.replace(m.current.settings, max_in_flight=1)
    m.end("m0")
    assert m.under_way() == ["m2", "m3"], "a lower max_in_flight starts nothing until under it"
    m.end("m2")
    m.end("m3")
    assert m.under_way() == ["m4"]


def test_the_dispatcher_starts_nothing_new_while_the_circuit_is_open() -> None:
    m = DispatchModel(ordering="none", max_in_flight=2)
    m.add(0, "m0", "m1", "m2")
    m.breaker.open("HTTP 503")
    m.end("m0")
    m.end("m1")
    assert m.under_way() == [], "an open circuit starts nothing but its probe"
    m.clock.advance(4.0)
    assert m.under_way() == ["m2"], "the probe timer starts one new record as the probe"


def test_a_revocation_waits_for_what_is_on_the_wire_and_cancels_the_rest() -> None:
    m = DispatchModel(ordering="none", max_in_flight=2)
    m.add(0, "m0", "m1", "m2")
    on_wire = next(u for u, _ in m.started if _id_of(u) == "m0")
    on_wire.sending = True
    waiting = m.dispatcher.revoke([(T, 0)], lost=False)
    assert len(waiting) == 1 and not waiting[0].called
    waiting_unit = next(u for u, _ in m.started if _id_of(u) == "m1")
    assert waiting_unit.cancelled, "a unit not on the wire (waiting to retry) is cancelled at once"
    assert not on_wire.cancelled
    m.end("m0")
    assert waiting[0].called, "the revocation is told when the request on the wire ended"
    assert [_id_of(u) for u, _ in m.started] == ["m0", "m1"], "the queued m2 never starts"


def test_a_unit_that_ends_at_once_does_not_nest_the_pump() -> None:
    m = DispatchModel(ordering="none", max_in_flight=1)
    m.start = lambda unit: succeed(None)  # type: ignore[method-assign]
    m.dispatcher = Dispatcher(m.clock, m.current, m.breaker, m.start)
    m.add(0, *[f"m{i}" for i in range(3000)])  # would pass the recursion limit if nested
    assert m.dispatcher.under_way == 0
    assert m.dispatcher.scheduler.take() is None


# -- attempts: the job's way to the wire ------------------------------------------------------

def make_attempts(**more: Any) -> tuple[Attempts, FakeAgent, Clock, Current]:
    clock = Clock()
    agent = FakeAgent()
    current = Current(Settings.of(make_job(**more)))
    attempts = Attempts(clock, HTTPSender(clock, agent=agent), Metrics(), current)
    return attempts, agent, clock, current


@dataclasses.dataclass
class Sent:
    sending: bool = False
    cancelled: bool = False


def test_an_attempt_is_signed_anew_and_marks_its_unit_on_the_wire() -> None:
    secret = WEBHOOK_SECRET
    attempts, agent, clock, current = make_attempts(signing={"secret": secret})
    clock.advance(time.time())  # signatures are checked against the wall clock
    request = current.settings.builder.build({"id": "x"}, "people:0:0:0")
    unit = Sent()
    answers: list[Any] = []
    attempts.send(request, unit).addCallback(answers.append)
    assert unit.sending
    [first] = agent.open()
    first.answer(200)
    assert not unit.sending and answers[0].status == 200
    clock.advance(7)
    attempts.send(request, unit)
    second = agent.open()[0]
    assert first.header("webhook-id") and first.header("webhook-id") == second.header("webhook-id"), \
        "a retry keeps its id"
    assert int(second.header("webhook-timestamp") or 0) - int(first.header("webhook-timestamp") or 0) == 7
    Webhook(secret).verify(second.body or b"", {k: second.header(k) or "" for k in
                                                ("webhook-id", "webhook-timestamp", "webhook-signature")})


def test_attempts_keep_the_jobs_pace_and_take_its_settings_afresh() -> None:
    attempts, agent, clock, current = make_attempts(ratelimit=2.0)
    request = current.settings.builder.build({"id": "x"})
    for _ in range(3):
        attempts.send(request, Sent())
    assert len(agent.requests) == 1
    clock.advance(1.9)
    assert len(agent.requests) == 1
    clock.advance(0.1)
    assert len(agent.requests) == 2
    job = current.settings.job
    current.settings = Settings.of(dataclasses.replace(job, definition={**job.definition, "ratelimit": 0.5}))
    attempts.send(request, Sent())  # an attempt under the new settings
    clock.advance(2.0)
    assert len(agent.requests) == 3, "the attempt waiting goes at the pace it was given"
    clock.advance(0.5)
    assert len(agent.requests) == 4, "the next at the new pace, from when the last one went"
    attempts.stop()
