"""Unit and stateful tests of the delivery core's pure parts (SPEC §5, §11 "Ordering and concurrency").

:class:`restconsumer.delivery.ledger.Ledger` says which fetched messages are unfinished and what may
be committed; :class:`restconsumer.delivery.ordering.Scheduler` says which records may be sent now.
Neither touches Twisted, so they are tested here directly: one test per behaviour, then a
hypothesis state machine that drives both the way the service does (assign, revoke, lose,
fetch, start, finish, fail, acknowledge, commit in random interleavings) against a model of
the truth — issue 8, "What it must show" point 1.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from restconsumer.base.types import TP
from restconsumer.delivery.ledger import Ledger, Ticket
from restconsumer.delivery.ordering import Scheduler

P0: TP = ("orders", 0)
P1: TP = ("orders", 1)
Q0: TP = ("people", 0)


def assigned_ledger(*tps: TP) -> Ledger:
    """A ledger with ``tps`` assigned."""
    ledger = Ledger()
    for tp in tps:
        ledger.assign(tp)
    return ledger


def fetch_all(ledger: Ledger, tp: TP, *offsets: int) -> list[Ticket]:
    """Fetch ``offsets`` of ``tp``, each of which must be accepted; their tickets."""
    tickets = []
    for offset in offsets:
        ticket = ledger.fetched(tp, offset)
        assert ticket is not None, offset
        tickets.append(ticket)
    return tickets


# --- Ledger ------------------------------------------------------------------------------------


def test_every_assignment_gets_a_new_epoch() -> None:
    """Epochs are distinct and increasing, across partitions and re-assignments."""
    ledger = Ledger()
    epochs = [ledger.assign(P0), ledger.assign(P1), ledger.assign(P0)]
    ledger.revoke(P0)
    epochs.append(ledger.assign(P0))
    assert epochs == sorted(set(epochs))
    assert ledger.fetched(P0, 0) == Ticket(P0, epochs[-1], 0)


def test_assigned_and_partitions() -> None:
    """assign/revoke maintain the set of assigned partitions."""
    ledger = assigned_ledger(P0, P1)
    assert ledger.assigned(P0) and ledger.assigned(P1) and not ledger.assigned(Q0)
    assert sorted(ledger.partitions()) == [P0, P1]
    ledger.revoke(P0)
    assert not ledger.assigned(P0)
    assert ledger.partitions() == [P1]


def test_commit_point_with_nothing_fetched() -> None:
    """Nothing fetched: nothing to commit, for an assigned partition and an unknown one."""
    ledger = assigned_ledger(P0)
    assert ledger.commit_point(P0) is None
    assert ledger.commit_point(Q0) is None
    assert ledger.take_due() == {}
    assert ledger.unfinished(P0) == 0
    assert ledger.window(P0) == 0
    assert ledger.revoke(P0) is None


def test_revoke_of_an_unassigned_partition() -> None:
    """Revoking a partition that is not ours is harmless and commits nothing."""
    ledger = Ledger()
    assert ledger.revoke(P0) is None
    assert ledger.partitions() == []


def test_commit_point_is_lowest_unfinished() -> None:
    """While a message is unfinished the commit point is its offset."""
    ledger = assigned_ledger(P0)
    fetch_all(ledger, P0, 10, 11, 12)
    assert ledger.commit_point(P0) == 10
    assert ledger.unfinished(P0) == 3


def test_finishing_in_order_moves_the_commit_point() -> None:
    """Each finished head moves the point to the next unfinished, then past the last one."""
    ledger = assigned_ledger(P0)
    first, second = fetch_all(ledger, P0, 10, 11)
    assert ledger.finished(first)
    assert ledger.commit_point(P0) == 11
    assert ledger.take_due() == {P0: 11}
    assert ledger.finished(second)
    assert ledger.commit_point(P0) == 12
    assert ledger.take_due() == {P0: 12}
    assert ledger.unfinished(P0) == 0


def test_finishing_out_of_order_waits_for_the_lowest() -> None:
    """Later messages finished first do not move the point until the lowest one is done."""
    ledger = assigned_ledger(P0)
    a, b, c, d = fetch_all(ledger, P0, 1, 2, 3, 4)
    assert ledger.finished(c)
    assert ledger.finished(b)
    assert ledger.commit_point(P0) == 1
    assert ledger.unfinished(P0) == 2
    assert ledger.take_due() == {}
    assert ledger.finished(a)
    assert ledger.commit_point(P0) == 4  # d is still unfinished
    assert ledger.unfinished(P0) == 1
    assert ledger.take_due() == {P0: 4}
    assert ledger.finished(d)
    assert ledger.commit_point(P0) == 5
    assert ledger.unfinished(P0) == 0


def test_finishing_the_last_before_the_first() -> None:
    """All but the first finished: the point jumps past the last once the first is done."""
    ledger = assigned_ledger(P0)
    tickets = fetch_all(ledger, P0, *range(100, 110))
    for ticket in reversed(tickets[1:]):
        assert ledger.finished(ticket)
        assert ledger.commit_point(P0) == 100
    assert ledger.finished(tickets[0])
    assert ledger.commit_point(P0) == 110
    assert ledger.take_due() == {P0: 110}


def test_gaps_like_compaction() -> None:
    """Offsets missing from the log (compaction, transaction markers) do not hold the point."""
    ledger = assigned_ledger(P0)
    a, b, c = fetch_all(ledger, P0, 5, 9, 20)
    assert ledger.window(P0) == 16
    assert ledger.finished(a)
    assert ledger.commit_point(P0) == 9
    assert ledger.finished(c)
    assert ledger.commit_point(P0) == 9
    assert ledger.finished(b)
    assert ledger.commit_point(P0) == 21


def test_fetch_after_everything_finished() -> None:
    """With nothing unfinished, a newly fetched message becomes the commit point."""
    ledger = assigned_ledger(P0)
    (a,) = fetch_all(ledger, P0, 3)
    ledger.finished(a)
    assert ledger.commit_point(P0) == 4
    fetch_all(ledger, P0, 7)
    assert ledger.commit_point(P0) == 7
    assert ledger.window(P0) == 1


def test_duplicate_and_old_offsets_are_dropped() -> None:
    """An offset at or before one already fetched in this assignment gets no ticket."""
    ledger = assigned_ledger(P0)
    (a,) = fetch_all(ledger, P0, 5)
    assert ledger.fetched(P0, 5) is None
    assert ledger.fetched(P0, 4) is None
    assert ledger.unfinished(P0) == 1
    ledger.finished(a)
    assert ledger.fetched(P0, 5) is None  # finished, still not delivered twice
    assert ledger.commit_point(P0) == 6
    assert ledger.fetched(P0, 6) is not None


def test_messages_of_unassigned_partitions_are_dropped() -> None:
    """Never assigned, or revoked while the message was on its way: no ticket."""
    ledger = assigned_ledger(P0)
    assert ledger.fetched(Q0, 0) is None
    ledger.revoke(P0)
    assert ledger.fetched(P0, 0) is None
    assert ledger.partitions() == []


def test_revoke_returns_the_commit_point() -> None:
    """Revoking gives the offset to commit: the lowest unfinished one."""
    ledger = assigned_ledger(P0, P1)
    a, _b, c = fetch_all(ledger, P0, 1, 2, 3)
    ledger.finished(a)
    ledger.finished(c)
    assert ledger.revoke(P0) == 2
    (d,) = fetch_all(ledger, P1, 7)
    ledger.finished(d)
    assert ledger.revoke(P1) == 8


def test_old_epoch_is_ignored_after_revoke() -> None:
    """After revoke, finishing a ticket of that assignment is refused and changes nothing."""
    ledger = assigned_ledger(P0, P1)
    (old,) = fetch_all(ledger, P0, 1)
    fetch_all(ledger, P1, 1)
    assert ledger.current(old)
    ledger.revoke(P0)
    ledger.take_due()
    assert not ledger.current(old)
    assert not ledger.finished(old)
    assert ledger.take_due() == {}
    assert ledger.partitions() == [P1]
    assert ledger.commit_point(P1) == 1


def test_stale_epoch_after_revoke_and_reassign() -> None:
    """A ticket of an earlier assignment is ignored by the next one, even for the same offset."""
    ledger = Ledger()
    first = ledger.assign(P0)
    old_one, old_two = fetch_all(ledger, P0, 1, 2)
    ledger.finished(old_one)
    assert ledger.revoke(P0) == 2
    second = ledger.assign(P0)
    assert second != first
    assert ledger.commit_point(P0) is None
    (new_two,) = fetch_all(ledger, P0, 2)  # re-fetched from the committed offset
    assert new_two.epoch == second and old_two.epoch == first
    assert not ledger.current(old_two)
    assert not ledger.finished(old_two)
    assert ledger.commit_point(P0) == 2
    assert ledger.unfinished(P0) == 1
    assert ledger.take_due() == {}
    assert ledger.finished(new_two)
    assert ledger.commit_point(P0) == 3


def test_assign_again_without_revoke_starts_afresh() -> None:
    """A second assign of an assigned partition is a new assignment; the old tickets go stale."""
    ledger = assigned_ledger(P0)
    (old,) = fetch_all(ledger, P0, 4)
    ledger.assign(P0)
    assert ledger.commit_point(P0) is None
    assert not ledger.finished(old)
    assert ledger.fetched(P0, 4) is not None


def test_take_due_reports_only_moves() -> None:
    """take_due gives each partition's latest moved point once; revoke and assign clear it."""
    ledger = assigned_ledger(P0, P1)
    a0, a1 = fetch_all(ledger, P0, 0, 1)
    (b0,) = fetch_all(ledger, P1, 0)
    ledger.finished(a0)
    ledger.finished(a1)
    ledger.finished(b0)
    assert ledger.take_due() == {P0: 2, P1: 1}
    assert ledger.take_due() == {}
    (c,) = fetch_all(ledger, P0, 2)
    ledger.finished(c)
    ledger.revoke(P0)
    assert ledger.take_due() == {}
    (d,) = fetch_all(ledger, P1, 1)
    ledger.finished(d)
    ledger.assign(P1)
    assert ledger.take_due() == {}


