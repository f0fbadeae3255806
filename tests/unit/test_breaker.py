"""CircuitBreaker on a fake clock: opens on transient failures only, probes, closes."""

from __future__ import annotations

import random

from ringsync.errors import BatchRejectedError, PeerRefusedError, PeerUnreachableError, TransientError
from ringsync.policy.breaker import BreakerChange, BreakerConfig, Breakers, BreakerState, CircuitBreaker
from tests.unit.clock import FakeClock

DOWN = PeerUnreachableError("train-1", "connection refused")
CONFIG = BreakerConfig(failure_threshold=3, recovery_s=10.0, recovery_max_s=40.0, jitter=0.0,
                       half_open_probes=1)


def breaker(clock: FakeClock, config: BreakerConfig = CONFIG) -> CircuitBreaker:
    return CircuitBreaker("train-1", "http", config, clock=clock)


def new_state(change: BreakerChange | None) -> BreakerState | None:
    return None if change is None else change.new


def fail(b: CircuitBreaker, times: int, error: BaseException = DOWN) -> list[BreakerChange | None]:
    changes: list[BreakerChange | None] = []
    for _ in range(times):
        assert b.allow()[0]
        changes.append(b.record(error))
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
    assert b.allow() == (False, None)  # open: nobody tries, nothing new to log


def test_refusals_do_not_count_the_peer_answered() -> None:
    b = breaker(FakeClock())
    for error in (BatchRejectedError("p", "bad"), PeerRefusedError("p", "coordinator")):
        fail(b, 2)
        assert b.allow()[0]
        assert b.record(error) is None  # and the run of transient failures starts over
    fail(b, 2)
    assert b.state is BreakerState.CLOSED


def test_after_the_recovery_time_one_probe_goes_and_success_closes_it() -> None:
    clock = FakeClock()
    b = breaker(clock)
    fail(b, 3)
    assert b.retry_at == clock.now + 10.0
    clock.advance(9.9)
    assert b.allow() == (False, None)
    clock.advance(0.1)
    allowed, change = b.allow()
    assert allowed
    assert new_state(change) is BreakerState.HALF_OPEN
    assert b.allow() == (False, None)  # one probe at a time
    assert new_state(b.record(None)) is BreakerState.CLOSED
    assert b.since == clock.now
    assert b.allow() == (True, None)
    assert b.allow() == (True, None)  # closed: no limit


def test_a_failed_probe_reopens_it_for_longer_up_to_the_cap() -> None:
    clock = FakeClock()
    b = breaker(clock)
    fail(b, 3)
    waits = []
    for _ in range(4):
        clock.advance(b.retry_at - clock.now)  # type: ignore[operator]
        assert b.allow()[0]
        assert new_state(b.record(DOWN)) is BreakerState.OPEN
        waits.append(b.retry_at - clock.now)  # type: ignore[operator]
    assert waits == [20.0, 40.0, 40.0, 40.0]
    clock.advance(40.0)
    assert b.allow()[0]
    b.record(None)
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
    assert [b.allow()[0] for _ in range(3)] == [True, True, False]
    assert b.record(DOWN) is not None  # one probe failing reopens it
    assert b.state is BreakerState.OPEN


def test_breakers_are_per_peer_and_transport() -> None:
    breakers = Breakers(CONFIG, clock=FakeClock())
    fail(breakers.get("a", "http"), 3)
    assert breakers.get("a", "http").state is BreakerState.OPEN
    assert breakers.get("a", "ssh").state is BreakerState.CLOSED
    assert breakers.get("b", "http").state is BreakerState.CLOSED
    assert {(b.peer, b.transport) for b in breakers} == {("a", "http"), ("a", "ssh"), ("b", "http")}
    assert [s.gauge for s in BreakerState] == [0, 1, 2]
