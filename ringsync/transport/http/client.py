"""The HTTP transport's client: push a game batch to a peer's data server with aiohttp."""

from __future__ import annotations

import json
import re
from contextlib import aclosing
from typing import Any

import aiohttp

from ringsync.errors import PeerUnreachableError, TransientError, TransportError
from ringsync.inventory import Host
from ringsync.ops.logsafe import bounded
from ringsync.ops.peer_session import PeerSession
from ringsync.policy.bandwidth import BandwidthLimiter, Priority
from ringsync.protocol.results import MergeResult
from ringsync.transport.http.wire import (
    BATCH_CONTENT_TYPE,
    DATA_DIR_HEADER,
    DIGEST_HEADER,
    GAMES_PATH,
    MAX_ANSWER_BYTES,
    STORAGE_PATH,
    error_for_status,
)

_DATA_DIR_ID = re.compile(r"^[0-9a-f]{32}$")


class HttpTransport:
    """One keep-alive connection pool for all peers; bounded per-read timeouts.

    aiohttp's default 300 s *total* timeout would kill big transfers, so only the
    connect and per-read waits are bounded.
    """

    name = "http"

    def __init__(self, node_id: str, token: str | None, *, read_timeout: float = 120.0,
                 limiter: BandwidthLimiter | None = None) -> None:
        self._limiter = limiter or BandwidthLimiter()  # default: no rate limit
        # A black-holed peer (link down) is noticed within the push timeout, not 10 s later.
        self._session = PeerSession(node_id, token, aiohttp.ClientTimeout(
            total=None, connect=10, sock_read=read_timeout, sock_connect=min(10.0, read_timeout)))

    async def push_games(self, peer: Host, payload: bytes, digest: str, *,
                         data_dir_id: str | None = None) -> MergeResult:
        # The body is streamed in chunks the limiter grants; the known length is still sent.
        headers = {DIGEST_HEADER: digest, "Content-Type": BATCH_CONTENT_TYPE,
                   "Content-Length": str(len(payload))}
        if data_dir_id is not None:
            headers[DATA_DIR_HEADER] = data_dir_id
        pace = self._limiter
        async with pace.transfer(peer.name, Priority.NORMAL), \
                aclosing(pace.paced(peer.name, payload, Priority.NORMAL)) as chunks:
            body = await self._request("POST", peer, GAMES_PATH, data=chunks, headers=headers)
        return _parse_push_result(peer.name, body)

    async def peer_data_dir_id(self, peer: Host) -> str:
        return _parse_data_dir_id(peer.name, await self._request("GET", peer, STORAGE_PATH))

    async def _request(self, method: str, peer: Host, path: str, **kwargs: Any) -> bytes:
        """The body of a 200 answer; any other answer or failure is a typed error."""
        try:
            async with self._session.get().request(method, peer.url(path), **kwargs) as resp:
                body = await _read_answer(peer.name, resp)
                if resp.status != 200:
                    raise _rejection(peer.name, resp.status, body)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise PeerUnreachableError(peer.name, f"{type(exc).__name__}: {exc}") from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransientError(peer.name, f"{type(exc).__name__}: {exc}") from exc
        return body

    async def close(self) -> None:
        await self._session.close()


async def _read_answer(peer: str, resp: aiohttp.ClientResponse) -> bytes:
    body = bytearray()
    async for chunk in resp.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise TransientError(peer, f"HTTP {resp.status}: answer longer than "
                                       f"{MAX_ANSWER_BYTES} bytes, not read further")
    return bytes(body)


def _rejection(peer: str, status: int, body: bytes) -> TransportError:
    # The peer's text, escaped and cut: a hostile peer cannot forge or flood our log lines.
    reason = bounded(body[:300].decode("utf-8", "replace").strip(), 300) or "no reason given"
    return error_for_status(peer, status, reason)


def _parse_push_result(peer: str, body: bytes) -> MergeResult:
    """Peers are untrusted: accept only the exact shape we expect."""
    try:
        data = json.loads(body)
        if data.get("shared_storage") is True:
            return MergeResult(inserted=0, duplicates=0, shared_storage=True)
        inserted, duplicates = data["inserted"], data["duplicates"]
        refused = data.get("refused", [])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TransientError(peer, f"malformed acknowledgement: {body[:100]!r}") from exc
    if not all(type(v) is int and v >= 0 for v in (inserted, duplicates)):
        raise TransientError(peer, f"malformed acknowledgement counts: {body[:100]!r}")
    if not isinstance(refused, list) or not all(isinstance(g, str) for g in refused):
        raise TransientError(peer, f"malformed acknowledgement refused list: {body[:100]!r}")
    return MergeResult(inserted=inserted, duplicates=duplicates, refused=tuple(refused))


def _parse_data_dir_id(peer: str, body: bytes) -> str:
    try:
        marker = json.loads(body)["data_dir_id"]
    except (ValueError, KeyError, TypeError) as exc:
        raise TransientError(peer, f"malformed storage answer: {body[:100]!r}") from exc
    if not isinstance(marker, str) or not _DATA_DIR_ID.match(marker):
        raise TransientError(peer, f"malformed data dir id: {body[:100]!r}")
    return marker
