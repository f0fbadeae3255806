"""DeliveryPolicy on a fake clock: which targets a cycle takes, what an outcome changes,
and the per-peer view of its transports' breakers."""

from __future__ import annotations

from ringsync.errors import BatchRejectedError, PeerRefusedError, PeerUnreachableError
from ringsync.policy.breaker import BreakerConfig, Breakers, BreakerState, CircuitBreaker
from ringsync.policy.delivery import PROBE_POLL, DeliveryPolicy
from tests.unit.clock import FakeClock

DOWN = PeerUnreachableError("b", "connection refused")
CONFIG = BreakerConfig(failure_threshold=2, recovery_s=10.0, jitter=0.0)


def policy(clock: FakeClock, breakers: Breakers, retry_initial: float = 0.0) -> DeliveryPolicy:
    def circuits(peer: str) -> list[CircuitBreaker]:
        return [breakers.get(peer, "http"), breakers.get(peer, "ssh")]
    return DeliveryPolicy(circuits, retry_initial=retry_initial, retry_max=60.0, clock=clock)


def trip(breakers: Breakers, peer: str, transport: str) -> None:
    for _ in range(CONFIG.failure_threshold):
        attempt = breakers.allow(peer, transport)
        assert attempt is not None
        breakers.record(attempt, DOWN)


def test_a_peer_waits_only_while_every_one_of_its_transports_is_open() -> None:
    clock = FakeClock()
    breakers = Breakers(CONFIG, clock=clock)
    p = policy(clock, breakers)
    assert p.choose(["a", "b"]) == ["a", "b"]
    trip(breakers, "b", "http")
    assert p.circuit("b") is BreakerState.CLOSED  # SSH still carries it
    assert p.choose(["a", "b"]) == ["a", "b"]
    assert not p.probing("b")
    clock.advance(5.0)
    trip(breakers, "b", "ssh")
    assert p.circuit("b") is BreakerState.OPEN
    assert p.choose(["a", "b"]) == ["a"]
    assert not p.ready("b")
    clock.advance(5.0)  # HTTP's recovery time passed (SSH's has 5 s to go): a probe may go
    assert p.circuit("b") is BreakerState.HALF_OPEN
    assert p.choose(["a", "b"]) == ["a", "b"]
    assert p.probing("b")
    probe = breakers.allow("b", "http")  # the chain takes the one probe slot...
    assert probe is not None
    assert p.circuit("b") is BreakerState.OPEN  # ...and no second delivery starts meanwhile
    breakers.record(probe, None)
    assert p.circuit("b") is BreakerState.CLOSED
    assert not p.probing("b")


def test_retry_pacing_stays_per_peer_whatever_the_breakers_say() -> None:
    clock = FakeClock()
    p = policy(clock, Breakers(CONFIG, clock=clock), retry_initial=4.0)
    first = p.failed("b", DOWN)
    assert first.began_failing
    assert first.retry_in == 4.0
    assert p.choose(["a", "b"]) == ["a"]
    assert not p.failed("b", DOWN).began_failing  # logged once
    clock.advance(8.0)
    assert p.choose(["a", "b"]) == ["a", "b"]
    assert p.delivered("b").recovered
    assert "b" not in p.failing


def test_refusals_back_off_the_peer_but_never_open_a_breaker() -> None:
    clock = FakeClock()
    breakers = Breakers(CONFIG, clock=clock)
    p = policy(clock, breakers)
    for error in (BatchRejectedError("b", "bad"), PeerRefusedError("b", "coordinator")) * 3:
        p.failed("b", error)
        attempt = breakers.allow("b", "http")
        assert attempt is not None
        breakers.record(attempt, error)
    assert breakers.get("b", "http").state is BreakerState.CLOSED
    assert "coordinator" in p.failing["b"]
    assert p.released("b").recovered


def test_how_long_a_peer_waits_its_backoff_its_recovery_or_a_probe_in_flight() -> None:
    clock = FakeClock()
    breakers = Breakers(CONFIG, clock=clock)
    p = policy(clock, breakers, retry_initial=4.0)
    assert p.wait("b") is None
    p.failed("b", DOWN)
    assert p.wait("b") == 4.0  # its backoff
    clock.advance(4.0)
    assert p.wait("b") is None
    trip(breakers, "b", "http")
    clock.advance(2.0)
    trip(breakers, "b", "ssh")
    assert p.wait("b") == 8.0  # http's recovery ends first
    clock.advance(8.0)
    probe = breakers.allow("b", "http")  # another path (the file chain) takes http's probe
    assert probe is not None
    assert p.circuit("b") is BreakerState.OPEN
    assert p.wait("b") == PROBE_POLL  # not 0 (a busy loop), not ssh's 2 s to go: look again soon
    breakers.record(probe, None)
    assert p.wait("b") is None
