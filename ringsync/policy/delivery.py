"""DeliveryPolicy: which targets a cycle delivers to, and what each outcome changes.

Pure: retry pacing per peer, a circuit breaker per (peer, transport), and why a peer
is failing, decided from outcomes and an injectable clock. The auto-sync daemon acts on
what it returns (deliver, log a transition once, export a state); it does the I/O.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from ringsync.policy.backoff import Clock
from ringsync.policy.breaker import BreakerChange, BreakerConfig, Breakers, BreakerState, CircuitBreaker
from ringsync.policy.peers import PeerDelivery

__all__ = ["DeliveryPolicy", "Outcome"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one target's delivery changed: each field is a transition to report once."""

    breaker: BreakerChange | None = None
    began_failing: bool = False
    recovered: bool = False
    retry_in: float = 0.0  # seconds until the peer is tried again (after a failure)


class DeliveryPolicy:
    """Decides per target and cycle; a target whose breaker is open is left alone (its
    games wait in its outbox) while the others keep flowing.

    A target chosen while its breaker is half-open is a probe: the caller sends it one
    push at a time (``probing``) and must report the delivery's outcome (``delivered``,
    ``failed``) or, when nothing was pushed, ``released``.
    """

    def __init__(self, transport: str, *, retry_initial: float, retry_max: float,
                 breaker: BreakerConfig | None = None, clock: Clock = time.monotonic) -> None:
        self.transport = transport
        self._peers = PeerDelivery(retry_initial, retry_max, clock=clock)
        self._breakers = Breakers(breaker, clock=clock)
        self._clock = clock

    @property
    def failing(self) -> Mapping[str, str]:
        """Peers whose last delivery failed or whose batch was refused, and why."""
        return self._peers.failing

    def breaker(self, peer: str) -> CircuitBreaker:
        return self._breakers.get(peer, self.transport)

    def breakers(self) -> Iterator[CircuitBreaker]:
        return iter(self._breakers)

    def age(self, breaker: CircuitBreaker) -> float:
        """Seconds since ``breaker`` entered its state (what an operator asks of an open one)."""
        return self._clock() - breaker.since

    def new_cycle(self, peer: str | None = None) -> None:
        """A delivery to ``peer`` (to every peer when None) begins."""
        self._peers.new_cycle(peer)

    def ready(self, peer: str) -> bool:
        """Could be delivered to now (no attempt is started)."""
        return self._peers.ready(peer) and self.breaker(peer).would_allow()

    def choose(self, peers: Iterable[str]) -> tuple[list[str], list[BreakerChange]]:
        """The peers this cycle delivers to, in the given order, and any breaker that
        moved to half-open on the way (each a state change to report)."""
        chosen: list[str] = []
        changes: list[BreakerChange] = []
        for peer in peers:
            if not self._peers.ready(peer):
                continue
            allowed, change = self.breaker(peer).allow()
            if change is not None:
                changes.append(change)
            if allowed:
                chosen.append(peer)
        return chosen, changes

    def probing(self, peer: str) -> bool:
        return self.breaker(peer).state is BreakerState.HALF_OPEN

    def delivered(self, peer: str) -> Outcome:
        """The outbox was walked without a transport failure."""
        change = self.breaker(peer).record(None)
        return Outcome(breaker=change, recovered=self._peers.delivered(peer))

    def failed(self, peer: str, error: BaseException) -> Outcome:
        """The delivery stopped on ``error``; only a transient one counts for the breaker."""
        change = self.breaker(peer).record(error)
        retry_in, began = self._peers.failed(peer, str(error))
        return Outcome(breaker=change, began_failing=began, retry_in=retry_in)

    def rejected(self, peer: str, reason: str) -> bool:
        """One batch refused (the rest went on); whether the peer just began failing."""
        return self._peers.rejected(peer, reason)

    def released(self, peer: str) -> Outcome:
        """Chosen, but nothing was pushed (nothing owed, or shared storage): no verdict for
        the breaker; the peer is no longer failing."""
        self.breaker(peer).release()
        return Outcome(recovered=self._peers.delivered(peer))