def test_window() -> None:
    """Distance from the lowest unfinished offset to the last fetched one, 0 when none is unfinished."""
    ledger = assigned_ledger(P0)
    assert ledger.window(P0) == 0
    assert ledger.window(Q0) == 0
    a, b, _c = fetch_all(ledger, P0, 10, 11, 15)
    assert ledger.window(P0) == 6
    ledger.finished(b)
    assert ledger.window(P0) == 6
    ledger.finished(a)
    assert ledger.window(P0) == 1
    ledger.finished(_c)
    assert ledger.window(P0) == 0


def test_unfinished_counts_messages_not_offsets() -> None:
    """unfinished counts messages, whatever the gaps between their offsets."""
    ledger = assigned_ledger(P0)
    a, b, _c = fetch_all(ledger, P0, 0, 50, 100)
    assert ledger.unfinished(P0) == 3
    ledger.finished(b)
    assert ledger.unfinished(P0) == 2
    ledger.finished(a)
    assert ledger.unfinished(P0) == 1
    assert ledger.unfinished(Q0) == 0


def test_finishing_twice_is_harmless() -> None:
    """A ticket finished twice (say a cancelled request that also answered) counts once.

    The failure this guards against: the second call files the offset, already gone from
    ``fetched``, among the finished-out-of-order ones for ever, so ``unfinished`` goes to -1
    and then under-counts every later message (a partition that looks drained while a
    request is under way).
    """
    ledger = assigned_ledger(P0)
    (a,) = fetch_all(ledger, P0, 1)
    assert ledger.finished(a)
    assert ledger.finished(a)
    assert ledger.unfinished(P0) == 0
    (b,) = fetch_all(ledger, P0, 2)
    assert ledger.unfinished(P0) == 1
    assert ledger.commit_point(P0) == 2
    ledger.finished(b)
    assert ledger.unfinished(P0) == 0
    assert ledger.commit_point(P0) == 3


