"""The aiohttp session every client of the peer protocol uses (games, files, relays, aria2's checks)."""

from __future__ import annotations

from typing import Any

import aiohttp

NODE_HEADER = "X-Ringsync-Node"  # who asks: its inventory name picks its bandwidth bucket


class PeerSession:
    """Made on first use, so building a client needs no running loop. Every request names
    this node and carries the cluster token; ``timeout`` never has a total by default (a
    5 GB NPZ takes as long as it takes; a stalled read is what fails a transfer)."""

    def __init__(self, node_id: str, token: str | None, timeout: aiohttp.ClientTimeout,
                 **options: Any) -> None:
        self._headers = {NODE_HEADER: node_id}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._timeout = timeout
        self._options = options
        self._session: aiohttp.ClientSession | None = None

    def get(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers,
                                                  **self._options)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
