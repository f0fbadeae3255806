"""PeerDelivery: per-peer backoff and failing state, decided without I/O or real time."""

from __future__ import annotations

from ringsync.policy.peers import PeerDelivery
from tests.unit.clock import FakeClock as Clock


def test_backoff_doubles_per_peer_up_to_the_maximum_and_resets_on_delivery() -> None:
    clock = Clock()
    peers = PeerDelivery(1.0, 4.0, clock=clock)
    assert [peers.failed("a", "down")[0] for _ in range(4)] == [1.0, 2.0, 4.0, 4.0]
    assert not peers.ready("a")
    assert peers.ready("b")  # one dead peer stalls no other
    clock.now += 4.0
    assert peers.ready("a")
    assert peers.delivered("a") is True  # it was failing: a transition
    assert peers.failed("a", "down again") == (1.0, True)  # pacing starts over


def test_only_transitions_are_reported() -> None:
    peers = PeerDelivery(1.0, 60.0, clock=Clock())
    assert peers.failed("a", "refused")[1] is True
    assert peers.failed("a", "timeout")[1] is False
    assert peers.failing == {"a": "timeout"}
    assert peers.delivered("a") is True
    assert peers.delivered("a") is False
    assert peers.failing == {}


def test_a_peer_that_refused_a_batch_this_cycle_stays_failing() -> None:
    peers = PeerDelivery(1.0, 60.0, clock=Clock())
    peers.new_pass("a")
    assert peers.rejected("a", "batch rejected: 413") is True
    assert peers.rejected("a", "batch rejected: 413") is False
    assert peers.delivered("a") is False  # reachable, but a batch is still refused
    assert peers.failing == {"a": "batch rejected: 413"}
    peers.new_pass("a")
    assert peers.delivered("a") is True  # a clean pass: recovered
