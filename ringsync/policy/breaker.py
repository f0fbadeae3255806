"""CircuitBreaker: stop hammering a peer over a transport that keeps failing, probe it later.

Pure: it decides from the outcomes it is told and an injectable clock. A state change
comes back as a ``BreakerChange`` (``Breakers`` hands each to one listener, which logs it
once and exports ``ringsync_circuit_state``), so a change is logged once, not each failure.
A peer's view of its transports' breakers is ``peer_state``.

Each attempt a breaker lets through is an ``Attempt`` that remembers the state it began
in. A failure speaks only for that state: a push begun while the breaker was closed and
timing out after it opened is old news, not a failed probe. A success always speaks: the
peer answered, so the link works, whenever the attempt began.
"""

from __future__ import annotations

import enum
import itertools
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ringsync.errors import TransientError
from ringsync.policy.backoff import Backoff, Clock

__all__ = [
    "Attempt", "BreakerChange", "BreakerConfig", "BreakerListener", "BreakerState", "Breakers",
    "CircuitBreaker", "peer_state",
]


class BreakerState(enum.Enum):
    CLOSED = "closed"  # deliveries flow; transient failures are counted
    HALF_OPEN = "half_open"  # the recovery time passed: a few probes may try
    OPEN = "open"  # the peer is left alone until its recovery time

    @property
    def gauge(self) -> int:
        """The value of ringsync_circuit_state: 0 closed, 1 half-open, 2 open."""
        return _GAUGE[self]


_GAUGE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """``failure_threshold`` transient failures in a row open the breaker; it stays open
    ``recovery_s`` (doubling each time a probe fails, up to ``recovery_max_s``, spread by
    ±``jitter``), then lets ``half_open_probes`` attempts through at once."""

    failure_threshold: int = 5
    recovery_s: float = 5.0
    recovery_max_s: float = 300.0
    jitter: float = 0.2
    half_open_probes: int = 1


@dataclass(frozen=True, slots=True)
class BreakerChange:
    """A state change: logged once and exported by the caller. ``old`` is None when the
    breaker was just made (closed), so a listener can export it before it ever moves."""

    peer: str
    transport: str
    old: BreakerState | None
    new: BreakerState
    since: float  # clock time of the change
    reason: str
    old_for: float = 0.0  # seconds the breaker had been in ``old``

    def describe(self) -> str:
        old = "new" if self.old is None else f"{self.old.value} for {self.old_for:.0f}s"
        return f"circuit to {self.peer} over {self.transport}: {old} -> {self.new.value} ({self.reason})"


