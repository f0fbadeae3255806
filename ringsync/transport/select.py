"""Which transport reaches a peer: its inventory ``transport`` field, else RINGRIFT_TRANSPORT_ORDER."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from ringsync.inventory import Host
from ringsync.policy.bandwidth import BandwidthLimiter
from ringsync.protocol.results import MergeResult
from ringsync.settings import Settings
from ringsync.transport.base import GameTransport
from ringsync.transport.http import HttpTransport
from ringsync.transport.order import TransportOrder

_T = TypeVar("_T")


def build_transport(s: Settings, *, limiter: BandwidthLimiter | None = None) -> GameTransport:
    """Plain HTTP unless some peer may be reached over SSH; then an ordered fallback chain.
    Every one sends through ``limiter`` (the node's bandwidth limits)."""
    orders = {h.transport or s.transport_order for h in s.inventory.hosts.values()}
    http = HttpTransport(s.node_id, s.auth_token, read_timeout=s.push_timeout, limiter=limiter)
    if all(order == ("http",) for order in orders | {s.transport_order}):
        return http
    from ringsync.transport.ssh import SshOptions, SshTransport  # asyncssh only where it is used

    ssh = SshTransport(s.node_id, s.auth_token, SshOptions.from_settings(s),
                       read_timeout=s.push_timeout, limiter=limiter)
    return TransportChain({"http": http, "ssh": ssh}, s.transport_order)


class TransportChain:
    """Tries a peer's transports in order while they cannot reach it.

    Only a ``PeerUnreachableError`` moves on to the next transport; any other error (the
    peer answered, or was reached and could not take it now) is final for this attempt.
    The transport that last worked for a peer is tried first next time (TransportOrder).
    """

    name = "chain"

    def __init__(self, transports: dict[str, GameTransport], default_order: tuple[str, ...]) -> None:
        self._transports = transports
        self._order = TransportOrder(default_order)

    def order(self, peer: Host) -> list[str]:
        return self._order.order(peer)

    async def push_games(self, peer: Host, payload: bytes, digest: str, *,
                         data_dir_id: str | None = None) -> MergeResult:
        return await self._first(peer, lambda t: t.push_games(peer, payload, digest,
                                                               data_dir_id=data_dir_id))

    async def peer_data_dir_id(self, peer: Host) -> str:
        return await self._first(peer, lambda t: t.peer_data_dir_id(peer))

    async def close(self) -> None:
        for transport in self._transports.values():
            await transport.close()

    async def _first(self, peer: Host, call: Callable[[GameTransport], Awaitable[_T]]) -> _T:
        return await self._order.first(peer, lambda name: call(self._transports[name]))
