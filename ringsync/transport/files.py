"""File sync over whichever transport reaches a peer: HTTP, or the peer protocol through SSH.

The SSH path reuses the games' tunnels (``transport.ssh_tunnel``): the same FileClient
speaks to the far data server on its own 127.0.0.1 through a forwarded port, so a model
reaches a node whose data server listens only on loopback. Streaming, Range resume and
the absence of a total timeout are the FileClient's, unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping

from ringsync.errors import PeerUnreachableError, TransportError
from ringsync.files.client import Body, FileClient, PeerFiles
from ringsync.files.plan import IndexEntry, Source
from ringsync.inventory import Host
from ringsync.settings import Settings
from ringsync.transport.order import TransportOrder, unreachable
from ringsync.transport.ssh_tunnel import SshOptions, SshTunnels


class SshFileClient:
    """PeerFiles through one SSH connection per peer (one channel per request)."""

    def __init__(self, client: FileClient, tunnels: SshTunnels, *, owned: bool = True) -> None:
        self._client = client
        self.tunnels = tunnels
        self._owned = owned  # False: the node's shared tunnels, which the node closes

    async def index(self, peer: Host) -> list[IndexEntry]:
        async with self.tunnels.channel(peer) as local:
            return await self._client.index(local)

    @contextlib.asynccontextmanager
    async def open(self, peer: Host, source: Source, start: int) -> AsyncIterator[Body]:
        # The channel is held while the body streams: a download is one request.
        async with self.tunnels.channel(peer) as local, self._client.open(local, source, start) as body:
            yield body

    async def close(self) -> None:
        if self._owned:
            await self.tunnels.close()
        await self._client.close()


class FileClientChain:
    """Tries a peer's transports in order while they cannot reach it (PeerUnreachableError);
    once a transport answered, its error is final for this request."""

    def __init__(self, clients: Mapping[str, PeerFiles], default_order: tuple[str, ...]) -> None:
        self._clients = dict(clients)
        self._order = TransportOrder(default_order)

    async def index(self, peer: Host) -> list[IndexEntry]:
        return await self._order.first(peer, lambda name: self._clients[name].index(peer))

    @contextlib.asynccontextmanager
    async def open(self, peer: Host, source: Source, start: int) -> AsyncIterator[Body]:
        failures: list[tuple[str, TransportError]] = []
        for name in self._order.order(peer):
            stack = contextlib.AsyncExitStack()
            try:
                body = await stack.enter_async_context(self._clients[name].open(peer, source, start))
            except PeerUnreachableError as exc:
                failures.append((name, exc))
                continue
            async with stack:
                self._order.worked(peer, name)
                yield body
            return
        raise unreachable(peer, failures) from failures[-1][1]

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()


def build_file_client(s: Settings, tunnels: SshTunnels | None = None) -> PeerFiles:
    """Plain HTTP unless some peer may be reached over SSH (its inventory ``transport``, else
    RINGRIFT_TRANSPORT_ORDER); then a chain in that order. ``tunnels``: the node's shared
    SSH connections (else the client opens its own)."""
    orders = {h.transport or s.transport_order for h in s.inventory.hosts.values()}
    http = FileClient(s.node_id, s.auth_token)
    if all(order == ("http",) for order in orders | {s.transport_order}):
        return http
    ssh = SshFileClient(FileClient(s.node_id, s.auth_token),
                        tunnels or SshTunnels(SshOptions.from_settings(s)), owned=tunnels is None)
    return FileClientChain({"http": http, "ssh": ssh}, s.transport_order)
