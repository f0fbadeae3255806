"""FileManifest: the files this node holds (size, mtime, inode, BLAKE3) and its transfer journal."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ringsync.errors import CorruptDataError
from ringsync.files.kinds import FileKind

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
"""

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
    """SQLite at <state dir>/files.db; thread-safe (one lock), so async code calls it in
    worker threads. The file records are derived state (a scan rebuilds them); the
    transfers table is the one durable journal of file-sync intents."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = _open(path)
        except sqlite3.DatabaseError as exc:
            self._db = _quarantine_and_reopen(path, exc)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _txn(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

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
        with self._txn() as db:
            db.execute("DELETE FROM gone WHERE gone_at < ?", (time.time() - keep_days * 86400,))
            rows = db.execute("SELECT kind, relpath, hash FROM gone").fetchall()
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
    # As DataManifest opens its DB: WAL, and a full check only after a crash left a WAL.
    wal = Path(f"{path}-wal")
    crashed = wal.exists() and wal.stat().st_size > 0
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        if crashed and db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise sqlite3.DatabaseError("quick_check failed")
        db.execute("PRAGMA schema_version").fetchone()  # garbage: 'not a database'
        db.executescript(_SCHEMA)
    except BaseException:
        db.close()
        raise
    return db


def _quarantine_and_reopen(path: Path, exc: Exception) -> sqlite3.Connection:
    # Derived state: a scan re-hashes what is on disk; in-flight downloads start over.
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    for suffix in ("", "-wal", "-shm"):
        part = Path(f"{path}{suffix}")
        if part.exists():
            part.rename(Path(f"{aside}{suffix}"))
    log.error("file manifest %s is unreadable (%s); moved it to %s and starting a fresh one "
              "(local files are hashed again)", path, exc, aside)
    try:
        return _open(path)
    except sqlite3.DatabaseError as again:
        raise CorruptDataError(f"cannot create file manifest {path}: {again}") from again