def test_finishing_twice_out_of_order_is_harmless() -> None:
    """A non-head ticket finished twice counts once as well."""
    ledger = assigned_ledger(P0)
    a, b = fetch_all(ledger, P0, 1, 2)
    ledger.finished(b)
    ledger.finished(b)
    assert ledger.unfinished(P0) == 1
    ledger.finished(a)
    assert ledger.unfinished(P0) == 0
    assert ledger.commit_point(P0) == 3


# --- Scheduler ---------------------------------------------------------------------------------


def take_all(scheduler: Scheduler[str]) -> list[tuple[Hashable | None, str]]:
    """Every unit that may start now, in the order given."""
    taken = []
    while (next_unit := scheduler.take()) is not None:
        taken.append(next_unit)
    return taken


def test_take_from_an_empty_scheduler() -> None:
    """Nothing queued: nothing to start."""
    scheduler: Scheduler[str] = Scheduler(4)
    assert scheduler.take() is None
    assert scheduler.in_flight == 0


def test_one_unit_per_group_in_add_order() -> None:
    """A group's units start one at a time, each after the previous one is done."""
    scheduler: Scheduler[str] = Scheduler(10)
    for unit in ["a", "b", "c"]:
        scheduler.add(P0, unit)
    assert take_all(scheduler) == [(P0, "a")]
    scheduler.done(P0)
    assert take_all(scheduler) == [(P0, "b")]
    scheduler.done(P0)
    assert take_all(scheduler) == [(P0, "c")]
    scheduler.done(P0)
    assert take_all(scheduler) == []
    assert scheduler.in_flight == 0