BreakerListener = Callable[[BreakerChange], None]


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt a breaker let through: hand it back to ``record`` or ``release``.
    ``epoch`` counts the breaker's state changes when it began; ``probe`` is a half-open one,
    holding probe slot ``serial`` until it ends (ending it twice frees nothing twice)."""

    peer: str
    transport: str
    epoch: int
    probe: bool = False
    serial: int = 0


class CircuitBreaker:
    """Closed / open / half-open for one (peer, transport).

    Only a ``TransientError`` counts as a failure: a peer that answered, even with a
    refusal, is reachable, so any other outcome counts as the link working.
    """

    def __init__(self, peer: str, transport: str, config: BreakerConfig | None = None, *,
                 clock: Clock = time.monotonic, backoff: Backoff | None = None) -> None:
        self.peer, self.transport = peer, transport
        self._config = config = config or BreakerConfig()
        self._clock = clock
        self._recovery = backoff or Backoff(config.recovery_s, config.recovery_max_s,
                                            jitter=config.jitter)
        self.state = BreakerState.CLOSED
        self.since = clock()
        self._failures = 0  # transient failures in a row while closed
        self._opened = 0  # times opened without closing since: the recovery grows with it
        self._retry_at = 0.0
        self._probing: set[int] = set()  # the serials of half-open attempts in flight
        self._serials = itertools.count(1)
        self._epoch = 0  # state changes so far: which state an Attempt began in

    @property
    def retry_at(self) -> float | None:
        """When an open breaker lets a probe through (None unless open)."""
        return self._retry_at if self.state is BreakerState.OPEN else None

    def retry_in(self) -> float | None:
        """Seconds until an open breaker lets a probe through (None unless open)."""
        at = self.retry_at
        return None if at is None else max(0.0, at - self._clock())

    def would_allow(self) -> bool:
        """Whether ``allow`` would let an attempt through now (nothing changes)."""
        if self.state is BreakerState.OPEN:
            return self._clock() >= self._retry_at
        if self.state is BreakerState.HALF_OPEN:
            return len(self._probing) < self._config.half_open_probes
        return True

    def allow(self) -> tuple[Attempt | None, BreakerChange | None]:
        """The attempt that may start now (a half-open probe is then in flight), or None."""
        change = None
        if self.state is BreakerState.OPEN:
            if self._clock() < self._retry_at:
                return None, None
            change = self._move(BreakerState.HALF_OPEN, "recovery time passed: probing")
        if self.state is not BreakerState.HALF_OPEN:
            return Attempt(self.peer, self.transport, self._epoch), change
        if len(self._probing) >= self._config.half_open_probes:
            return None, change
        serial = next(self._serials)
        self._probing.add(serial)
        return Attempt(self.peer, self.transport, self._epoch, True, serial), change

    def record(self, attempt: Attempt, error: BaseException | None) -> BreakerChange | None:
        """The outcome of ``attempt``: None for a success."""
        current = attempt.epoch == self._epoch
        self._end(attempt)
        if not isinstance(error, TransientError):
            self._failures = 0
            if self.state is BreakerState.CLOSED:
                return None
            self._opened = 0
            return self._move(BreakerState.CLOSED, "a probe got through" if attempt.probe and current
                              else "an attempt begun before it opened got an answer")
        if not current:  # begun in an earlier state: its failure was already known then
            return None
        self._failures += 1
        if self.state is BreakerState.HALF_OPEN:
            return self._open(f"probe failed: {error}")
        if self.state is BreakerState.CLOSED and self._failures >= self._config.failure_threshold:
            return self._open(f"{self._failures} failures in a row, last: {error}")
        return None

    def release(self, attempt: Attempt) -> None:
        """``attempt`` did nothing that tells (nothing was sent)."""
        self._end(attempt)

    def _end(self, attempt: Attempt) -> None:
        self._probing.discard(attempt.serial)  # its probe slot is free again (if still held)

    def _open(self, reason: str) -> BreakerChange:
        self._opened += 1
        delay = self._recovery.delay(self._opened)
        self._retry_at = self._clock() + delay
        return self._move(BreakerState.OPEN, f"{reason}; next probe in {delay:.1f}s")

    def _move(self, new: BreakerState, reason: str) -> BreakerChange:
        now = self._clock()
        old, old_for = self.state, now - self.since
        self.state, self.since = new, now
        self._epoch += 1  # attempts begun before are old news, their probe slots gone
        self._probing.clear()
        return BreakerChange(self.peer, self.transport, old, new, now, reason, old_for)


def peer_state(breakers: Iterable[CircuitBreaker]) -> BreakerState:
    """A peer's circuit as its transports' breakers make it: closed while any transport's
    is closed (deliveries flow over it), open while none would let an attempt through (its
    games wait), else half-open (the next delivery is a probe). No breaker: closed."""
    some, probe = False, False
    for breaker in breakers:
        if breaker.state is BreakerState.CLOSED:
            return BreakerState.CLOSED
        some = True
        probe = probe or breaker.would_allow()
    if not some:
        return BreakerState.CLOSED
    return BreakerState.HALF_OPEN if probe else BreakerState.OPEN


class Breakers:
    """One CircuitBreaker per (peer, transport), made on first use with one config: a node
    keeps one set, shared by every path that reaches its peers (games, files).

    ``allow``, ``record`` and ``release`` act on one breaker and hand any state change (and
    each new breaker) to ``on_change``: the one place a change is logged and exported.
    """

    def __init__(self, config: BreakerConfig | None = None, *, clock: Clock = time.monotonic,
                 rng: random.Random | None = None, on_change: BreakerListener | None = None) -> None:
        self._config = config or BreakerConfig()
        self._clock = clock
        self._rng = rng or random.Random()
        self._on_change = on_change
        self._breakers: dict[tuple[str, str], CircuitBreaker] = {}

    def get(self, peer: str, transport: str) -> CircuitBreaker:
        key = (peer, transport)
        breaker = self._breakers.get(key)
        if breaker is None:
            c = self._config
            backoff = Backoff(c.recovery_s, c.recovery_max_s, jitter=c.jitter, rng=self._rng)
            breaker = self._breakers[key] = CircuitBreaker(peer, transport, c, clock=self._clock,
                                                           backoff=backoff)
            self._tell(BreakerChange(peer, transport, None, breaker.state, breaker.since, "first use"))
        return breaker

    def __iter__(self) -> Iterator[CircuitBreaker]:
        return iter(self._breakers.values())

    def allow(self, peer: str, transport: str) -> Attempt | None:
        """The attempt over ``transport`` that may start now, or None (see CircuitBreaker.allow)."""
        attempt, change = self.get(peer, transport).allow()
        self._tell(change)
        return attempt

    def record(self, attempt: Attempt, error: BaseException | None) -> None:
        """The outcome of ``attempt``: None for a success."""
        self._tell(self.get(attempt.peer, attempt.transport).record(attempt, error))

    def release(self, attempt: Attempt) -> None:
        """``attempt`` ended without a verdict (cancelled)."""
        self.get(attempt.peer, attempt.transport).release(attempt)

    def age(self, breaker: CircuitBreaker) -> float:
        """Seconds since ``breaker`` entered its state (what an operator asks of an open one)."""
        return self._clock() - breaker.since

    def _tell(self, change: BreakerChange | None) -> None:
        if change is not None and self._on_change is not None:
            self._on_change(change)
