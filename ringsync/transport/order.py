"""Which of a peer's transports to try first: its configured order, the last one that worked
leading. Shared by the game push chain and the file client chain; no I/O."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ringsync.errors import PeerUnreachableError, TransportError
from ringsync.inventory import Host

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class TransportOrder:
    """The transport that last reached a peer is tried first next time, so a peer reachable
    only over SSH does not pay an HTTP timeout on every request."""

    def __init__(self, default_order: tuple[str, ...]) -> None:
        self._default = default_order
        self._working: dict[str, str] = {}  # peer -> the transport that last reached it

    def order(self, peer: Host) -> list[str]:
        order = list(peer.transport or self._default)
        working = self._working.get(peer.name)
        if working in order:
            order.remove(working)
            order.insert(0, working)
        return order

    async def first(self, peer: Host, call: Callable[[str], Awaitable[_T]]) -> _T:
        """``call(transport name)`` in the peer's order until one reaches it."""
        failures: list[tuple[str, TransportError]] = []
        for name in self.order(peer):
            try:
                result = await call(name)
            except PeerUnreachableError as exc:
                failures.append((name, exc))
                continue
            self.worked(peer, name)
            return result
        raise unreachable(peer, failures) from failures[-1][1]

    def worked(self, peer: Host, name: str) -> None:
        if self._working.get(peer.name) != name:
            log.info("%s is reached over %s", peer.name, name)
            self._working[peer.name] = name


def unreachable(peer: Host, failures: list[tuple[str, TransportError]]) -> TransportError:
    """The error to raise when no transport reached ``peer``."""
    if len(failures) == 1:
        return failures[0][1]  # as the one transport typed it
    return PeerUnreachableError(peer.name, "; ".join(f"{n}: {e.reason}" for n, e in failures))