def test_a_unit_added_while_its_group_is_busy_waits() -> None:
    """A unit added while its group's unit is under way starts only after done()."""
    scheduler: Scheduler[str] = Scheduler(10)
    scheduler.add(P0, "a")
    assert scheduler.take() == (P0, "a")
    scheduler.add(P0, "b")
    assert scheduler.take() is None
    scheduler.done(P0)
    assert scheduler.take() == (P0, "b")


def test_groups_go_side_by_side() -> None:
    """Heads of different groups start together, in the order they became ready."""
    scheduler: Scheduler[str] = Scheduler(10)
    scheduler.add(P0, "a0")
    scheduler.add(P1, "b0")
    scheduler.add(P0, "a1")
    scheduler.add(Q0, "c0")
    assert take_all(scheduler) == [(P0, "a0"), (P1, "b0"), (Q0, "c0")]
    assert scheduler.in_flight == 3
    scheduler.done(P1)
    assert take_all(scheduler) == []
    scheduler.done(P0)
    assert take_all(scheduler) == [(P0, "a1")]


def test_ungrouped_units_go_in_parallel() -> None:
    """Units without a group never wait for one another, only for the bound."""
    scheduler: Scheduler[str] = Scheduler(10)
    for unit in ["a", "b", "c"]:
        scheduler.add(None, unit)
    assert take_all(scheduler) == [(None, "a"), (None, "b"), (None, "c")]
    assert scheduler.in_flight == 3
    scheduler.done(None)
    assert scheduler.in_flight == 2


def test_max_in_flight_bound() -> None:
    """No more than max_in_flight units under way; done() makes room for the next."""
    scheduler: Scheduler[str] = Scheduler(2)
    scheduler.add(None, "u0")
    scheduler.add(P0, "a")
    scheduler.add(P1, "b")
    scheduler.add(None, "u1")
    assert take_all(scheduler) == [(None, "u0"), (P0, "a")]
    assert scheduler.take() is None
    assert scheduler.in_flight == 2
    scheduler.done(P0)
    assert take_all(scheduler) == [(P1, "b")]
    scheduler.done(None)
    assert take_all(scheduler) == [(None, "u1")]
    assert scheduler.in_flight == 2


def test_max_in_flight_of_one_is_strict_order_across_groups() -> None:
    """With a bound of 1 everything goes one at a time, in the order it became ready."""
    scheduler: Scheduler[str] = Scheduler(1)
    scheduler.add(P0, "a")
    scheduler.add(None, "u")
    scheduler.add(P1, "b")
    order = []
    while (next_unit := scheduler.take()) is not None:
        assert scheduler.take() is None
        order.append(next_unit[1])
        scheduler.done(next_unit[0])
    assert order == ["a", "u", "b"]


def test_done_releases_the_next_of_its_group_only() -> None:
    """done() of one group does not start another group's waiting unit twice."""
    scheduler: Scheduler[str] = Scheduler(10)
    scheduler.add(P0, "a0")
    scheduler.add(P0, "a1")
    scheduler.add(P1, "b0")
    scheduler.add(P1, "b1")
    assert take_all(scheduler) == [(P0, "a0"), (P1, "b0")]
    scheduler.done(P1)
    assert take_all(scheduler) == [(P1, "b1")]
    scheduler.done(P0)
    assert take_all(scheduler) == [(P0, "a1")]


def test_drop_removes_queued_units() -> None:
    """drop() returns the queued units it removed; the rest keep their order."""
    scheduler: Scheduler[str] = Scheduler(10)
    for unit in ["p0-1", "p0-2", "p0-3"]:
        scheduler.add(P0, unit)
    scheduler.add(P1, "p1-1")
    scheduler.add(None, "p0-free")
    scheduler.add(None, "p1-free")
    assert scheduler.take() == (P0, "p0-1")
    dropped = scheduler.drop(lambda unit: unit.startswith("p0"))
    assert sorted(dropped) == ["p0-2", "p0-3", "p0-free"]
    assert scheduler.in_flight == 1
    assert take_all(scheduler) == [(P1, "p1-1"), (None, "p1-free")]
    scheduler.done(P0)
    assert scheduler.take() is None  # the in-flight unit was not dropped, nothing follows it


