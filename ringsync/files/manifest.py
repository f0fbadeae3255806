"""FileManifest: the files this node holds (size, mtime, inode, BLAKE3) and its transfer journal,
kept in the node's one journal DB beside the games' outboxes and acknowledgements."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ringsync.errors import CorruptDataError
from ringsync.files.kinds import FileKind
from ringsync.store._sqlite import use_wal
from ringsync.store.manifest import BUSY_TIMEOUT, move_aside

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    kind TEXT NOT NULL,
    relpath TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    hash TEXT NOT NULL,            -- BLAKE3 hex of the content; '' for a symlink
    link_target TEXT,              -- a symlink's relative target; NULL for a regular file
    PRIMARY KEY (kind, relpath)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS files_by_hash ON files (hash);
CREATE TABLE IF NOT EXISTS gone (
    kind TEXT NOT NULL,
    relpath TEXT NOT NULL,
    hash TEXT NOT NULL,            -- a version removed here: never fetched back under this name
    gone_at REAL NOT NULL,
    PRIMARY KEY (kind, relpath, hash)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS transfers (
    kind TEXT NOT NULL,
    relpath TEXT NOT NULL,
    hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    done INTEGER NOT NULL,         -- bytes of the part file fsynced so far
    source TEXT NOT NULL,          -- the peer the last bytes came from
    PRIMARY KEY (kind, relpath)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journal_imports (
    name TEXT PRIMARY KEY,         -- a DB an older ringsync kept apart, folded in here once
    imported_at REAL NOT NULL
) WITHOUT ROWID;
"""
_TABLES = ("files", "gone", "transfers")  # what an older ringsync kept in its own files.db
LEGACY_NAME = "files.db"

StatKey = tuple[int, int, int]  # (size, mtime_ns, inode)
GONE_KEEP_DAYS = 30.0  # how long a version removed here is not fetched back


@dataclass(frozen=True, slots=True)
class FileRecord:
    """A complete file (or symlink) under a kind's directory, as last hashed."""

    kind: FileKind
    relpath: str
    size: int
    mtime_ns: int
    inode: int
    hash: str
    link_target: str | None = None

    @property
    def stat_key(self) -> StatKey:
        return (self.size, self.mtime_ns, self.inode)


@dataclass(frozen=True, slots=True)
class Transfer:
    """A download in flight: what it must become and how much of it is safely on disk."""

    kind: FileKind
    relpath: str
    hash: str
    size: int
    mtime_ns: int
    done: int
    source: str


