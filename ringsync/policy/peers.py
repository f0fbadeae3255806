"""Per-peer delivery state: retry pacing and why a peer is failing, decided without I/O."""

from __future__ import annotations

import time
from collections.abc import Mapping

from ringsync.policy.backoff import Backoff, Clock, RetryPacer

__all__ = ["PeerDelivery"]


class PeerDelivery:
    """Which peers may be tried now, and which are failing and why.

    One dead peer never stalls the others' passes: each backs off on its own,
    doubling from ``initial`` up to ``maximum`` seconds. The methods that change
    the failing set say whether it was a transition, so the caller logs only those.
    """

    def __init__(self, initial: float, maximum: float, *, clock: Clock = time.monotonic) -> None:
        self._pacer: RetryPacer[str] = RetryPacer(Backoff(initial, maximum), clock=clock)
        self._failing: dict[str, str] = {}  # peer -> why
        self._rejected_in_pass: set[str] = set()

    @property
    def failing(self) -> Mapping[str, str]:
        return self._failing

    def new_pass(self, peer: str) -> None:
        """A new delivery pass to ``peer``: its refusals start over."""
        self._rejected_in_pass.discard(peer)

    def ready(self, peer: str) -> bool:
        """Not backing off."""
        return self._pacer.ready(peer)

    def retry_in(self, peer: str) -> float:
        """Seconds until ``peer``'s backoff ends (0 when it is not backing off)."""
        return self._pacer.retry_in(peer)

    def failed(self, peer: str, reason: str) -> tuple[float, bool]:
        """The peer could not be delivered to: (seconds until its retry, whether it just began failing)."""
        return self._pacer.failed(peer), self._fail(peer, reason)

    def rejected(self, peer: str, reason: str) -> bool:
        """One batch refused (the rest went on); whether the peer just began failing."""
        self._rejected_in_pass.add(peer)
        return self._fail(peer, reason)

    def delivered(self, peer: str) -> bool:
        """Its outbox was walked without a transport failure; whether it just recovered.

        A peer that refused a batch in this pass stays failing.
        """
        self._pacer.succeeded(peer)
        if peer in self._rejected_in_pass:
            return False
        return self._failing.pop(peer, None) is not None

    def _fail(self, peer: str, reason: str) -> bool:
        began = peer not in self._failing
        self._failing[peer] = reason
        return began
