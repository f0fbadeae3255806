"""DataManifest: what games this node generated and which peers hold them, durably."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ringsync.errors import CorruptDataError

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS games (
    game_id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    config_key TEXT NOT NULL,
    discovered_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    target TEXT NOT NULL,
    game_id TEXT NOT NULL,
    PRIMARY KEY (target, game_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deliveries (
    target TEXT NOT NULL,
    game_id TEXT NOT NULL,
    delivered_at REAL NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (target, game_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_by_game ON deliveries (game_id);
CREATE TABLE IF NOT EXISTS source_cursors (
    source TEXT NOT NULL,
    tbl TEXT NOT NULL,
    max_rowid INTEGER NOT NULL,
    PRIMARY KEY (source, tbl)
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class DiscoveredGame:
    """A completed game found in a local source DB."""

    game_id: str
    source: str
    config_key: str


@dataclass(frozen=True, slots=True)
class PendingGame:
    """A game still owed to a target."""

    game_id: str
    source: str
    config_key: str


class DataManifest:
    """The node's durable record of local games, its outbox per peer and its deliveries.

    A game enters the outbox of every target when it is discovered and leaves it
    only when the target acknowledges the merge, in one transaction with the
    delivery record. A crash anywhere therefore re-sends at most one batch, which
    the receiver de-duplicates, and never skips a game.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._open(path)
        except sqlite3.DatabaseError as exc:
            self._db = self._quarantine_and_reopen(path, exc)
        # Games merged from peers, written by the receiver's worker threads: a connection
        # of its own, opened on first use.
        self._received_lock = threading.Lock()
        self._received_db: sqlite3.Connection | None = None

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(deliveries)")}
            if "note" not in columns:  # a manifest from before shared-storage notes
                db.execute("ALTER TABLE deliveries ADD COLUMN note TEXT NOT NULL DEFAULT ''")
        except BaseException:
            db.close()
            raise
        return db

    def _quarantine_and_reopen(self, path: Path, exc: Exception) -> sqlite3.Connection:
        # The manifest is derived state: local games are found again by a scan and
        # re-sent games are de-duplicated by receivers, so a fresh one is safe.
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            part = Path(f"{path}{suffix}")
            if part.exists():
                part.rename(Path(f"{aside}{suffix}"))
        log.error(
            "manifest %s is unreadable (%s); moved it to %s and starting a fresh one "
            "(local games are rescanned; peers ignore games they already hold)",
            path, exc, aside,
        )
        try:
            return self._open(path)
        except sqlite3.DatabaseError as again:
            raise CorruptDataError(f"cannot create manifest {path}: {again}") from again

    def close(self) -> None:
        with self._received_lock:
            if self._received_db is not None:
                self._received_db.close()
                self._received_db = None
        self._db.close()

    def record_discovered(self, games: Sequence[DiscoveredGame], targets: Iterable[str]) -> int:
        """Record completed games and queue each for every target; returns how many were new."""
        now = time.time()
        rows = [(g.game_id, g.source, g.config_key, now) for g in games]
        ids = [(g.game_id,) for g in games]
        with self._transaction():
            before = self._db.total_changes
            self._db.executemany("INSERT OR IGNORE INTO games VALUES (?, ?, ?, ?)", rows)
            new = self._db.total_changes - before
            upgraded = self._from_log_to_db(games)
            # A game found again elsewhere (a rotated or renamed file) is read from there now,
            # but never from a JSONL line once a DB row has it: the row is the richer copy.
            self._db.executemany(
                f"UPDATE games SET source = ?2, config_key = ?3 WHERE game_id = ?1 AND source <> ?2 "
                f"AND NOT ({_is_log('?2')} AND NOT {_is_log('source')})",
                [(g.game_id, g.source, g.config_key) for g in games],
            )
            # Targets that got only the line get the game again; they merge its other rows by key.
            self._db.executemany("INSERT OR IGNORE INTO outbox SELECT target, game_id FROM deliveries "
                                 "WHERE game_id = ?", [(gid,) for gid in upgraded])
            for target in targets:
                self._db.executemany(
                    "INSERT OR IGNORE INTO outbox SELECT ?1, ?2 WHERE NOT EXISTS "
                    "(SELECT 1 FROM deliveries WHERE target = ?1 AND game_id = ?2)",
                    [(target, gid) for (gid,) in ids],
                )
        return new

    def _from_log_to_db(self, games: Sequence[DiscoveredGame]) -> list[str]:
        """Games known from a JSONL log that a DB source has now (a Gumbel game has both)."""
        in_db = [g.game_id for g in games if not is_log_source(g.source)]
        found: list[str] = []
        for i in range(0, len(in_db), 500):
            chunk = in_db[i:i + 500]
            found += [r[0] for r in self._db.execute(
                f"SELECT game_id FROM games WHERE game_id IN ({','.join('?' * len(chunk))}) "
                f"AND {_is_log('source')}", chunk)]
        return found

    def ensure_targets(self, targets: Iterable[str]) -> int:
        """Queue every known game not yet delivered to each target (new targets, lost outbox)."""
        added = 0
        with self._transaction():
            for target in targets:
                before = self._db.total_changes
                self._db.execute(
                    "INSERT OR IGNORE INTO outbox SELECT ?1, g.game_id FROM games g WHERE NOT EXISTS "
                    "(SELECT 1 FROM deliveries d WHERE d.target = ?1 AND d.game_id = g.game_id)",
                    (target,),
                )
                added += self._db.total_changes - before
        return added

    def pending(self, target: str, limit: int, *, after: str = "") -> list[PendingGame]:
        """Up to ``limit`` games owed to ``target``, in game-id order after ``after``.

        Keyset paging lets a sender walk a large outbox once while earlier pages are
        still in flight (and so still in the outbox).
        """
        rows = self._db.execute(
            "SELECT o.game_id, g.source, g.config_key FROM outbox o JOIN games g USING (game_id) "
            "WHERE o.target = ? AND o.game_id > ? ORDER BY o.game_id LIMIT ?",
            (target, after, limit),
        ).fetchall()
        return [PendingGame(*row) for row in rows]

    def ack(self, target: str, game_ids: Sequence[str], *, note: str = "") -> None:
        """The target holds these games: record the delivery and clear the outbox, atomically.

        ``note`` says how, when not by a transfer ("shared": it sees our data dir).
        """
        now = time.time()
        with self._transaction():
            self._db.executemany(
                "INSERT OR IGNORE INTO deliveries VALUES (?, ?, ?, ?)",
                [(target, gid, now, note) for gid in game_ids],
            )
            self._db.executemany(
                "DELETE FROM outbox WHERE target = ? AND game_id = ?",
                [(target, gid) for gid in game_ids],
            )

    def held_by(self, target: str, holders: Sequence[str], limit: int) -> list[str]:
        """Up to ``limit`` games owed to ``target`` that one of ``holders`` acknowledged."""
        marks = ",".join("?" * len(holders))
        rows = self._db.execute(
            f"SELECT DISTINCT o.game_id FROM outbox o JOIN deliveries d ON d.game_id = o.game_id "
            f"AND d.target IN ({marks}) WHERE o.target = ? ORDER BY o.game_id LIMIT ?",
            (*holders, target, limit)).fetchall()
        return [str(r[0]) for r in rows]

    def requeue(self, game_ids: Sequence[str]) -> int:
        """Queue delivered games again for every target that holds them; returns rows queued.

        For games that gained rows at the source after they were shipped: the receiver
        merges the game's rows by key, so the new rows arrive exactly once.
        """
        with self._transaction():
            before = self._db.total_changes
            self._db.executemany(
                "INSERT OR IGNORE INTO outbox SELECT target, game_id FROM deliveries WHERE game_id = ?",
                [(gid,) for gid in game_ids],
            )
            return self._db.total_changes - before

    def child_cursors(self, source: str) -> dict[str, int] | None:
        """The per-table cursors saved for ``source`` (None if none were saved)."""
        rows = self._db.execute("SELECT tbl, max_rowid FROM source_cursors WHERE source = ?",
                                (source,)).fetchall()
        return {str(t): int(r) for t, r in rows} if rows else None

    def save_child_cursors(self, source: str, cursors: dict[str, int]) -> None:
        """Remember how far ``source``'s child tables were scanned (after queueing what changed)."""
        with self._transaction():
            self._db.execute("DELETE FROM source_cursors WHERE source = ?", (source,))
            self._db.executemany("INSERT INTO source_cursors VALUES (?, ?, ?)",
                                 [(source, t, r) for t, r in cursors.items()])

    def delivered_from(self, source: str, limit: int, *, after: str = "") -> list[str]:
        """Up to ``limit`` games of ``source`` delivered somewhere, in game-id order after ``after``."""
        rows = self._db.execute(
            "SELECT g.game_id FROM games g WHERE g.source = ? AND g.game_id > ? AND EXISTS "
            "(SELECT 1 FROM deliveries d WHERE d.game_id = g.game_id) ORDER BY g.game_id LIMIT ?",
            (source, after, limit),
        ).fetchall()
        return [r[0] for r in rows]

    def outbox_size(self, target: str) -> int:
        row = self._db.execute("SELECT count(*) FROM outbox WHERE target = ?", (target,)).fetchone()
        return int(row[0])

    def has_pending(self, target: str) -> bool:
        row = self._db.execute("SELECT 1 FROM outbox WHERE target = ? LIMIT 1", (target,)).fetchone()
        return row is not None

    def holders(self, game_id: str) -> list[str]:
        rows = self._db.execute(
            "SELECT target FROM deliveries WHERE game_id = ? ORDER BY target", (game_id,)
        ).fetchall()
        return [r[0] for r in rows]

    def summary(self) -> dict[str, object]:
        """Counts for status views: games known, delivered and pending per target."""
        games = self._db.execute("SELECT count(*) FROM games").fetchone()[0]
        delivered = dict(
            self._db.execute("SELECT target, count(*) FROM deliveries GROUP BY target").fetchall()
        )
        pending = dict(
            self._db.execute("SELECT target, count(*) FROM outbox GROUP BY target").fetchall()
        )
        shared = dict(self._db.execute(
            "SELECT target, count(*) FROM deliveries WHERE note = 'shared' GROUP BY target"
        ).fetchall())
        return {"games": games, "delivered": delivered, "pending": pending, "shared": shared}

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


    # -- games received from peers (never pushed on as this node's own)

    def record_received(self, game_ids: Iterable[str]) -> None:
        """Remember games merged from a peer, durably; call after the merge commits.

        Thread-safe: the receiver calls it from worker threads, before it acknowledges.
        """
        rows = [(gid, time.time()) for gid in game_ids]
        with self._received_lock:
            db = self._received()
            with _Transaction(db):
                db.executemany("INSERT OR IGNORE INTO received VALUES (?, ?)", rows)

    def received_filter(self, game_ids: Iterable[str]) -> set[str]:
        """Which of ``game_ids`` this node received from a peer (thread-safe)."""
        ids = list(dict.fromkeys(game_ids))
        found: set[str] = set()
        with self._received_lock:
            db = self._received()
            for i in range(0, len(ids), _RECEIVED_CHUNK):
                chunk = ids[i:i + _RECEIVED_CHUNK]
                found.update(r[0] for r in db.execute(
                    f"SELECT game_id FROM received WHERE game_id IN ({','.join('?' * len(chunk))})",
                    chunk))
        return found

    def _received(self) -> sqlite3.Connection:
        if self._received_db is None:
            db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0,
                                 check_same_thread=False)
            try:
                # FULL: the peer is told "merged" right after, and never sends the ids again.
                db.execute("PRAGMA synchronous=FULL")
                db.execute(_RECEIVED_SCHEMA)
            except BaseException:
                db.close()
                raise
            self._received_db = db
        return self._received_db


_RECEIVED_SCHEMA = """
CREATE TABLE IF NOT EXISTS received (
    game_id TEXT PRIMARY KEY,
    received_at REAL NOT NULL
) WITHOUT ROWID
"""
_RECEIVED_CHUNK = 500


def is_log_source(source: str) -> bool:
    """True for a JSONL game log source (its games carry fewer rows than a DB's)."""
    return source.endswith((".jsonl", ".jsonl.gz"))


def _is_log(expr: str) -> str:
    return f"({expr} LIKE '%.jsonl' OR {expr} LIKE '%.jsonl.gz')"


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT, rolled back on any exception (cancellation included)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
