"""Which transport reaches a peer: its inventory ``transport`` field, else RINGRIFT_TRANSPORT_ORDER."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from ringsync.errors import PeerUnreachableError, TransportError
from ringsync.inventory import Host
from ringsync.ops.metrics import Metrics
from ringsync.policy.bandwidth import BandwidthLimiter
from ringsync.policy.chains import Outcome
from ringsync.protocol.results import MergeResult
from ringsync.settings import Settings
from ringsync.transport.base import GameTransport
from ringsync.transport.http import HttpTransport
from ringsync.transport.order import TransportOrder, unreachable
from ringsync.transport.ssh import SshOptions, SshTransport
from ringsync.transport.ssh_tunnel import SshTunnels

_T = TypeVar("_T")
AttemptCallback = Callable[[str, Outcome], None]  # transport, outcome


def build_transport(s: Settings, *, limiter: BandwidthLimiter | None = None,
                    on_attempt: AttemptCallback | None = None,
                    tunnels: SshTunnels | None = None) -> GameTransport:
    """The games chain (RINGRIFT_TRANSPORT_CHAINS games=, or RINGRIFT_TRANSPORT_ORDER), with
    SSH built only where some peer may be reached over it. Every transport sends through
    ``limiter`` (the node's bandwidth limits); ``on_attempt`` hears each step's outcome;
    ``tunnels``: the node's shared SSH connections (else SSH opens its own)."""
    order = s.transport_chains.for_games()
    orders = {h.transport or order for h in s.inventory.hosts.values()}
    http = HttpTransport(s.node_id, s.auth_token, read_timeout=s.push_timeout, limiter=limiter)
    if all(o == ("http",) for o in orders | {order}):
        return http if on_attempt is None else TransportChain({"http": http}, order,
                                                              on_attempt=on_attempt)
    ssh = SshTransport(s.node_id, s.auth_token, SshOptions.from_settings(s),
                       read_timeout=s.push_timeout, limiter=limiter, tunnels=tunnels)
    return TransportChain({"http": http, "ssh": ssh}, order, on_attempt=on_attempt)


def count_attempts(metrics: Metrics, data_type: str) -> AttemptCallback:
    """An ``on_attempt`` that counts into ringsync_transport_attempts_total."""
    def counted(transport: str, outcome: Outcome) -> None:
        metrics.transport_attempts.labels(data_type=data_type, transport=transport,
                                          outcome=outcome.value).inc()
    return counted


class TransportChain:
    """Tries a peer's transports in order while they cannot reach it.

    Only a ``PeerUnreachableError`` moves on to the next transport; any other error (the
    peer answered, or was reached and could not take it now) is final for this attempt.
    The transport that last worked for a peer is tried first next time (TransportOrder).
    """

    def __init__(self, transports: dict[str, GameTransport], default_order: tuple[str, ...], *,
                 on_attempt: AttemptCallback | None = None) -> None:
        self._transports = transports
        self._order = TransportOrder(default_order)
        self._on_attempt = on_attempt
        # Breakers and their metric are per (peer, transport): HTTP alone keeps its own name.
        self.name = "http" if set(transports) == {"http"} else "chain"

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
        failures: list[tuple[str, TransportError]] = []
        for name in self.order(peer):
            transport = self._transports.get(name)
            if transport is None:  # named in a host's transport field, not built here
                self._attempted(name, Outcome.UNAVAILABLE)
                continue
            try:
                result = await call(transport)
            except PeerUnreachableError as exc:
                self._attempted(name, Outcome.NEXT)
                failures.append((name, exc))
                continue
            except TransportError:
                self._attempted(name, Outcome.FAILED)
                raise
            self._attempted(name, Outcome.OK)
            self._order.worked(peer, name)
            return result
        if not failures:
            raise PeerUnreachableError(peer.name, "no transport of its chain is available here")
        raise unreachable(peer, failures) from failures[-1][1]

    def _attempted(self, name: str, outcome: Outcome) -> None:
        if self._on_attempt is not None:
            self._on_attempt(name, outcome)
