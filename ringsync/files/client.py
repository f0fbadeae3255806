"""HTTP client side of file sync: a peer's index, and a file's bytes from an offset on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from ringsync.errors import PeerUnreachableError, TransportError
from ringsync.files.layout import HASH_HEADER, INDEX_PATH, MAX_INDEX_BYTES, file_url_path
from ringsync.files.plan import IndexEntry, Source, parse_index
from ringsync.inventory import Host
from ringsync.ops.logsafe import bounded
from ringsync.ops.peer_session import PeerSession

# Not connected at all: the next transport in the peer's order may reach it.
_UNREACHABLE = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
READ_CHUNK = 256 * 1024
READ_BUFSIZE = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Body:
    """A response streaming a file from ``start``; ``chunks`` yields its bytes."""

    start: int
    hash: str
    response: aiohttp.ClientResponse

    def chunks(self) -> AsyncIterator[bytes]:
        return self.response.content.iter_chunked(READ_CHUNK)


class PeerFiles(Protocol):
    """What file sync asks of a peer, whichever transport carries it (HTTP, an SSH tunnel)."""

    async def index(self, peer: Host) -> list[IndexEntry]: ...

    def open(self, peer: Host, source: Source, start: int) -> AbstractAsyncContextManager[Body]: ...

    async def close(self) -> None: ...


class FileClient:
    """One aiohttp session for every peer. No total timeout (a 5 GB NPZ takes as long as it
    takes); a read that stalls for ``read_timeout`` seconds fails the transfer."""

    def __init__(self, node_id: str, token: str | None, *, read_timeout: float = 30.0) -> None:
        # A deep read buffer: the socket keeps being read while a write runs in a thread.
        self._session = PeerSession(node_id, token, aiohttp.ClientTimeout(
            total=None, connect=10, sock_read=read_timeout), read_bufsize=READ_BUFSIZE)

    async def close(self) -> None:
        await self._session.close()

    async def index(self, peer: Host) -> list[IndexEntry]:
        try:
            async with self._session.get().get(peer.url(INDEX_PATH)) as resp:
                body = await _bounded_body(peer.name, resp, MAX_INDEX_BYTES)
                if resp.status != 200:
                    raise _failure(peer.name, resp.status, body)
        except _UNREACHABLE as exc:
            raise PeerUnreachableError(peer.name, f"{type(exc).__name__}: {exc}") from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransportError(peer.name, f"{type(exc).__name__}: {exc}") from exc
        return parse_index(body)

    @asynccontextmanager
    async def open(self, peer: Host, source: Source, start: int) -> AsyncIterator[Body]:
        """The file's bytes from ``start``; errors (HTTP or network) are TransportError."""
        headers = {"Range": f"bytes={start}-"} if start else {}
        try:
            async with self._session.get().get(peer.url(file_url_path(source.kind, source.relpath)),
                                          headers=headers) as resp:
                if resp.status not in (200, 206):
                    raise _failure(peer.name, resp.status, await _bounded_body(peer.name, resp, 4096))
                yield Body(_served_start(peer.name, resp), resp.headers.get(HASH_HEADER, ""), resp)
        except _UNREACHABLE as exc:
            raise PeerUnreachableError(peer.name, f"{type(exc).__name__}: {exc}") from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransportError(peer.name, f"{type(exc).__name__}: {exc}") from exc


def _served_start(peer: str, resp: aiohttp.ClientResponse) -> int:
    if resp.status == 200:
        return 0
    try:
        unit, _, rest = resp.headers["Content-Range"].partition(" ")
        first = int(rest.split("-", 1)[0])
    except (KeyError, ValueError):
        raise TransportError(peer, "206 answer without a valid Content-Range") from None
    if unit != "bytes" or first < 0:
        raise TransportError(peer, "206 answer with an unusable Content-Range")
    return first


async def _bounded_body(peer: str, resp: aiohttp.ClientResponse, limit: int) -> bytes:
    body = bytearray()
    async for chunk in resp.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            raise TransportError(peer, f"HTTP {resp.status}: answer longer than {limit} bytes")
    return bytes(body)


def _failure(peer: str, status: int, body: bytes) -> TransportError:
    reason = bounded(body[:300].decode("utf-8", "replace").strip(), 300) or "no reason given"
    return TransportError(peer, f"HTTP {status}: {reason}")
