"""DeliveryPolicy: which targets a pass delivers to, and what each outcome changes.

Pure: retry pacing per peer, and why a peer is failing, decided from outcomes and an
injectable clock. The circuit breakers are per (peer, transport) and live in the
transport chain, which tries, skips and records each step; this policy reads the peer's
view of them (``peer_state``): a peer is left alone only while every one of its
transports is open. The auto-sync daemon acts on what it returns; it does the I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from ringsync.policy.backoff import Clock
from ringsync.policy.breaker import BreakerState, CircuitBreaker, peer_state
from ringsync.policy.peers import PeerDelivery

__all__ = ["Circuits", "DeliveryPolicy", "Outcome"]

Circuits = Callable[[str], Sequence[CircuitBreaker]]  # a peer's breakers, one per transport
PROBE_POLL = 1.0  # seconds between looks at a peer whose every transport's probe is in flight


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one target's delivery changed: each field is a transition to report once."""

    began_failing: bool = False
    recovered: bool = False
    retry_in: float = 0.0  # seconds until the peer is tried again (after a failure)


class DeliveryPolicy:
    """Decides per target and pass; a target all of whose transports have an open breaker
    is left alone (its games wait in its outbox) while the others keep flowing.

    A target none of whose transports is closed, but one of which may be probed, is
    ``probing``: the caller sends it one push at a time, so a peer still down costs one
    failed attempt, not one per push slot.
    """

    def __init__(self, circuits: Circuits, *, retry_initial: float, retry_max: float,
                 clock: Clock = time.monotonic) -> None:
        self._circuits = circuits
        self._peers = PeerDelivery(retry_initial, retry_max, clock=clock)

    @property
    def failing(self) -> Mapping[str, str]:
        """Peers whose last delivery failed or whose batch was refused, and why."""
        return self._peers.failing

    def circuit(self, peer: str) -> BreakerState:
        """The peer's view of its transports' breakers."""
        return peer_state(self._circuits(peer))

    def new_pass(self, peer: str) -> None:
        """A delivery pass to ``peer`` begins."""
        self._peers.new_pass(peer)

    def ready(self, peer: str) -> bool:
        """Could be delivered to now: not backing off, some transport not open."""
        return self._peers.ready(peer) and self.circuit(peer) is not BreakerState.OPEN

    def wait(self, peer: str) -> float | None:
        """Seconds until ``peer`` could be delivered to (None: now): the end of its backoff,
        or, when no transport would take a delivery, of the shortest breaker recovery; a
        probe in flight (maybe the file chain's) may close its breaker any moment, so then
        no longer than ``PROBE_POLL``."""
        if self.ready(peer):
            return None
        breakers = 0.0
        if self.circuit(peer) is BreakerState.OPEN:
            circuits = self._circuits(peer)
            waits = [w for b in circuits if (w := b.retry_in()) is not None]
            if any(b.state is BreakerState.HALF_OPEN for b in circuits):
                waits.append(PROBE_POLL)
            breakers = min(waits, default=PROBE_POLL)
        return max(self._peers.retry_in(peer), breakers)

    def choose(self, peers: Iterable[str]) -> list[str]:
        """The peers a pass delivers to now, in the given order."""
        return [peer for peer in peers if self.ready(peer)]

    def probing(self, peer: str) -> bool:
        return self.circuit(peer) is BreakerState.HALF_OPEN

    def delivered(self, peer: str) -> Outcome:
        """The outbox was walked without a transport failure."""
        return Outcome(recovered=self._peers.delivered(peer))

    def failed(self, peer: str, error: BaseException) -> Outcome:
        """The delivery stopped on ``error`` (the chain already told each step's breaker)."""
        retry_in, began = self._peers.failed(peer, str(error))
        return Outcome(began_failing=began, retry_in=retry_in)

    def rejected(self, peer: str, reason: str) -> bool:
        """One batch refused (the rest went on); whether the peer just began failing."""
        return self._peers.rejected(peer, reason)

    def released(self, peer: str) -> Outcome:
        """Chosen, but nothing was pushed (nothing owed, or shared storage): the peer is no
        longer failing."""
        return Outcome(recovered=self._peers.delivered(peer))
