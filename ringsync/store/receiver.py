"""GameReceiver: verify, decode and merge one batch pushed by a peer."""

from __future__ import annotations

from pathlib import Path

from ringsync.errors import BadInputError, CorruptDataError
from ringsync.ops.metrics import Metrics
from ringsync.protocol.batch import content_digest, decode_batch
from ringsync.store.gamedb import GameMerger
from ringsync.store.manifest import DataManifest
from ringsync.transport.base import PushResult


class ReceiveRefused(BadInputError):
    """This node does not take games at all (coordinator, skip_sync_receive)."""


class GameReceiver:
    """The receiving side of a game push, independent of the transport that carried it.

    Safe to call from worker threads; the merger serialises writes per database. With a
    ``manifest``, every game merged (new or already held) is recorded there as received
    before the peer is answered, so it is never pushed on as this node's own.
    """

    def __init__(self, synced_dir: Path, *, refuse_reason: str | None = None,
                 manifest: DataManifest | None = None, metrics: Metrics | None = None) -> None:
        self._merger = GameMerger(synced_dir, metrics=metrics)
        self._refuse_reason = refuse_reason
        self._manifest = manifest
        self._metrics = metrics

    def receive(self, payload: bytes, digest: str) -> PushResult:
        """Verify ``payload`` against ``digest``, then merge it in one transaction.

        Raises CorruptDataError on a hash mismatch (the sender fetches/sends again),
        BadInputError for anything malformed; in both cases nothing is merged.
        """
        if self._refuse_reason is not None:
            raise ReceiveRefused(self._refuse_reason)
        actual = content_digest(payload)
        if digest != actual:
            raise CorruptDataError(f"content hash mismatch: header says {digest[:60]!r}, body is {actual}")
        batch = decode_batch(payload)
        result = self._merger.merge(batch)
        if self._manifest is not None:
            refused = set(result.refused)
            self._manifest.record_received(g for g in batch.game_ids if g not in refused)
        if self._metrics is not None:
            self._metrics.games_refused_received.inc(len(result.refused))
            self._metrics.late_rows_received.inc(result.rows_updated)
        return PushResult(inserted=result.inserted, duplicates=result.duplicates,
                          refused=tuple(result.refused))

    def close(self) -> None:
        self._merger.close()
