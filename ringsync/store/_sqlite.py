"""SQLite helpers shared by the source and merge sides of game DBs."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from ringsync.errors import CorruptDataError, StorageFullError
from ringsync.protocol.batch import (
    Column,
)
from ringsync.store.ringrift_schema import COMPLETED_STATUSES

log = logging.getLogger(__name__)

GAMES = "games"
GAME_ID = "game_id"
CHUNK = 500  # stays well below SQLite's bound-parameter limit
_COMPLETED = COMPLETED_STATUSES
# Terminal but never shipped: dropping them keeps incremental scans O(new + live games).
_ABANDONED = frozenset({"aborted", "abandoned", "cancelled", "canceled", "failed", "error"})
_CORRUPT_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_SIDECAR_SUFFIXES = ("-wal", "-shm", "-journal")
_SQLITE_MAGIC = b"SQLite format 3\x00"


def use_wal(conn: sqlite3.Connection, timeout: float) -> None:
    """PRAGMA journal_mode=WAL, waiting for a lock as long as ``timeout``: on a new DB,
    connections switching it at the same moment get "database is locked" at once, without
    SQLite's busy handler (seen when a node's file daemon and file server open its journal
    together at first start)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            busy = exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def _q(name: str) -> str:
    """Quote an identifier that already passed is_safe_identifier."""
    return f'"{name}"'


def stat_key(path: Path) -> tuple[int, int, int] | None:
    """(mtime, size, inode) of ``path`` without opening it (None if absent): a change stamp."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _open_readonly(path: Path, *, immutable: bool = False) -> sqlite3.Connection:
    """A read-only connection: never creates the DB, never checkpoints a live writer's WAL."""
    uri = path.resolve().as_uri() + ("?mode=ro&immutable=1" if immutable else "?mode=ro")
    conn = sqlite3.connect(uri, uri=True, timeout=5.0,
                           isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA query_only=1")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


@contextmanager
def _sqlite_errors(path: Path) -> Iterator[None]:
    """Translate 'not a database' / corruption / cannot open into CorruptDataError."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        code = getattr(exc, "sqlite_errorcode", -1) & 0xFF  # primary code of an extended one
        if code in _CORRUPT_CODES or code == sqlite3.SQLITE_CANTOPEN:
            raise CorruptDataError(f"{path}: cannot read game DB: {exc}") from exc
        if code == sqlite3.SQLITE_FULL:
            raise StorageFullError(
                f"{path}: disk or quota full, batch rolled back; free space in {path.parent}"
            ) from exc
        raise


def _open_source(path: Path) -> sqlite3.Connection:
    """An in-memory connection with the live DB attached read-only as ``src``.

    Batch images are built in in-memory DBs attached next to it, so rows move inside SQLite.
    mode=ro: never creates the DB, never writes or checkpoints the live writer's WAL.
    """
    conn = sqlite3.connect(":memory:", uri=True, timeout=5.0,
                           isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA temp_store=MEMORY")
        conn.execute("ATTACH ? AS src", (path.resolve().as_uri() + "?mode=ro",))
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def _transaction(conn: sqlite3.Connection, begin: str = "BEGIN") -> Iterator[None]:
    conn.execute(begin)
    try:
        yield
    except BaseException:
        if conn.in_transaction:  # some errors (e.g. disk full) already rolled back
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _load_ids(conn: sqlite3.Connection, ids: Iterable[str]) -> None:
    """Put ``ids`` into temp.batch_ids, the set that copies and checks join against."""
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS batch_ids (game_id TEXT PRIMARY KEY)")
    conn.execute("DELETE FROM temp.batch_ids")
    conn.executemany("INSERT OR IGNORE INTO temp.batch_ids VALUES (?)", ((i,) for i in ids))


_IN_IDS = f"{_q(GAME_ID)} IN (SELECT game_id FROM temp.batch_ids)"


def _table_columns(conn: sqlite3.Connection, table: str,
                   schema: str = "main") -> tuple[Column, ...]:
    info = conn.execute(f"PRAGMA {_q(schema)}.table_info({_q(table)})").fetchall()
    return tuple(Column(str(r[1]), str(r[2] or ""), int(r[5]), bool(r[3])) for r in info)


# -- helpers for status and tests ----------------------------------------------------------


def count_games(db_path: Path) -> int:
    """Number of rows in the games table of ``db_path`` (0 if there is none)."""
    if not Path(db_path).is_file():
        return 0
    with _sqlite_errors(Path(db_path)), closing(_open_readonly(Path(db_path))) as conn:
        if not _table_columns(conn, GAMES):
            return 0
        return int(conn.execute(f"SELECT count(*) FROM {_q(GAMES)}").fetchone()[0])


def game_ids(db_path: Path) -> set[str]:
    """Every game_id in the games table of ``db_path``."""
    if not Path(db_path).is_file():
        return set()
    with _sqlite_errors(Path(db_path)), closing(_open_readonly(Path(db_path))) as conn:
        if not _table_columns(conn, GAMES):
            return set()
        return {str(r[0]) for r in conn.execute(f"SELECT {_q(GAME_ID)} FROM {_q(GAMES)}")}

@contextmanager
def _attached_memory(conn: sqlite3.Connection, name: str) -> Iterator[None]:
    """An empty in-memory DB attached as ``name`` (outside any transaction) for the block."""
    conn.execute(f"ATTACH ':memory:' AS {_q(name)}")
    try:
        yield
    finally:
        conn.execute(f"DETACH {_q(name)}")
