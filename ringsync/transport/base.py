"""The transport interface: move a batch of games to a peer, nothing else."""

from __future__ import annotations

from typing import Protocol

from ringsync.inventory import Host
from ringsync.protocol.results import MergeResult


class GameTransport(Protocol):
    """Delivers an encoded game batch to a peer, which verifies and merges it.

    Failures are typed by what the caller does (``ringsync.errors``): a
    ``TransientError`` is retried later (a ``PeerUnreachableError`` first on the next
    transport), a ``BatchRejectedError`` drops this batch from the delivery and alerts,
    a ``PeerRefusedError`` stops sending this data type to the peer.
    """

    name: str

    async def push_games(self, peer: Host, payload: bytes, digest: str, *,
                         data_dir_id: str | None = None) -> MergeResult:
        """``data_dir_id``: the sender's marker, sent when the pair may be skipped as shared;
        a receiver with the same marker answers ``shared_storage`` and merges nothing."""
        ...

    async def peer_data_dir_id(self, peer: Host) -> str:
        """The peer's data dir marker (``TransportError`` when it cannot be learned)."""
        ...

    async def close(self) -> None: ...
