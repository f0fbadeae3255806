"""CircuitBreaker on a fake clock: opens on transient failures only, probes, closes."""

from __future__ import annotations

import random

from ringsync.errors import BatchRejectedError, PeerRefusedError, PeerUnreachableError, TransientError
from ringsync.policy.breaker import (
    Attempt,
    BreakerChange,
    BreakerConfig,
    Breakers,
    BreakerState,
    CircuitBreaker,
)
from tests.unit.clock import FakeClock

DOWN = PeerUnreachableError("train-1", "connection refused")
CONFIG = BreakerConfig(failure_threshold=3, recovery_s=10.0, recovery_max_s=40.0, jitter=0.0,
                       half_open_probes=1)


def breaker(clock: FakeClock, config: BreakerConfig = CONFIG) -> CircuitBreaker:
    return CircuitBreaker("train-1", "http", config, clock=clock)


def new_state(change: BreakerChange | None) -> BreakerState | None:
    return None if change is None else change.new


def attempt(b: CircuitBreaker) -> Attempt:
    """The attempt ``b`` lets through now (it must let one through)."""
    a, _ = b.allow()
    assert a is not None
    return a


def fail(b: CircuitBreaker, times: int, error: BaseException = DOWN) -> list[BreakerChange | None]:
    changes: list[BreakerChange | None] = []
    for _ in range(times):
        changes.append(b.record(attempt(b), error))
    return changes


def test_it_opens_after_the_threshold_of_transient_failures_with_one_change() -> None:
    b = breaker(FakeClock())
    changes = fail(b, 3)
    assert changes[:2] == [None, None]
    change = changes[2]
    assert new_state(change) is BreakerState.OPEN
    assert change is not None
    assert change.old is BreakerState.CLOSED
    assert "3 failures in a row" in change.describe()
    assert b.state is BreakerState.OPEN
    assert b.allow() == (None, None)  # open: nobody tries, nothing new to log


def test_refusals_do_not_count_the_peer_answered() -> None:
    b = breaker(FakeClock())
    for error in (BatchRejectedError("p", "bad"), PeerRefusedError("p", "coordinator")):
        fail(b, 2)
        assert b.record(attempt(b), error) is None  # and the run of transient failures starts over
    fail(b, 2)
    assert b.state is BreakerState.CLOSED


def test_after_the_recovery_time_one_probe_goes_and_success_closes_it() -> None:
    clock = FakeClock()
    b = breaker(clock)
    fail(b, 3)
    assert b.retry_at == clock.now + 10.0
    clock.advance(9.9)
    assert b.allow() == (None, None)
    clock.advance(0.1)
    probe, change = b.allow()
    assert probe is not None
    assert probe.probe
    assert new_state(change) is BreakerState.HALF_OPEN
    assert b.allow() == (None, None)  # one probe at a time
    closed = b.record(probe, None)
    assert new_state(closed) is BreakerState.CLOSED
    assert closed is not None
    assert "a probe got through" in closed.reason
    assert b.since == clock.now
    assert [b.allow()[0] is not None for _ in range(2)] == [True, True]  # closed: no limit


def test_a_failed_probe_reopens_it_for_longer_up_to_the_cap() -> None:
    clock = FakeClock()
    b = breaker(clock)
    fail(b, 3)
    waits = []
    for _ in range(4):
        clock.advance(b.retry_at - clock.now)  # type: ignore[operator]
        assert new_state(b.record(attempt(b), DOWN)) is BreakerState.OPEN
        waits.append(b.retry_at - clock.now)  # type: ignore[operator]
    assert waits == [20.0, 40.0, 40.0, 40.0]
    clock.advance(40.0)
    b.record(attempt(b), None)
    fail(b, 3)
    assert b.retry_at == clock.now + 10.0  # closed in between: recovery starts over


