"""A rolling restart of three instances under a steady load (issue 22, "What it must show" 1
and 2; SPEC §6 "Rebalancing moves only what moves", "Draining on SIGTERM"), on the real
broker, Redis and HTTP.

The scenario lives in ``bench/rolling.py`` (which prints the same run's figures, with and
without static membership, beside their targets); here it runs once, without
``--instance-id``, and what must hold is asserted: nothing lost, no per-key order
violation, and while an instance leaves and comes back the partitions the two others keep
are never revoked. Latency and duplicates are printed, not judged (figures belong to the
bench, on a shared machine).
"""

from __future__ import annotations

from collections.abc import Callable

from bench.rolling import (
    Delivery,
    Figures,
    Settings,
    describe,
    figures,
    kept_but_revoked,
    lost,
    order_violations,
    revoked_not_moved,
    run,
)
from tests.infra.kafka import KafkaBroker
from tests.infra.service import ServiceProcess

Start = Callable[..., ServiceProcess]


def delivery(key: str, seq: int, at: float = 0.0) -> Delivery:
    """A delivery of ``key``'s ``seq`` (the other fields do not matter to the order)."""
    return Delivery(at, key, seq, 0.0, 0, seq)


def test_an_order_violation_is_a_first_delivery_after_a_higher_one() -> None:
    """Repeats after a restart are duplicates, not violations; a number first seen after a
    higher one of its key is one, whatever the other keys do."""
    redelivered = [delivery("a", 0), delivery("a", 1), delivery("b", 0), delivery("a", 2),
                   delivery("a", 1), delivery("a", 2), delivery("b", 1), delivery("a", 3)]
    assert order_violations(redelivered) == []
    swapped = [delivery("a", 0), delivery("a", 2), delivery("b", 0), delivery("a", 1), delivery("a", 3)]
    assert order_violations(swapped) == [("a", 1, 2)]
    # A gap filled later: 3 first seen after 4, even though 3 is not a repeat.
    assert order_violations([delivery("k", s) for s in (0, 1, 2, 4, 3, 5)]) == [("k", 3, 4)]


def test_a_rolling_restart_loses_nothing_keeps_key_order_and_revokes_only_what_moves(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str]) -> None:
    """Three instances, 12 partitions, ``ordering: "key"``, a 20 ms endpoint, 500 messages/s
    over 60 keys; each instance in turn: SIGTERM, exit, start again, ready, shares back."""
    settings = Settings(warmup=1.0, steady=5.0, tail=2.0, gap=0.0, static=False, revoke_grace=2.0)
    name = topic(settings.partitions)
    outcome = run(lambda args: services(*args, wait=False), kafka.bootstrap, name, settings)

    found: list[Figures] = figures(outcome)
    for f in found:
        print(f.line())
    for r in outcome.restarts:
        print(describe(r, outcome))

    assert not outcome.failed, f"Kafka did not acknowledge {outcome.failed[:5]}"
    assert outcome.bad_requests == 0
    assert len(outcome.sent) >= settings.rate * (settings.warmup + settings.steady + settings.tail)
    missing = lost(outcome.sent, outcome.deliveries)
    assert not missing, f"{len(missing)} of {len(outcome.sent)} never delivered, e.g. {missing[:5]}"
    violations = order_violations(outcome.deliveries)
    assert not violations, f"{len(violations)} order violations (key, seq, after): {violations[:10]}"
    # The check sees a broken order in these very deliveries: swap two first deliveries of a key.
    firsts = [i for i, d in enumerate(outcome.deliveries) if d.key == "k0"]
    broken = list(outcome.deliveries)
    broken[firsts[10]], broken[firsts[20]] = broken[firsts[20]], broken[firsts[10]]
    assert order_violations(broken)

    assert len(outcome.restarts) == 3
    for r in outcome.restarts:
        assert len(r.others) == 2 and r.leaving and r.arrived
        assert not kept_but_revoked(r), f"restart {r.slot + 1}: kept partitions were revoked"
        assert not revoked_not_moved(r), f"restart {r.slot + 1}: revoked what did not move"
        # While it was away, the others only gained (its partitions): nothing was taken from them.
        assert not any(o.revoked_while_away for o in r.others), f"restart {r.slot + 1}: revoked while away"
        assert r.kept, "no partition stayed put"
