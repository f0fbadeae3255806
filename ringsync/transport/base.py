"""The transport interface: move a batch of games to a peer, nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ringsync.inventory import Host


@dataclass(frozen=True, slots=True)
class PushResult:
    """What the receiver did with a batch: newly merged games and games it already had."""

    inserted: int
    duplicates: int
    shared_storage: bool = False  # the receiver uses the sender's data dir: nothing was sent
    # Games RingRift's own insert trigger in the receiver's DB refuses (completed with fewer
    # than 5 moves): never mergeable there, so they are settled, not retried forever.
    refused: tuple[str, ...] = ()


class GameTransport(Protocol):
    """Delivers an encoded game batch to a peer, which verifies and merges it.

    Raises ``TransportError`` when the peer could not be reached or the transfer
    broke (retry later) and ``PeerRejectedError`` when the peer refused it.
    """

    name: str

    async def push_games(self, peer: Host, payload: bytes, digest: str, *,
                         data_dir_id: str | None = None) -> PushResult:
        """``data_dir_id``: the sender's marker, sent when the pair may be skipped as shared;
        a receiver with the same marker answers ``shared_storage`` and merges nothing."""
        ...

    async def peer_data_dir_id(self, peer: Host) -> str:
        """The peer's data dir marker (``TransportError`` when it cannot be learned)."""
        ...

    async def close(self) -> None: ...
