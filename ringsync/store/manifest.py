"""DataManifest: what games this node generated and which peers hold them, durably, in the
node's one journal DB (file sync keeps its tables in the same file: ringsync.files.manifest)."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ringsync.errors import CorruptDataError
from ringsync.store._sqlite import use_wal

log = logging.getLogger(__name__)

# One row per local game, whoever holds it: the targets holding a game are bits of ``held``
# (target ids 0..62; later ids in ``overflow``), so a game delivered everywhere costs one
# small row, not one row per target forever (304 -> ~70 bytes per game at 2 targets).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS targets (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    complete INTEGER NOT NULL DEFAULT 0  -- every known game is queued or held for it
);
CREATE TABLE IF NOT EXISTS sources (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    is_log INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS local_games (
    game_id TEXT PRIMARY KEY,
    source_id INTEGER NOT NULL,
    config_key TEXT NOT NULL,
    held INTEGER NOT NULL DEFAULT 0,     -- bit t: target t holds it
    shared INTEGER NOT NULL DEFAULT 0,   -- ... through shared storage (not a transfer)
    refused INTEGER NOT NULL DEFAULT 0   -- ... refused it (its RingRift trigger)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS overflow (
    target_id INTEGER NOT NULL,
    game_id TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (target_id, game_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS queue (
    target_id INTEGER NOT NULL,
    game_id TEXT NOT NULL,
    PRIMARY KEY (target_id, game_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS source_cursors (
    source TEXT NOT NULL,
    tbl TEXT NOT NULL,
    max_rowid INTEGER NOT NULL,
    PRIMARY KEY (source, tbl)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS scan_cursors (
    source TEXT PRIMARY KEY,
    state TEXT NOT NULL
) WITHOUT ROWID;
"""
JOURNAL_NAME = "manifest.db"  # in the node's state dir: every sync intent of the node
BUSY_TIMEOUT = 30.0  # seconds a write waits for another writer (file sync) on the journal
BITS = 63  # target ids with a bit in held/shared/refused; later ones go to overflow


def _holds(tid: str, game: str = "k") -> str:
    """SQL: target id ``tid`` holds the local_games row ``game``."""
    return (f"(CASE WHEN {tid} < {BITS} THEN ({game}.held >> {tid}) & 1 ELSE EXISTS "
            f"(SELECT 1 FROM overflow o WHERE o.target_id = {tid} AND o.game_id = {game}.game_id) END)")


@dataclass(frozen=True, slots=True)
class LocalGame:
    """A completed game generated here: found in a local source, owed to targets until
    they acknowledge it."""

    game_id: str
    source: str
    config_key: str


