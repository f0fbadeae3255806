"""A peer's transports in its order, each behind its own circuit breaker: shared by the game
push chain and the file client chain; no I/O.

The order is the configured one (the host's inventory ``transport`` field, else the
default). A transport whose breaker for that peer is open is skipped without a try, so a
peer whose HTTP is down but SSH works pays HTTP's failure only until HTTP's breaker opens,
and HTTP comes back by itself when a half-open probe gets through.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Iterator
from typing import TypeVar

from ringsync.errors import PeerUnreachableError, TransportError
from ringsync.inventory import Host
from ringsync.policy.breaker import Attempt, Breakers, CircuitBreaker
from ringsync.policy.chains import Outcome

__all__ = ["AttemptCallback", "GuardedOrder", "Walk", "unreachable"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")
AttemptCallback = Callable[[str, Outcome], None]  # transport, outcome


class GuardedOrder:
    """Which of a peer's transports to try, in which order, and what each try did.

    ``available`` are the transports built here; one a peer names that is not built is
    skipped as unavailable. Each step's outcome goes to ``on_attempt`` and, when it says
    something about the link, to that (peer, transport)'s breaker: only a transient error
    counts against it, any answer from the peer closes it.
    """

    def __init__(self, default_order: tuple[str, ...], available: Collection[str],
                 breakers: Breakers, *, on_attempt: AttemptCallback | None = None) -> None:
        self._default = default_order
        self._available = frozenset(available)
        self.breakers = breakers
        self._on_attempt = on_attempt
        self._working: dict[str, str] = {}  # peer -> the transport that last reached it (for logs)

    def order(self, peer: Host) -> list[str]:
        return list(peer.transport or self._default)

    def circuits(self, peer: Host) -> list[CircuitBreaker]:
        """The peer's breakers, one per transport of its order built here."""
        return [self.breakers.get(peer.name, n) for n in self.order(peer) if n in self._available]

    def built(self, name: str) -> bool:
        return name in self._available

    def walk(self, peer: Host) -> Walk:
        return Walk(self, peer)

    async def first(self, peer: Host, call: Callable[[str], Awaitable[_T]]) -> _T:
        """``call(transport name)`` in the peer's order until one reaches it."""
        walk = self.walk(peer)
        for name in walk:
            try:
                result = await call(name)
            except PeerUnreachableError as exc:
                walk.unreachable(name, exc)
                continue
            except TransportError as exc:
                walk.failed(name, exc)
                raise
            except BaseException:
                walk.abandoned(name)
                raise
            walk.reached(name)
            return result
        raise walk.error() from walk.last

    def worked(self, peer: Host, name: str) -> None:
        """Logged when the transport that reaches a peer changes, not per request."""
        if self._working.get(peer.name) != name:
            log.info("%s is reached over %s", peer.name, name)
            self._working[peer.name] = name

    def attempted(self, name: str, outcome: Outcome) -> None:
        if self._on_attempt is not None:
            self._on_attempt(name, outcome)


class Walk:
    """One request's way through a peer's chain. Iterating yields each transport whose
    breaker lets an attempt through now (the others are counted as skipped); the caller
    reports the attempt's end with exactly one of ``reached``, ``unreachable`` (the next
    transport is tried), ``failed`` (final) or ``abandoned`` (cancelled, no verdict)."""

    def __init__(self, order: GuardedOrder, peer: Host) -> None:
        self._order, self._peer = order, peer
        self._failures: list[tuple[str, TransportError]] = []
        self._skipped: list[str] = []  # breaker open
        self._attempts: dict[str, Attempt] = {}  # transport -> its attempt, until it ends
        self.last: TransportError | None = None

    def __iter__(self) -> Iterator[str]:
        o = self._order
        for name in o.order(self._peer):
            if not o.built(name):  # named in a host's transport field, not built here
                o.attempted(name, Outcome.UNAVAILABLE)
            elif (attempt := o.breakers.allow(self._peer.name, name)) is None:
                o.attempted(name, Outcome.BREAKER_OPEN)
                self._skipped.append(name)
            else:
                self._attempts[name] = attempt
                yield name

    def reached(self, name: str) -> None:
        self._order.breakers.record(self._attempts.pop(name), None)
        self._order.attempted(name, Outcome.OK)
        self._order.worked(self._peer, name)

    def unreachable(self, name: str, exc: PeerUnreachableError) -> None:
        self._order.breakers.record(self._attempts.pop(name), exc)
        self._order.attempted(name, Outcome.NEXT)
        self._failures.append((name, exc))
        self.last = exc

    def failed(self, name: str, exc: TransportError) -> None:
        self._order.breakers.record(self._attempts.pop(name), exc)
        self._order.attempted(name, Outcome.FAILED)

    def abandoned(self, name: str) -> None:
        self._order.breakers.release(self._attempts.pop(name))

    def error(self) -> TransportError:
        """What to raise when no transport reached the peer."""
        peer = self._peer.name
        if self._skipped and not self._failures:
            return PeerUnreachableError(peer, f"not tried: the circuit breaker is open for "
                                              f"{', '.join(self._skipped)}")
        if self._skipped:
            skipped = [(n, PeerUnreachableError(peer, "circuit breaker open")) for n in self._skipped]
            return unreachable(self._peer, [*self._failures, *skipped])
        if not self._failures:
            return PeerUnreachableError(peer, "no transport of its chain is available here")
        return unreachable(self._peer, self._failures)


def unreachable(peer: Host, failures: list[tuple[str, TransportError]]) -> TransportError:
    """The error to raise when no transport reached ``peer``."""
    if len(failures) == 1:
        return failures[0][1]  # as the one transport typed it
    return PeerUnreachableError(peer.name, "; ".join(f"{n}: {e.reason}" for n, e in failures))
