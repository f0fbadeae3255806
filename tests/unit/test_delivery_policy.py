"""DeliveryPolicy on a fake clock: which targets a cycle takes, what an outcome changes."""

from __future__ import annotations

from ringsync.errors import BatchRejectedError, PeerRefusedError, PeerUnreachableError
from ringsync.policy.breaker import BreakerConfig, BreakerState
from ringsync.policy.delivery import DeliveryPolicy
from tests.unit.clock import FakeClock

DOWN = PeerUnreachableError("b", "connection refused")


def policy(clock: FakeClock) -> DeliveryPolicy:
    return DeliveryPolicy("http", retry_initial=0.0, retry_max=60.0, clock=clock,
                          breaker=BreakerConfig(failure_threshold=2, recovery_s=10.0, jitter=0.0))


def test_an_open_breaker_leaves_its_target_out_and_the_others_in() -> None:
    clock = FakeClock()
    p = policy(clock)
    assert p.choose(["a", "b"]) == (["a", "b"], [])
    first = p.failed("b", DOWN)
    assert first.began_failing
    assert first.breaker is None
    p.choose(["a", "b"])
    opened = p.failed("b", DOWN).breaker
    assert opened is not None
    assert opened.new is BreakerState.OPEN
    assert p.choose(["a", "b"]) == (["a"], [])
    assert not p.ready("b")
    assert p.age(p.breaker("b")) == 0.0
    clock.advance(10.0)
    assert p.ready("b")
    chosen, changes = p.choose(["a", "b"])
    assert chosen == ["a", "b"]
    assert [c.new for c in changes] == [BreakerState.HALF_OPEN]
    assert p.probing("b")
    assert p.choose(["b"]) == ([], [])  # one probe at a time
    closed = p.delivered("b")
    assert closed.recovered
    assert closed.breaker is not None
    assert closed.breaker.new is BreakerState.CLOSED


def test_a_probe_that_pushed_nothing_gives_no_verdict() -> None:
    clock = FakeClock()
    p = policy(clock)
    for _ in range(2):
        p.choose(["b"])
        p.failed("b", DOWN)
    clock.advance(10.0)
    assert p.choose(["b"])[0] == ["b"]
    p.released("b")
    assert p.probing("b")
    assert p.choose(["b"])[0] == ["b"]  # the released probe slot is free again


def test_refusals_back_off_the_peer_but_never_open_its_breaker() -> None:
    p = policy(FakeClock())
    for error in (BatchRejectedError("b", "bad"), PeerRefusedError("b", "coordinator")) * 3:
        outcome = p.failed("b", error)
        assert outcome.breaker is None
    assert p.breaker("b").state is BreakerState.CLOSED
    assert "coordinator" in p.failing["b"]