class DataManifest:
    """The node's durable record of local games, its outbox per peer and its deliveries.

    A game enters the outbox of every target when it is discovered and leaves it
    only when the target acknowledges the merge, in one transaction with the
    delivery record. A crash anywhere therefore re-sends at most one batch, which
    the receiver de-duplicates, and never skips a game.

    Thread-safe: every call holds one lock, so async code runs them in worker threads
    (a million-game manifest must not stall the event loop).

    The DB is the node's journal: file sync's records and in-flight transfers live in it
    too, on connections of their own. This class opens it first (at node start), so it is
    the one that checks it and moves a corrupt one aside.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._db = self._open(path)
        except sqlite3.DatabaseError as exc:
            self._db = self._quarantine_and_reopen(path, exc)
        self._target_ids: dict[str, int] = {}
        self._source_ids: dict[str, int] = {}
        # Games merged from peers, written by the receiver's worker threads: a connection
        # of its own, opened on first use.
        self._received_lock = threading.Lock()
        self._received_db: sqlite3.Connection | None = None

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        # A clean close leaves no WAL behind: the full check (O(games), 0.25 s at a million)
        # runs only after a crash, and a restart after a clean stop costs milliseconds.
        crashed = _nonempty(Path(f"{path}-wal"))
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                             timeout=BUSY_TIMEOUT)
        try:
            use_wal(db, BUSY_TIMEOUT)
            db.execute("PRAGMA synchronous=NORMAL")
            if crashed:
                if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                    raise sqlite3.DatabaseError("quick_check failed")
            else:
                db.execute("PRAGMA schema_version").fetchone()  # garbage: 'not a database'
            db.executescript(_SCHEMA)
            if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'deliveries'").fetchone():
                with _Transaction(db):
                    _migrate_v1(db)
        except BaseException:
            db.close()
            raise
        return db

    def _quarantine_and_reopen(self, path: Path, exc: Exception) -> sqlite3.Connection:
        # The manifest is derived state: local games are found again by a scan and
        # re-sent games are de-duplicated by receivers, so a fresh one is safe; so are the
        # file tables beside them (files are hashed again, downloads start over).
        aside = move_aside(path)
        log.error(
            "manifest %s is unreadable (%s); moved it to %s and starting a fresh one "
            "(local games are rescanned; peers ignore games they already hold; local files "
            "are hashed again and in-flight downloads start over)",
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
        with self._lock:
            self._db.close()

    # -- ids (interned: a game row carries small integers, not names) ------------------------

    def _target(self, name: str) -> int:
        tid = self._target_ids.get(name)
        if tid is None:
            row = self._db.execute("SELECT id FROM targets WHERE name = ?", (name,)).fetchone()
            if row is None:
                nxt = self._db.execute("SELECT coalesce(max(id) + 1, 0) FROM targets").fetchone()[0]
                self._db.execute("INSERT INTO targets (id, name) VALUES (?, ?)", (nxt, name))
                row = (nxt,)
            tid = self._target_ids[name] = int(row[0])
        return tid

    def _known_target(self, name: str) -> int | None:
        if name in self._target_ids:
            return self._target_ids[name]
        row = self._db.execute("SELECT id FROM targets WHERE name = ?", (name,)).fetchone()
        return None if row is None else int(row[0])

    def _source(self, name: str) -> int:
        sid = self._source_ids.get(name)
        if sid is None:
            self._db.execute("INSERT OR IGNORE INTO sources (name, is_log) VALUES (?, ?)",
                             (name, int(is_log_source(name))))
            sid = self._source_ids[name] = int(self._db.execute(
                "SELECT id FROM sources WHERE name = ?", (name,)).fetchone()[0])
        return sid

    # -- local games ------------------------------------------------------------------------

    def record_discovered(self, games: Sequence[LocalGame], targets: Iterable[str]) -> int:
        """Record completed games and queue each for every target; returns how many were new."""
        with self._lock, self._transaction():
            rows = [(g.game_id, self._source(g.source), g.config_key) for g in games]
            tids = [self._target(t) for t in targets]
            before = self._db.total_changes
            self._db.executemany("INSERT OR IGNORE INTO local_games (game_id, source_id, config_key) "
                                 "VALUES (?, ?, ?)", rows)
            new = self._db.total_changes - before
            upgraded = self._from_log_to_db(games)
            # A game found again elsewhere (a rotated or renamed file) is read from there now,
            # but never from a JSONL line once a DB row has it: the row is the richer copy.
            self._db.executemany(
                "UPDATE local_games SET source_id = ?2, config_key = ?3 WHERE game_id = ?1 "
                "AND source_id <> ?2 AND NOT (?4 AND NOT "
                "(SELECT is_log FROM sources s WHERE s.id = local_games.source_id))",
                [(gid, sid, key, int(is_log_source(g.source)))
                 for (gid, sid, key), g in zip(rows, games, strict=True)],
            )
            # Targets that got only the line get the game again; they merge its other rows by key.
            self._requeue(upgraded)
            for tid in tids:
                self._db.executemany(
                    f"INSERT OR IGNORE INTO queue SELECT ?1, k.game_id FROM local_games k "
                    f"WHERE k.game_id = ?2 AND NOT {_holds('?1')}",
                    [(tid, gid) for gid, _, _ in rows],
                )
        return new

    def _from_log_to_db(self, games: Sequence[LocalGame]) -> list[str]:
        """Games known from a JSONL log that a DB source has now (a Gumbel game has both)."""
        in_db = [g.game_id for g in games if not is_log_source(g.source)]
        found: list[str] = []
        for i in range(0, len(in_db), 500):
            chunk = in_db[i:i + 500]
            found += [r[0] for r in self._db.execute(
                f"SELECT k.game_id FROM local_games k JOIN sources s ON s.id = k.source_id "
                f"WHERE k.game_id IN ({','.join('?' * len(chunk))}) AND s.is_log", chunk)]
        return found

    def ensure_targets(self, targets: Iterable[str]) -> int:
        """Queue every known game not yet delivered to each target (a new or returning target).

        A target that already had everything queued costs nothing (restarts stay O(1));
        targets no longer listed are marked, so the games found while they were gone are
        queued for them when they come back.
        """
        names = list(dict.fromkeys(targets))
        added = 0
        with self._lock, self._transaction():
            tids = [self._target(t) for t in names]
            self._db.execute(f"UPDATE targets SET complete = 0 WHERE id NOT IN ({_marks(len(tids))})",
                             tids)
            for tid in tids:
                if self._db.execute("SELECT complete FROM targets WHERE id = ?", (tid,)).fetchone()[0]:
                    continue
                before = self._db.total_changes
                self._db.execute(f"INSERT OR IGNORE INTO queue SELECT ?1, k.game_id FROM local_games k "
                                 f"WHERE NOT {_holds('?1')}", (tid,))
                added += self._db.total_changes - before
                self._db.execute("UPDATE targets SET complete = 1 WHERE id = ?", (tid,))
        return added

    def pending(self, target: str, limit: int, *, after: str = "") -> list[LocalGame]:
        """Up to ``limit`` games owed to ``target``, in game-id order after ``after``.

        Keyset paging lets a sender walk a large outbox once while earlier pages are
        still in flight (and so still in the outbox).
        """
        with self._lock:
            tid = self._known_target(target)
            if tid is None:
                return []
            rows = self._db.execute(
                "SELECT q.game_id, s.name, k.config_key FROM queue q "
                "JOIN local_games k ON k.game_id = q.game_id JOIN sources s ON s.id = k.source_id "
                "WHERE q.target_id = ? AND q.game_id > ? ORDER BY q.game_id LIMIT ?",
                (tid, after, limit),
            ).fetchall()
        return [LocalGame(*row) for row in rows]

    def ack(self, target: str, game_ids: Sequence[str], *, note: str = "") -> None:
        """The target holds these games: record the delivery and clear the outbox, atomically.

        ``note`` says how, when not by a transfer ("shared": it sees our data dir;
        "refused": its RingRift trigger refused it). The first acknowledgement's note stays.
        """
        with self._lock, self._transaction():
            tid = self._target(target)
            if tid < BITS:
                bit = 1 << tid
                shared, refused = (bit if note == "shared" else 0), (bit if note == "refused" else 0)
                self._db.executemany(
                    "UPDATE local_games SET held = held | ?1, "
                    "shared = shared | (CASE WHEN held & ?1 THEN 0 ELSE ?2 END), "
                    "refused = refused | (CASE WHEN held & ?1 THEN 0 ELSE ?3 END) WHERE game_id = ?4",
                    [(bit, shared, refused, gid) for gid in game_ids])
            else:
                self._db.executemany("INSERT OR IGNORE INTO overflow VALUES (?, ?, ?)",
                                     [(tid, gid, note) for gid in game_ids])
            self._db.executemany("DELETE FROM queue WHERE target_id = ? AND game_id = ?",
                                 [(tid, gid) for gid in game_ids])

    def held_by(self, target: str, holders: Sequence[str], limit: int) -> list[str]:
        """Up to ``limit`` games owed to ``target`` that one of ``holders`` acknowledged."""
        with self._lock:
            tid = self._known_target(target)
            hids = [h for h in (self._known_target(n) for n in holders) if h is not None]
            if tid is None or not hids:
                return []
            rows = self._db.execute(
                f"SELECT q.game_id FROM queue q JOIN local_games k ON k.game_id = q.game_id "
                f"WHERE q.target_id = ? AND EXISTS (SELECT 1 FROM targets t WHERE "
                f"t.id IN ({_marks(len(hids))}) AND {_holds('t.id')}) ORDER BY q.game_id LIMIT ?",
                (tid, *hids, limit)).fetchall()
        return [str(r[0]) for r in rows]

    def requeue(self, game_ids: Sequence[str], target: str | None = None) -> int:
        """Queue delivered games again for every target that holds them (only ``target``,
        when given); returns rows queued.

        For games that gained rows at the source after they were shipped: the receiver
        merges the game's rows by key, so the new rows arrive exactly once.
        """
        with self._lock, self._transaction():
            if target is None:
                return self._requeue(game_ids)
            tid = self._known_target(target)
            return 0 if tid is None else self._requeue(game_ids, tid)

    def _requeue(self, game_ids: Sequence[str], tid: int | None = None) -> int:
        before = self._db.total_changes
        only = "" if tid is None else f" AND t.id = {int(tid)}"
        self._db.executemany(
            f"INSERT OR IGNORE INTO queue SELECT t.id, k.game_id FROM local_games k JOIN targets t "
            f"ON {_holds('t.id')} WHERE k.game_id = ?{only}",
            [(gid,) for gid in game_ids],
        )
        return self._db.total_changes - before

    # -- scan cursors -----------------------------------------------------------------------

    def child_cursors(self, source: str) -> dict[str, int] | None:
        """The per-table cursors an older ringsync saved for ``source`` (None if none): read
        once, when no scan cursor (``save_scan_cursor``, which holds them now) exists yet."""
        with self._lock:
            rows = self._db.execute("SELECT tbl, max_rowid FROM source_cursors WHERE source = ?",
                                    (source,)).fetchall()
        return {str(t): int(r) for t, r in rows} if rows else None

    def scan_cursor(self, source: str) -> dict[str, Any] | None:
        """The scan state saved for ``source`` by ``save_scan_cursor`` (None if none)."""
        with self._lock:
            row = self._db.execute("SELECT state FROM scan_cursors WHERE source = ?",
                                   (source,)).fetchone()
        if row is None:
            return None
        try:
            state = json.loads(row[0])
        except ValueError:
            return None  # rescanning from the start is always safe
        return state if isinstance(state, dict) else None

    def save_scan_cursor(self, source: str, state: dict[str, Any]) -> None:
        """Remember where ``source``'s scan stopped; call only after its games are recorded."""
        with self._lock, self._transaction():
            self._db.execute("INSERT OR REPLACE INTO scan_cursors VALUES (?, ?)",
                             (source, json.dumps(state, separators=(",", ":"))))

    # -- queries ----------------------------------------------------------------------------

    def delivered_from(self, source: str, limit: int, *, after: str = "") -> list[str]:
        """Up to ``limit`` games of ``source`` delivered somewhere, in game-id order after ``after``."""
        with self._lock:
            row = self._db.execute("SELECT id FROM sources WHERE name = ?", (source,)).fetchone()
            if row is None:
                return []
            rows = self._db.execute(
                "SELECT k.game_id FROM local_games k WHERE k.source_id = ? AND k.game_id > ? AND "
                "(k.held <> 0 OR EXISTS (SELECT 1 FROM overflow o WHERE o.game_id = k.game_id)) "
                "ORDER BY k.game_id LIMIT ?", (row[0], after, limit)).fetchall()
        return [r[0] for r in rows]

    def outbox_size(self, target: str) -> int:
        with self._lock:
            tid = self._known_target(target)
            if tid is None:
                return 0
            return int(self._db.execute("SELECT count(*) FROM queue WHERE target_id = ?",
                                        (tid,)).fetchone()[0])

    def has_pending(self, target: str) -> bool:
        with self._lock:
            tid = self._known_target(target)
            return tid is not None and self._db.execute(
                "SELECT 1 FROM queue WHERE target_id = ? LIMIT 1", (tid,)).fetchone() is not None

    def holders(self, game_id: str) -> list[str]:
        """The targets that hold ``game_id`` (acknowledged it), by name."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT t.name FROM local_games k JOIN targets t ON {_holds('t.id')} "
                f"WHERE k.game_id = ? ORDER BY t.name", (game_id,)).fetchall()
        return [r[0] for r in rows]

    def summary(self) -> dict[str, object]:
        """Counts for status views: games known, delivered and pending per target."""
        with self._lock:
            games = int(self._db.execute("SELECT count(*) FROM local_games").fetchone()[0])
            names = dict(self._db.execute("SELECT id, name FROM targets").fetchall())
            delivered: dict[str, int] = {}
            shared: dict[str, int] = {}
            for held, sh, n in self._db.execute(
                    "SELECT held, shared, count(*) FROM local_games WHERE held <> 0 GROUP BY held, shared"):
                for tid in range(min(BITS, max(names, default=-1) + 1)):
                    if held >> tid & 1:
                        delivered[names[tid]] = delivered.get(names[tid], 0) + n
                    if sh >> tid & 1:
                        shared[names[tid]] = shared.get(names[tid], 0) + n
            for tid, note, n in self._db.execute(
                    "SELECT target_id, note, count(*) FROM overflow GROUP BY target_id, note"):
                delivered[names[tid]] = delivered.get(names[tid], 0) + n
                if note == "shared":
                    shared[names[tid]] = shared.get(names[tid], 0) + n
            pending = {names[t]: n for t, n in self._db.execute(
                "SELECT target_id, count(*) FROM queue GROUP BY target_id")}
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
            db = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT,
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


def move_aside(path: Path) -> Path:
    """Rename an unreadable SQLite DB and its -wal/-shm to ``<name>.corrupt-<time>``, kept
    for a post-mortem; returns the new name."""
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    for suffix in ("", "-wal", "-shm"):
        part = Path(f"{path}{suffix}")
        if part.exists():
            part.rename(Path(f"{aside}{suffix}"))
    return aside


def _nonempty(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _migrate_v1(db: sqlite3.Connection) -> None:
    """Fold a manifest of one row per (target, game) into one row per game, in one transaction."""
    db.execute("INSERT OR IGNORE INTO targets (name) SELECT target FROM deliveries "
               "UNION SELECT target FROM outbox")
    db.execute("INSERT OR IGNORE INTO sources (name, is_log) SELECT DISTINCT source, "
               f"{_is_log('source')} FROM games")
    db.execute(
        "INSERT OR IGNORE INTO local_games SELECT g.game_id, s.id, g.config_key, "
        "coalesce((SELECT sum(1 << t.id) FROM deliveries d JOIN targets t ON t.name = d.target "
        f"  WHERE d.game_id = g.game_id AND t.id < {BITS}), 0), "
        "coalesce((SELECT sum(1 << t.id) FROM deliveries d JOIN targets t ON t.name = d.target "
        f"  WHERE d.game_id = g.game_id AND t.id < {BITS} AND d.note = 'shared'), 0), "
        "coalesce((SELECT sum(1 << t.id) FROM deliveries d JOIN targets t ON t.name = d.target "
        f"  WHERE d.game_id = g.game_id AND t.id < {BITS} AND d.note = 'refused'), 0) "
        "FROM games g JOIN sources s ON s.name = g.source")
    db.execute("INSERT OR IGNORE INTO overflow SELECT t.id, d.game_id, d.note FROM deliveries d "
               f"JOIN targets t ON t.name = d.target WHERE t.id >= {BITS}")
    db.execute("INSERT OR IGNORE INTO queue SELECT t.id, o.game_id FROM outbox o "
               "JOIN targets t ON t.name = o.target")
    for table in ("deliveries", "outbox", "games"):
        db.execute(f"DROP TABLE {table}")
    log.info("manifest converted to one row per game (targets as bits)")