def test_jitter_spreads_the_recovery_time() -> None:
    config = BreakerConfig(failure_threshold=1, recovery_s=10.0, recovery_max_s=100.0, jitter=0.2)
    breakers = Breakers(config, clock=FakeClock(), rng=random.Random(3))
    waits = set()
    for peer in range(50):
        b = breakers.get(f"p{peer}", "http")
        fail(b, 1, TransientError("p", "busy"))
        waits.add(round(b.retry_at - 1000.0, 6))  # type: ignore[operator]
    assert len(waits) > 40
    assert all(8.0 <= w <= 12.0 for w in waits)


def test_several_half_open_probes_when_configured() -> None:
    clock = FakeClock()
    b = breaker(clock, BreakerConfig(failure_threshold=1, recovery_s=1.0, jitter=0.0,
                                     half_open_probes=2))
    fail(b, 1)
    clock.advance(1.0)
    probes = [b.allow()[0] for _ in range(3)]
    assert [p is not None for p in probes] == [True, True, False]
    assert probes[0] is not None
    assert b.record(probes[0], DOWN) is not None  # one probe failing reopens it
    assert b.state is BreakerState.OPEN


def test_breakers_are_per_peer_and_transport() -> None:
    breakers = Breakers(CONFIG, clock=FakeClock())
    fail(breakers.get("a", "http"), 3)
    assert breakers.get("a", "http").state is BreakerState.OPEN
    assert breakers.get("a", "ssh").state is BreakerState.CLOSED
    assert breakers.get("b", "http").state is BreakerState.CLOSED
    assert {(b.peer, b.transport) for b in breakers} == {("a", "http"), ("a", "ssh"), ("b", "http")}
    assert [s.gauge for s in BreakerState] == [0, 1, 2]


def test_a_failure_begun_before_the_breaker_opened_is_not_a_failed_probe() -> None:
    """A push begun while closed that times out after the breaker opened and went half-open
    says nothing about the probe: it neither reopens the breaker nor frees the probe slot."""
    clock = FakeClock()
    b = breaker(clock)
    old, _ = b.allow()  # a long push, in flight through what follows
    fail(b, 3)
    clock.advance(10.0)
    probe, _ = b.allow()
    assert probe is not None
    assert b.state is BreakerState.HALF_OPEN
    assert old is not None
    assert b.record(old, DOWN) is None
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow() == (None, None)  # the probe still holds the one slot
    assert new_state(b.record(probe, None)) is BreakerState.CLOSED


def test_an_answer_to_an_attempt_begun_before_it_opened_closes_it() -> None:
    """The peer answered: the link works, whenever the attempt began. The log says which."""
    clock = FakeClock()
    b = breaker(clock)
    old, _ = b.allow()
    fail(b, 3)
    assert b.state is BreakerState.OPEN
    assert old is not None
    change = b.record(old, None)
    assert new_state(change) is BreakerState.CLOSED
    assert change is not None
    assert change.old is BreakerState.OPEN
    assert "begun before it opened" in change.reason
    fail(b, 3)
    assert b.retry_at == clock.now + 10.0  # closed in between: recovery starts over


def test_a_released_probe_frees_its_slot_an_old_release_does_not() -> None:
    clock = FakeClock()
    b = breaker(clock)
    old, _ = b.allow()
    fail(b, 3)
    clock.advance(10.0)
    probe, _ = b.allow()
    assert old is not None
    assert probe is not None
    b.release(old)
    assert b.allow() == (None, None)
    b.release(probe)
    assert b.allow()[0] is not None


def test_an_attempt_ended_twice_frees_no_other_probes_slot() -> None:
    """A task released on cancel and again by its done-callback must not let a second probe
    through beside the one now holding the slot."""
    clock = FakeClock()
    b = breaker(clock)
    fail(b, 3)
    clock.advance(10.0)
    first = attempt(b)
    b.release(first)
    second = attempt(b)
    b.release(first)
    assert b.allow() == (None, None)
    b.record(second, None)
    assert b.state is BreakerState.CLOSED
