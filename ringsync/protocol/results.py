"""Result types shared by the layers that produce and consume them (one name per thing)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MergeResult:
    """What a receiver did with one batch of games, as its merge made it and its ack says.

    ``inserted`` games were new there, ``duplicates`` were already held (their new child
    rows, e.g. feature rows added after completion, were merged by key: ``rows_updated``,
    not sent back to the sender), ``refused`` are completed games with too few moves that
    RingRift's insert trigger refuses in that DB: settled, not retried forever.
    ``shared_storage``: the receiver uses the sender's data dir, so nothing was sent.
    """

    inserted: int
    duplicates: int
    refused: tuple[str, ...] = ()
    rows_updated: int = 0
    shared_storage: bool = False