def test_drop_part_of_a_group() -> None:
    """Dropping some units of a group keeps the others in order behind its head."""
    scheduler: Scheduler[str] = Scheduler(10)
    for unit in ["a", "b", "c", "d"]:
        scheduler.add(P0, unit)
    assert scheduler.drop(lambda unit: unit in {"a", "c"}) == ["a", "c"]
    assert take_all(scheduler) == [(P0, "b")]
    scheduler.done(P0)
    assert take_all(scheduler) == [(P0, "d")]


def test_drop_nothing() -> None:
    """A predicate that matches nothing changes nothing."""
    scheduler: Scheduler[str] = Scheduler(10)
    scheduler.add(P0, "a")
    assert scheduler.drop(lambda unit: False) == []
    assert take_all(scheduler) == [(P0, "a")]


def test_drop_then_add_again_keeps_one_unit_per_group() -> None:
    """A partition revoked with its units queued, then re-assigned: still one at a time.

    The failure this guards against: drop() empties the group but leaves its entry in the
    ready queue, add() queues a second entry for it, and take() starts both "b" and "c".
    """
    scheduler: Scheduler[str] = Scheduler(10)
    scheduler.add(P0, "a")
    assert scheduler.drop(lambda unit: unit == "a") == ["a"]
    scheduler.add(P0, "b")
    scheduler.add(P0, "c")
    assert take_all(scheduler) == [(P0, "b")]
    assert scheduler.in_flight == 1
    scheduler.done(P0)
    assert take_all(scheduler) == [(P0, "c")]


def test_drop_while_the_group_is_busy_then_add() -> None:
    """Units dropped behind a unit under way: new units still wait for that unit."""
    scheduler: Scheduler[str] = Scheduler(10)
    scheduler.add(P0, "a")
    scheduler.add(P0, "b")
    assert scheduler.take() == (P0, "a")
    assert scheduler.drop(lambda unit: unit == "b") == ["b"]
    scheduler.add(P0, "c")
    assert scheduler.take() is None
    scheduler.done(P0)
    assert take_all(scheduler) == [(P0, "c")]


# --- The state machine -------------------------------------------------------------------------

PARTITIONS: list[TP] = [P0, P1, Q0]
KEYS: list[str | None] = [None, "k1", "k2"]


@dataclass(frozen=True)
class Unit:
    """A record as the service schedules it: its ledger ticket and its order group."""

    ticket: Ticket
    group: Hashable | None


@dataclass
class Assignment:
    """The model of one assignment of a partition: what was fetched and what is finished."""

    epoch: int
    #: Where the consumer's next fetch starts (the committed offset when assigned).
    position: int
    fetched: list[int] = field(default_factory=list)
    finished: set[int] = field(default_factory=set)
    #: The highest commit point seen (from commit_point or revoke) in this assignment.
    highest_point: int | None = None
    #: The last offset committed to Kafka in this assignment.
    committed: int | None = None

    def unfinished(self) -> list[int]:
        """Fetched offsets not finished, lowest first."""
        return [offset for offset in self.fetched if offset not in self.finished]

    def expected_point(self) -> int | None:
        """The true commit point: lowest unfinished, else one past the last fetched."""
        unfinished = self.unfinished()
        if unfinished:
            return unfinished[0]
        return self.fetched[-1] + 1 if self.fetched else None

    def safe(self, point: int) -> bool:
        """Whether committing ``point`` skips no unfinished message of this assignment."""
        return all(offset in self.finished for offset in self.fetched if offset < point)

    def see(self, point: int | None) -> None:
        """A commit point observed: it must be safe and never behind an earlier one."""
        if point is None:
            assert not self.fetched
            return
        assert self.safe(point), (point, self.fetched, self.finished)
        assert self.highest_point is None or point >= self.highest_point, (point, self.highest_point)
        self.highest_point = point