class FileManifest:
    """The file tables of the node's journal (``<state dir>/manifest.db``, which
    DataManifest opens first and checks); thread-safe (one lock), so async code calls it
    in worker threads. The file records are derived state (a scan rebuilds them); the
    transfers table is the node's durable record of file-sync intents.

    Its own connection: file checkpoints and game acknowledgements serialize in SQLite
    (WAL, short transactions, a busy timeout), never on each other's locks. A ``files.db``
    an older ringsync left beside the journal is imported once, on open.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = _open(path)
        try:
            legacy = path.with_name(LEGACY_NAME)
            if legacy != path:
                import_legacy(self._db, legacy)
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _txn(self) -> Iterator[sqlite3.Connection]:
        with self._lock, _write(self._db):
            yield self._db

    # -- files --------------------------------------------------------------------------------

    def records(self) -> list[FileRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM files ORDER BY kind, relpath").fetchall()
        return [_record(r) for r in rows]

    def _one(self, table: str, kind: FileKind, relpath: str) -> tuple[object, ...] | None:
        with self._lock:
            row: tuple[object, ...] | None = self._db.execute(
                f"SELECT * FROM {table} WHERE kind = ? AND relpath = ?", (kind.value, relpath)
            ).fetchone()
        return row

    def get(self, kind: FileKind, relpath: str) -> FileRecord | None:
        row = self._one("files", kind, relpath)
        return None if row is None else _record(row)

    def with_hash(self, digest: str) -> list[FileRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM files WHERE hash = ? AND link_target IS NULL",
                                    (digest,)).fetchall()
        return [_record(r) for r in rows]

    def record(self, rec: FileRecord) -> None:
        with self._txn() as db:
            _upsert(db, rec)

    def forget(self, kind: FileKind, relpath: str) -> None:
        """The file is no longer here: removed, archived or renamed by someone on this node.
        Its version is remembered so that peers still holding it do not bring it back."""
        with self._txn() as db:
            db.execute("INSERT OR REPLACE INTO gone SELECT kind, relpath, hash, ? FROM files "
                       "WHERE kind = ? AND relpath = ? AND link_target IS NULL",
                       (time.time(), kind.value, relpath))
            db.execute("DELETE FROM files WHERE kind = ? AND relpath = ?", (kind.value, relpath))

    def gone(self, *, keep_days: float = GONE_KEEP_DAYS) -> set[tuple[FileKind, str, str]]:
        """(kind, relpath, hash) of versions removed here in the last ``keep_days``."""
        cutoff = time.time() - keep_days * 86400
        with self._lock:  # a write only when there is something to prune: the journal is shared
            if self._db.execute("SELECT 1 FROM gone WHERE gone_at < ? LIMIT 1", (cutoff,)).fetchone():
                with _write(self._db):
                    self._db.execute("DELETE FROM gone WHERE gone_at < ?", (cutoff,))
            rows = self._db.execute("SELECT kind, relpath, hash FROM gone").fetchall()
        return {(FileKind(k), str(r), str(h)) for k, r, h in rows}

    # -- the transfer journal -------------------------------------------------------------------

    def transfers(self) -> list[Transfer]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM transfers").fetchall()
        return [_transfer(r) for r in rows]

    def transfer(self, kind: FileKind, relpath: str) -> Transfer | None:
        row = self._one("transfers", kind, relpath)
        return None if row is None else _transfer(row)

    def save_transfer(self, t: Transfer) -> None:
        with self._txn() as db:
            db.execute("INSERT OR REPLACE INTO transfers VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (t.kind.value, t.relpath, t.hash, t.size, t.mtime_ns, t.done, t.source))

    def drop_transfer(self, t: Transfer) -> bool:
        """Close the journal entry ``t`` without a file (abandoned); False when the entry is
        no longer ``t``'s version (a new download of that name took it over meanwhile)."""
        with self._txn() as db:
            cur = db.execute("DELETE FROM transfers WHERE kind = ? AND relpath = ? AND hash = ?",
                             (t.kind.value, t.relpath, t.hash))
            return cur.rowcount > 0

    def publish_many(self, recs: Sequence[FileRecord]) -> None:
        """``publish`` for a batch (an rsync run), in one transaction."""
        with self._txn() as db:
            for rec in recs:
                _upsert(db, rec)
                db.execute("DELETE FROM transfers WHERE kind = ? AND relpath = ?",
                           (rec.kind.value, rec.relpath))

    def publish(self, rec: FileRecord) -> None:
        """Record a verified, renamed download and close its journal entry, in one transaction."""
        with self._txn() as db:
            _upsert(db, rec)
            db.execute("DELETE FROM transfers WHERE kind = ? AND relpath = ?",
                       (rec.kind.value, rec.relpath))


def _upsert(db: sqlite3.Connection, rec: FileRecord) -> None:
    db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)",
               (rec.kind.value, rec.relpath, rec.size, rec.mtime_ns, rec.inode, rec.hash,
                rec.link_target))


def _record(row: tuple[object, ...]) -> FileRecord:
    kind, relpath, size, mtime_ns, inode, digest, link = row
    return FileRecord(FileKind(kind), str(relpath), int(size), int(mtime_ns),  # type: ignore[call-overload]
                      int(inode), str(digest), None if link is None else str(link))  # type: ignore[call-overload]


def _transfer(row: tuple[object, ...]) -> Transfer:
    kind, relpath, digest, size, mtime_ns, done, source = row
    return Transfer(FileKind(kind), str(relpath), str(digest), int(size),  # type: ignore[call-overload]
                    int(mtime_ns), int(done), str(source))  # type: ignore[call-overload]


