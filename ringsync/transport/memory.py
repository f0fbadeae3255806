"""An in-memory transport for unit tests: hands batches straight to receivers."""

from __future__ import annotations

import asyncio

from ringsync.errors import TransportError
from ringsync.inventory import Host
from ringsync.store.receiver import GameReceiver
from ringsync.transport.base import PushResult


class MemoryTransport:
    """Delivers to ``GameReceiver`` objects by peer name; peers in ``down`` are unreachable."""

    name = "memory"

    def __init__(self) -> None:
        self.receivers: dict[str, GameReceiver] = {}
        self.down: set[str] = set()
        self.pushes = 0
        self.delivered = asyncio.Event()  # set after every successful push

    async def push_games(self, peer: Host, payload: bytes, digest: str) -> PushResult:
        self.pushes += 1
        receiver = self.receivers.get(peer.name)
        if receiver is None or peer.name in self.down:
            raise TransportError(peer.name, "unreachable (memory transport)")
        result = receiver.receive(payload, digest)
        self.delivered.set()
        return result

    async def close(self) -> None:
        return None
