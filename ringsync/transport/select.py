"""Which transport reaches a peer: its inventory ``transport`` field, else RINGRIFT_TRANSPORT_ORDER."""

from __future__ import annotations

from ringsync.inventory import Host
from ringsync.ops.metrics import Metrics
from ringsync.policy.bandwidth import BandwidthLimiter
from ringsync.policy.breaker import Breakers, CircuitBreaker
from ringsync.policy.chains import Outcome
from ringsync.protocol.results import MergeResult
from ringsync.settings import Settings
from ringsync.transport.base import GameTransport
from ringsync.transport.http import HttpTransport
from ringsync.transport.order import AttemptCallback, GuardedOrder
from ringsync.transport.ssh import SshOptions, SshTransport
from ringsync.transport.ssh_tunnel import SshTunnels

__all__ = ["AttemptCallback", "TransportChain", "build_transport", "count_attempts"]


def build_transport(s: Settings, breakers: Breakers, *, limiter: BandwidthLimiter | None = None,
                    on_attempt: AttemptCallback | None = None,
                    tunnels: SshTunnels | None = None) -> TransportChain:
    """The games chain (RINGRIFT_TRANSPORT_CHAINS games=, or RINGRIFT_TRANSPORT_ORDER), with
    SSH built only where some peer may be reached over it. Every transport sends through
    ``limiter`` (the node's bandwidth limits); ``on_attempt`` hears each step's outcome;
    ``breakers`` are the node's, one per (peer, transport); ``tunnels``: the node's shared
    SSH connections (else SSH opens its own)."""
    order = s.transport_chains.for_games()
    orders = {h.transport or order for h in s.inventory.hosts.values()}
    http = HttpTransport(s.node_id, s.auth_token, read_timeout=s.push_timeout, limiter=limiter)
    if all(o == ("http",) for o in orders | {order}):
        return TransportChain({"http": http}, order, breakers, on_attempt=on_attempt)
    ssh = SshTransport(s.node_id, s.auth_token,
                       SshOptions.from_settings(s) if tunnels is None else tunnels,
                       read_timeout=s.push_timeout, limiter=limiter)
    return TransportChain({"http": http, "ssh": ssh}, order, breakers, on_attempt=on_attempt)


def count_attempts(metrics: Metrics, data_type: str) -> AttemptCallback:
    """An ``on_attempt`` that counts into ringsync_transport_attempts_total."""
    def counted(transport: str, outcome: Outcome) -> None:
        metrics.transport_attempts.labels(data_type=data_type, transport=transport,
                                          outcome=outcome.value).inc()
    return counted


class TransportChain:
    """Tries a peer's transports in order while they cannot reach it, each behind its own
    circuit breaker for that peer (GuardedOrder).

    Only a ``PeerUnreachableError`` moves on to the next transport; any other error (the
    peer answered, or was reached and could not take it now) is final for this attempt.
    A transport whose breaker is open is skipped without a try until a probe may go.
    """

    def __init__(self, transports: dict[str, GameTransport], default_order: tuple[str, ...],
                 breakers: Breakers, *, on_attempt: AttemptCallback | None = None) -> None:
        self._transports = transports
        self._order = GuardedOrder(default_order, transports, breakers, on_attempt=on_attempt)
        self.name = "+".join(transports)  # for logs: the breakers carry each transport's name

    def order(self, peer: Host) -> list[str]:
        return self._order.order(peer)

    def circuits(self, peer: Host) -> list[CircuitBreaker]:
        """The peer's breakers, one per transport of its order built here."""
        return self._order.circuits(peer)

    async def push_games(self, peer: Host, payload: bytes, digest: str, *,
                         data_dir_id: str | None = None) -> MergeResult:
        return await self._order.first(peer, lambda n: self._transports[n].push_games(
            peer, payload, digest, data_dir_id=data_dir_id))

    async def peer_data_dir_id(self, peer: Host) -> str:
        return await self._order.first(peer, lambda n: self._transports[n].peer_data_dir_id(peer))

    async def close(self) -> None:
        for transport in self._transports.values():
            await transport.close()
