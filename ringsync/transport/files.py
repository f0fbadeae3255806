"""File sync over whichever transport reaches a peer: HTTP, or the peer protocol through SSH.

The SSH path reuses the games' tunnels (``transport.ssh_tunnel``): the same FileClient
speaks to the far data server on its own 127.0.0.1 through a forwarded port, so a model
reaches a node whose data server listens only on loopback. Streaming, Range resume and
the absence of a total timeout are the FileClient's, unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping

from ringsync.files.client import Body, FileClient, PeerFiles
from ringsync.files.plan import IndexEntry, Source
from ringsync.inventory import Host
from ringsync.policy.breaker import Breakers, CircuitBreaker
from ringsync.settings import Settings
from ringsync.transport.order import AttemptCallback, GuardedOrder
from ringsync.transport.ssh_tunnel import SshOptions, SshTunnels


class SshFileClient:
    """PeerFiles through one SSH connection per peer (one channel per request)."""

    def __init__(self, client: FileClient, tunnels: SshTunnels, *, owned: bool = True) -> None:
        self._client = client
        self.tunnels = tunnels
        self._owned = owned  # False: the node's shared tunnels, which the node closes

    async def index(self, peer: Host) -> list[IndexEntry]:
        async with self.tunnels.channel(peer, "files") as local:
            return await self._client.index(local)

    @contextlib.asynccontextmanager
    async def open(self, peer: Host, source: Source, start: int) -> AsyncIterator[Body]:
        # The channel is held while the body streams: a download is one request.
        async with self.tunnels.channel(peer, "files") as local, \
                self._client.open(local, source, start) as body:
            yield body

    async def close(self) -> None:
        if self._owned:
            await self.tunnels.close()
        await self._client.close()


class FileClientChain:
    """Tries a peer's transports in order while they cannot reach it (PeerUnreachableError),
    each behind its own circuit breaker for that peer (the node's, shared with the games
    chain: one data server answers both); once a transport answered, its error is final
    for this request."""

    def __init__(self, clients: Mapping[str, PeerFiles], default_order: tuple[str, ...],
                 breakers: Breakers, *, on_attempt: AttemptCallback | None = None) -> None:
        self._clients = dict(clients)
        self._order = GuardedOrder(default_order, self._clients, breakers, on_attempt=on_attempt)

    def order(self, peer: Host) -> list[str]:
        return self._order.order(peer)

    def circuits(self, peer: Host) -> list[CircuitBreaker]:
        return self._order.circuits(peer)

    async def index(self, peer: Host) -> list[IndexEntry]:
        return await self._order.first(peer, lambda name: self._clients[name].index(peer))

    @contextlib.asynccontextmanager
    async def open(self, peer: Host, source: Source, start: int) -> AsyncIterator[Body]:
        # The breaker hears whether the body could be opened; a break while it streams is
        # the fetch's to resume (Range), not a verdict on the link. A failed open leaves
        # nothing on the stack, so one stack serves every try.
        stack = contextlib.AsyncExitStack()
        body = await self._order.first(peer, lambda name: stack.enter_async_context(
            self._clients[name].open(peer, source, start)))
        async with stack:
            yield body

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()


def build_file_client(s: Settings, breakers: Breakers, tunnels: SshTunnels | None = None, *,
                      on_attempt: AttemptCallback | None = None) -> FileClientChain:
    """HTTP, and SSH where some peer may be reached over it (its inventory ``transport``, else
    RINGRIFT_TRANSPORT_ORDER), in that order, behind the node's ``breakers``. ``tunnels``:
    the node's shared SSH connections (else the client opens its own); ``on_attempt`` hears
    each step's outcome, as the games chain's does."""
    orders = {h.transport or s.transport_order for h in s.inventory.hosts.values()}
    clients: dict[str, PeerFiles] = {"http": FileClient(s.node_id, s.auth_token)}
    if any(order != ("http",) for order in orders | {s.transport_order}):
        clients["ssh"] = SshFileClient(FileClient(s.node_id, s.auth_token),
                                       tunnels or SshTunnels(SshOptions.from_settings(s)),
                                       owned=tunnels is None)
    return FileClientChain(clients, s.transport_order, breakers, on_attempt=on_attempt)
