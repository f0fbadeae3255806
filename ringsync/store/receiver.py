"""GameReceiver: verify, decode and merge one batch pushed by a peer."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ringsync.errors import BadInputError, CorruptDataError, ReceiveRefused, StorageBusyError
from ringsync.ops.logsafe import bounded, quoted
from ringsync.ops.metrics import Metrics
from ringsync.protocol.batch import GameBatch, content_digest, decode_batch
from ringsync.protocol.results import MergeResult
from ringsync.store.gamedb import GameMerger
from ringsync.store.gamemerge import DEFAULT_SHARD_BYTES
from ringsync.store.manifest import DataManifest
from ringsync.store.received_configs import DEFAULT_MAX_CONFIGS, ReceivedConfigs

# SQLite failures of the receiver's own storage, not of the batch: the peer retries later.
_STORAGE_CODES = frozenset({
    sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_NOMEM,
    sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM, sqlite3.SQLITE_PROTOCOL,
})


class GameReceiver:
    """The receiving side of a game push, independent of the transport that carried it.

    Safe to call from worker threads; the merger serialises writes per database. With a
    ``manifest``, every game merged (new or already held) is recorded there as received
    before the peer is answered, so it is never pushed on as this node's own. At most
    ``max_configs`` config DBs are created; their game counts live in ``ledger``.
    """

    def __init__(self, synced_dir: Path, *, refuse_reason: str | None = None,
                 manifest: DataManifest | None = None, metrics: Metrics | None = None,
                 max_configs: int = DEFAULT_MAX_CONFIGS, ledger: Path | None = None,
                 shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self._merger = GameMerger(synced_dir, metrics=metrics, shard_bytes=shard_bytes)
        self._configs = ReceivedConfigs(synced_dir, max_configs=max_configs, ledger=ledger,
                                        metrics=metrics)
        self._refuse_reason = refuse_reason
        self._manifest = manifest
        self._metrics = metrics

    def receive(self, payload: bytes, digest: str) -> MergeResult:
        """Verify ``payload`` against ``digest``, then merge it in one transaction.

        Raises CorruptDataError on a hash mismatch (the sender fetches/sends again),
        BadInputError for anything malformed (TooLargeError past a bound),
        StorageBusyError when this node's storage cannot take it now; in every case
        nothing is merged.
        """
        if self._refuse_reason is not None:
            raise ReceiveRefused(self._refuse_reason)
        actual = content_digest(payload)
        if digest != actual:
            raise CorruptDataError(f"content hash mismatch: header says {quoted(digest, 80)}, "
                                   f"body is {actual}")
        batch = decode_batch(payload)
        self._configs.admit(batch.config_key)
        try:
            result = self._merger.merge(batch)
        except sqlite3.Error as exc:
            raise _merge_error(batch, exc) from exc
        self._configs.merged(batch.config_key, result.inserted)
        if self._manifest is not None:
            refused = set(result.refused)
            self._manifest.record_received(g for g in batch.game_ids if g not in refused)
        if self._metrics is not None:
            self._metrics.games_refused_received.inc(len(result.refused))
            self._metrics.late_rows_received.inc(result.rows_updated)
        return MergeResult(inserted=result.inserted, duplicates=result.duplicates,
                           refused=tuple(result.refused))

    def held_games(self) -> dict[str, int]:
        """Games per config DB held here, without opening any of them."""
        return self._configs.held()

    def close(self) -> None:
        self._merger.close()
        self._configs.close()


def _merge_error(batch: GameBatch, exc: sqlite3.Error) -> Exception:
    """A SQLite error the merge did not translate: the storage's fault, or the batch's."""
    code = getattr(exc, "sqlite_errorcode", -1) & 0xFF
    where = f"batch {batch.config_key} from {quoted(batch.source_node)}"
    if code in _STORAGE_CODES:
        return StorageBusyError(f"{where} not merged, this node's storage cannot take it now "
                                f"({getattr(exc, 'sqlite_errorname', type(exc).__name__)}: "
                                f"{bounded(str(exc))}); send it again later")
    return BadInputError(f"{where} rejected, nothing merged: {type(exc).__name__}: "
                         f"{bounded(str(exc))}")