class LedgerMachine(RuleBasedStateMachine):
    """The Kafka loop and the workers of one job, driving a Ledger and a Scheduler at random."""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger()
        self.scheduler: Scheduler[Unit] = Scheduler(1)
        self.ordering = "partition"
        #: Current assignments by partition.
        self.assignments: dict[TP, Assignment] = {}
        #: Offsets committed to Kafka (what a new assignment starts from).
        self.kafka_committed: dict[TP, int] = {}
        #: Every epoch ever handed out, and the ones that are over.
        self.epochs: list[int] = []
        self.old_epochs: set[int] = set()
        #: Units queued in the scheduler, in add order; units under way; dead letters
        #: awaiting Kafka's acknowledgement (their unit has ended, their ticket is unfinished).
        self.queued: list[Unit] = []
        self.in_flight: list[Unit] = []
        self.awaiting_ack: list[Ticket] = []
        #: Tickets of assignments that are over, finished or not.
        self.stale: list[Ticket] = []

    @initialize(
        max_in_flight=st.sampled_from([1, 2, 2, 3, 8]),
        ordering=st.sampled_from(["partition", "partition", "partition", "key", "none"]),
    )
    def configure(self, max_in_flight: int, ordering: str) -> None:
        """The job's ``max_in_flight`` and ``ordering`` (SPEC §11)."""
        self.scheduler = Scheduler(max_in_flight)
        self.ordering = ordering

    # -- helpers ---------------------------------------------------------------------------

    def group_of(self, tp: TP, key: str | None) -> Hashable | None:
        """A record's order group under the job's ordering."""
        if self.ordering == "partition":
            return tp
        if self.ordering == "key":
            return None if key is None else (tp, key)
        return None

    def busy_groups(self) -> set[Hashable]:
        """Groups with a unit under way."""
        return {unit.group for unit in self.in_flight if unit.group is not None}

    def startable(self) -> list[Unit]:
        """Queued units that may start now according to the model (bound aside)."""
        busy = self.busy_groups()
        return [unit for unit in self.queued if unit.group is None or unit.group not in busy]

    def snapshot(self) -> tuple[object, ...]:
        """Everything observable about the ledger, except take_due."""
        return (
            sorted(self.ledger.partitions()),
            [
                (self.ledger.commit_point(tp), self.ledger.unfinished(tp), self.ledger.window(tp))
                for tp in PARTITIONS
            ],
        )

    def end_assignment(self, tp: TP, commit: bool) -> None:
        """Revoke (commit the point) or lose (commit nothing) ``tp``, as the service does."""
        assignment = self.assignments.pop(tp)
        point = self.ledger.revoke(tp)
        assert point == assignment.expected_point()
        assignment.see(point)
        if commit and point is not None:
            self.kafka_committed[tp] = point
        self.old_epochs.add(assignment.epoch)
        self.stale.extend(Ticket(tp, assignment.epoch, offset) for offset in assignment.fetched)
        dropped = self.scheduler.drop(lambda unit: unit.ticket.tp == tp)
        expected = [unit for unit in self.queued if unit.ticket.tp == tp]
        assert sorted(dropped, key=repr) == sorted(expected, key=repr)
        self.queued = [unit for unit in self.queued if unit.ticket.tp != tp]
        assert not self.ledger.assigned(tp)

    def finish_ticket(self, ticket: Ticket) -> None:
        """Tell the ledger ``ticket`` is done and check what it says against the model."""
        assignment = self.assignments.get(ticket.tp)
        current = assignment is not None and assignment.epoch == ticket.epoch
        assert self.ledger.current(ticket) == current
        if current:
            assert assignment is not None
            assert self.ledger.finished(ticket)
            assignment.finished.add(ticket.offset)
        else:
            assert ticket.epoch in self.old_epochs
            before = self.snapshot()
            assert not self.ledger.finished(ticket)
            assert self.snapshot() == before

    # -- steps the rules share --------------------------------------------------------------

    def assign_partition(self, tp: TP) -> None:
        """The group gives us ``tp``; fetching starts at its committed offset."""
        epoch = self.ledger.assign(tp)
        assert all(epoch > earlier for earlier in self.epochs)
        self.epochs.append(epoch)
        self.assignments[tp] = Assignment(epoch, self.kafka_committed.get(tp, 0))
        assert self.ledger.assigned(tp)
        assert self.ledger.commit_point(tp) is None

    def fetch_with(self, tp: TP, gap: int, key: str | None) -> None:
        """Fetch the message ``gap`` offsets past ``tp``'s position, with ``key``; queue its unit."""
        assignment = self.assignments[tp]
        offset = assignment.position + gap
        ticket = self.ledger.fetched(tp, offset)
        assert ticket == Ticket(tp, assignment.epoch, offset)
        assignment.position = offset + 1
        assignment.fetched.append(offset)
        unit = Unit(ticket, self.group_of(tp, key))
        self.scheduler.add(unit.group, unit)
        self.queued.append(unit)

    def start_one(self) -> bool:
        """A worker takes the next unit that may start; whether there was one."""
        taken = self.scheduler.take()
        may_start = self.startable()
        if taken is None:
            # Nothing may start: the bound is reached, or every queued unit waits for its group.
            assert len(self.in_flight) >= self.scheduler.max_in_flight or not may_start, may_start
            return False
        group, unit = taken
        assert group == unit.group
        assert len(self.in_flight) < self.scheduler.max_in_flight
        assert unit in may_start, (unit, self.in_flight)
        if group is not None:
            first_of_group = next(u for u in self.queued if u.group == group)
            assert unit == first_of_group, (unit, first_of_group)
        assert self.ledger.current(unit.ticket)
        self.queued.remove(unit)
        self.in_flight.append(unit)
        return True

    # -- rules -----------------------------------------------------------------------------

    @precondition(lambda self: len(self.assignments) < len(PARTITIONS))
    @rule(data=st.data())
    def assign(self, data: st.DataObject) -> None:
        """A partition we do not have is assigned to us."""
        unassigned = [tp for tp in PARTITIONS if tp not in self.assignments]
        self.assign_partition(data.draw(st.sampled_from(unassigned)))

    @precondition(lambda self: self.assignments)
    @rule(
        data=st.data(),
        commit=st.booleans(),
        reassign=st.booleans(),
        refetch=st.integers(min_value=0, max_value=4),
        key=st.sampled_from(KEYS),
    )
    def revoke(
        self, data: st.DataObject, commit: bool, reassign: bool, refetch: int, key: str | None
    ) -> None:
        """A partition is revoked (its point committed) or lost (nothing committed).

        With ``reassign`` it comes straight back to us, as in an eager rebalance, and the
        consumer at once fetches ``refetch`` messages from the committed offset (some of
        them, likely, the ones just dropped). Without, a message of it that was on its way
        arrives and is dropped.
        """
        tp = data.draw(st.sampled_from(sorted(self.assignments)))
        position = self.assignments[tp].position
        self.end_assignment(tp, commit=commit)
        if reassign:
            self.assign_partition(tp)
            for _ in range(refetch):
                self.fetch_with(tp, 0, key)
        else:
            before = self.snapshot()
            assert self.ledger.fetched(tp, position) is None
            assert self.snapshot() == before

    @precondition(lambda self: self.assignments)
    @rule(
        data=st.data(),
        count=st.integers(min_value=1, max_value=4),
        gap=st.sampled_from([0, 0, 1, 3]),
        keys=st.lists(st.sampled_from(KEYS), min_size=4, max_size=4),
        redelivered=st.booleans(),
    )
    def fetch(
        self, data: st.DataObject, count: int, gap: int, keys: list[str | None], redelivered: bool
    ) -> None:
        """A batch of one partition's next messages arrives, maybe past a compacted gap.

        With ``redelivered``, an offset already fetched in this assignment comes again and is
        dropped without changing anything.
        """
        tp = data.draw(st.sampled_from(sorted(self.assignments)))
        for index in range(count):
            self.fetch_with(tp, gap if index == 0 else 0, keys[index])
        if redelivered:
            offset = data.draw(st.integers(min_value=0, max_value=self.assignments[tp].fetched[-1]))
            before = self.snapshot()
            assert self.ledger.fetched(tp, offset) is None
            assert self.snapshot() == before

    @rule(greedy=st.booleans())
    def start(self, greedy: bool) -> None:
        """Workers take one unit, or (greedy) all that may start, as the service does after an event."""
        while self.start_one() and greedy:
            pass

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data(), delivered=st.booleans())
    def end_unit(self, data: st.DataObject, delivered: bool) -> None:
        """A unit under way ends — any of them, whatever its epoch.

        Delivered: its message is finished. Otherwise it was dead-lettered (or cancelled): its
        group goes on at once, its message is finished only when Kafka acknowledges the
        dead letter.
        """
        unit = data.draw(st.sampled_from(self.in_flight))
        self.in_flight.remove(unit)
        self.scheduler.done(unit.group)
        if delivered:
            self.finish_ticket(unit.ticket)
        else:
            self.awaiting_ack.append(unit.ticket)

    @precondition(lambda self: self.awaiting_ack)
    @rule(data=st.data())
    def acknowledge(self, data: st.DataObject) -> None:
        """Kafka acknowledges a dead letter: its message is finished."""
        ticket = data.draw(st.sampled_from(self.awaiting_ack))
        self.awaiting_ack.remove(ticket)
        self.finish_ticket(ticket)

    @precondition(lambda self: self.stale)
    @rule(data=st.data())
    def finish_stale(self, data: st.DataObject) -> None:
        """A ticket of an assignment that is over (finished before or not) is finished again."""
        ticket = data.draw(st.sampled_from(self.stale))
        self.finish_ticket(ticket)

    @rule()
    def commit(self) -> None:
        """The Kafka loop commits the points that moved."""
        due = self.ledger.take_due()
        for tp, point in due.items():
            assignment = self.assignments.get(tp)
            assert assignment is not None, f"due for unassigned {tp}"
            truth = assignment.expected_point()
            # Behind the ledger's commit point when a message fetched after a gap is now the
            # lowest unfinished one; either is safe.
            assert truth is not None and point <= truth, (point, truth)
            assert assignment.safe(point), (point, assignment.fetched, assignment.finished)
            assert assignment.committed is None or point > assignment.committed
            assignment.committed = point
            self.kafka_committed[tp] = point

    # -- invariants ------------------------------------------------------------------------

    def check(self) -> None:
        """All the invariants, for runs driven by hand."""
        self.ledger_matches_model()
        self.scheduler_matches_model()
        self.queued_units_are_current()

    @invariant()
    def ledger_matches_model(self) -> None:
        """Assigned partitions, commit points, unfinished counts and windows are the truth."""
        assert sorted(self.ledger.partitions()) == sorted(self.assignments)
        for tp in PARTITIONS:
            assignment = self.assignments.get(tp)
            if assignment is None:
                assert self.ledger.commit_point(tp) is None
                assert self.ledger.unfinished(tp) == 0
                assert self.ledger.window(tp) == 0
                continue
            point = self.ledger.commit_point(tp)
            assert point == assignment.expected_point()
            assignment.see(point)
            unfinished = assignment.unfinished()
            assert self.ledger.unfinished(tp) == len(unfinished)
            window = assignment.fetched[-1] - unfinished[0] + 1 if unfinished else 0
            assert self.ledger.window(tp) == window

    @invariant()
    def scheduler_matches_model(self) -> None:
        """Counts agree, the bound holds, and no order group has two units under way."""
        assert self.scheduler.in_flight == len(self.in_flight)
        assert len(self.in_flight) <= self.scheduler.max_in_flight
        groups = [unit.group for unit in self.in_flight if unit.group is not None]
        assert len(groups) == len(set(groups)), self.in_flight
        if self.ordering == "partition":
            tps = [unit.ticket.tp for unit in self.in_flight]
            assert len(tps) == len(set(tps)), "two workers on one partition"

    @invariant()
    def queued_units_are_current(self) -> None:
        """Nothing of a revoked assignment waits to be sent."""
        for unit in self.queued:
            assert self.ledger.current(unit.ticket)


LedgerMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLedgerMachine = LedgerMachine.TestCase


@pytest.mark.parametrize("ordering", ["partition", "key", "none"])
def test_machine_smoke(ordering: str) -> None:
    """One fixed run of the machine per ordering, so a broken rule shows without hypothesis."""
    machine = LedgerMachine()
    machine.configure(max_in_flight=2, ordering=ordering)
    machine.assign_partition(P0)
    machine.assign_partition(P1)
    for key in ["k1", None, "k1", "k2"]:
        machine.fetch_with(P0, 0, key)
        machine.fetch_with(P1, 1, key)
    for _ in range(3):
        machine.start_one()
        machine.check()
    while machine.in_flight or machine.queued:
        machine.start_one()
        if machine.in_flight:
            unit = machine.in_flight[-1]
            machine.in_flight.remove(unit)
            machine.scheduler.done(unit.group)
            machine.finish_ticket(unit.ticket)
        machine.commit()
        machine.check()
    assert machine.kafka_committed == {P0: 4, P1: 8}
    machine.teardown()