def _open(path: Path) -> sqlite3.Connection:
    # No quarantine here: the journal holds the games' outboxes too, and DataManifest,
    # which opens it first at node start, checks it and moves a corrupt one aside.
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                         timeout=BUSY_TIMEOUT)
    try:
        use_wal(db, BUSY_TIMEOUT)
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA schema_version").fetchone()  # garbage: 'not a database'
        db.executescript(_SCHEMA)
    except sqlite3.DatabaseError as exc:
        db.close()
        if not _is_corrupt(exc):
            raise
        raise CorruptDataError(
            f"node journal {path} is unreadable ({exc}): stop ringsync on this node and move "
            f"{path} aside (with its -wal and -shm files); the next start creates a fresh one "
            "(local games are rescanned, files hashed again, downloads start over)") from exc
    except BaseException:
        db.close()
        raise
    return db


# -- the one-time import of an older ringsync's files.db ------------------------------------------


def import_legacy(db: sqlite3.Connection, legacy: Path) -> bool:
    """Fold ``legacy`` (an older ringsync's files.db) into the journal ``db``, then remove it.

    The rows and the mark that they are in go in one transaction, fsynced, before the old
    file is touched; a crash at any point leaves a state the next open completes (import
    not committed: import again; committed: only remove what is left). True if imported now.
    """
    if not any(p.exists() for p in _with_sidecars(legacy)):
        return False
    imported = False
    if legacy.exists():
        db.execute("PRAGMA synchronous=FULL")  # the commit is on disk before the old file goes
        try:
            with _write(db):
                if db.execute("SELECT 1 FROM journal_imports WHERE name = ?",
                              (LEGACY_NAME,)).fetchone() is None:
                    imported = _copy_legacy(db, legacy)
        finally:
            db.execute("PRAGMA synchronous=NORMAL")
    _remove_legacy(legacy)
    return imported


def _with_sidecars(path: Path) -> tuple[Path, Path, Path]:
    # The main file first: sidecars without it are never read again, whatever is left.
    return (path, Path(f"{path}-wal"), Path(f"{path}-shm"))


@contextmanager
def _write(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _copy_legacy(db: sqlite3.Connection, legacy: Path) -> bool:
    """Inside the caller's transaction: copy the old tables and mark them imported. An
    unreadable old file is moved aside instead (derived state: files are hashed again and
    its downloads start over), as the old manifest's own open did."""
    rows: dict[str, tuple[list[str], list[tuple[object, ...]]]] = {}
    try:
        # Read-only: a files.db another opener removed meanwhile is not created empty.
        with contextlib.closing(sqlite3.connect(f"{legacy.as_uri()}?mode=ro", uri=True,
                                                timeout=BUSY_TIMEOUT)) as old:
            for table in _TABLES:
                columns = [str(r[1]) for r in old.execute(f"PRAGMA table_info({table})")]
                if columns:
                    rows[table] = (columns, old.execute(
                        f"SELECT {','.join(columns)} FROM {table}").fetchall())
    except sqlite3.DatabaseError as exc:
        if not _is_corrupt(exc):
            raise
        aside = move_aside(legacy)
        log.error("old file manifest %s is unreadable (%s); moved it to %s (local files are "
                  "hashed again, its downloads start over)", legacy, exc, aside)
        return False
    for table, (columns, found) in rows.items():
        db.executemany(f"INSERT OR IGNORE INTO {table} ({','.join(columns)}) "
                       f"VALUES ({','.join('?' * len(columns))})", found)
    db.execute("INSERT INTO journal_imports VALUES (?, ?)", (LEGACY_NAME, time.time()))
    log.info("imported %s into the node journal (%s); it is removed now", legacy,
             ", ".join(f"{table}: {len(found)} rows" for table, (_, found) in rows.items()))
    return True


def _is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    """Unreadable for good (garbage, a damaged page), not busy or out of disk for now."""
    code = getattr(exc, "sqlite_errorcode", -1) & 0xFF  # the primary code of an extended one
    return code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _remove_legacy(legacy: Path) -> None:
    for part in _with_sidecars(legacy):
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
    fd = os.open(legacy.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
