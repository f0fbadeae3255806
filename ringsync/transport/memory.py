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
        self.data_dir_ids: dict[str, str] = {}  # peer → its data dir marker
        self.probes = 0

    async def push_games(self, peer: Host, payload: bytes, digest: str, *,
                         data_dir_id: str | None = None) -> PushResult:
        self.pushes += 1
        receiver = self.receivers.get(peer.name)
        if receiver is None or peer.name in self.down:
            raise TransportError(peer.name, "unreachable (memory transport)")
        if data_dir_id is not None and self.data_dir_ids.get(peer.name) == data_dir_id:
            return PushResult(inserted=0, duplicates=0, shared_storage=True)
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

    async def peer_data_dir_id(self, peer: Host) -> str:
        self.probes += 1
        marker = self.data_dir_ids.get(peer.name)
        if marker is None or peer.name in self.down:
            raise TransportError(peer.name, "no data dir id (memory transport)")
        return marker

    async def close(self) -> None:
        return None
