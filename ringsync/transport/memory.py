"""An in-memory transport for unit tests: hands batches straight to receivers."""

from __future__ import annotations

import asyncio

from ringsync.errors import PeerRejectedError, PeerUnreachableError, RingsyncError, delivery_error
from ringsync.inventory import Host
from ringsync.protocol.results import MergeResult
from ringsync.store.receiver import GameReceiver


class MemoryTransport:
    """Delivers to ``GameReceiver`` objects by peer name; peers in ``down`` are unreachable.

    A receiver's error reaches the sender as the same typed error HTTP would give it
    (``delivery_error`` decides both).
    """

    name = "memory"

    def __init__(self) -> None:
        self.receivers: dict[str, GameReceiver] = {}
        self.down: set[str] = set()
        self.pushes = 0
        self.delivered = asyncio.Event()  # set after every successful push
        self.data_dir_ids: dict[str, str] = {}  # peer → its data dir marker
        self.probes = 0

    async def push_games(self, peer: Host, payload: bytes, digest: str, *,
                         data_dir_id: str | None = None) -> MergeResult:
        self.pushes += 1
        receiver = self.receivers.get(peer.name)
        if receiver is None or peer.name in self.down:
            raise PeerUnreachableError(peer.name, "unreachable (memory transport)")
        if data_dir_id is not None and self.data_dir_ids.get(peer.name) == data_dir_id:
            return MergeResult(inserted=0, duplicates=0, shared_storage=True)
        try:
            result = receiver.receive(payload, digest)
        except RingsyncError as exc:
            raise delivery_error(peer.name, exc) from exc
        self.delivered.set()
        return result

    async def peer_data_dir_id(self, peer: Host) -> str:
        self.probes += 1
        marker = self.data_dir_ids.get(peer.name)
        if peer.name in self.down or peer.name not in self.receivers:
            raise PeerUnreachableError(peer.name, "unreachable (memory transport)")
        if marker is None:  # as an HTTP peer without the storage route answers: reached, no id
            raise PeerRejectedError(peer.name, "no data dir id (memory transport)")
        return marker

    async def close(self) -> None:
        return None
