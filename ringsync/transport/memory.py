"""An in-memory transport for unit tests: hands batches straight to receivers."""

from __future__ import annotations

import asyncio

from ringsync.errors import (
    BadInputError,
    CorruptDataError,
    PeerRejectedError,
    StorageFullError,
    TransportError,
)
from ringsync.inventory import Host
from ringsync.store.receiver import GameReceiver, ReceiveRefused
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
        try:
            result = receiver.receive(payload, digest)
        except ReceiveRefused as exc:  # the statuses the HTTP data server answers
            raise PeerRejectedError(peer.name, 403, str(exc)) from exc
        except (BadInputError, CorruptDataError) as exc:
            raise PeerRejectedError(peer.name, 400, str(exc)) from exc
        except StorageFullError as exc:
            raise TransportError(peer.name, f"HTTP 507: {exc}") from exc
        self.delivered.set()
        return result

    async def close(self) -> None:
        return None
