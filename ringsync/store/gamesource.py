"""GameSource: completed games from a live selfplay DB, read without copying the file."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ringsync.errors import CorruptDataError
from ringsync.protocol.batch import (
    Column,
    GameBatch,
    TableSchema,
    config_key_for,
    image_table_sql,
    is_safe_decl_type,
    is_safe_identifier,
)
from ringsync.store._sqlite import (
    _ABANDONED,
    _COMPLETED,
    _IN_IDS,
    GAME_ID,
    GAMES,
    _attached_memory,
    _chunks,
    _load_ids,
    _marks,
    _open_source,
    _q,
    _sqlite_errors,
    _table_columns,
    _transaction,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SourceGame:
    """A game that became completed in a source DB."""

    game_id: str
    config_key: str



# -- source side ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Cursor:
    """Where the last scan stopped: highest rowid seen, and the rowids still in progress."""

    max_rowid: int = 0
    pending: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Layout:
    """Which of the optional games columns a source DB has, and its per-game tables."""

    games: tuple[Column, ...]
    children: tuple[tuple[str, tuple[Column, ...]], ...]

    def has(self, name: str) -> bool:
        return any(c.name == name for c in self.games)

    def index(self, name: str) -> int | None:
        return next((i for i, c in enumerate(self.games) if c.name == name), None)


class GameSource:
    """One live selfplay DB, attached read-only to one persistent in-memory connection.

    Thread-safe: calls are serialised, so scan() and extract() may come from worker threads.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.last_scan_rows = 0  # rows examined by the last scan (cost accounting)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._cursor = _Cursor()
        self._stamp: tuple[object, ...] | None = None
        self._layout: tuple[int, _Layout] | None = None

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def changed(self) -> bool:
        """True when the DB or its WAL changed since the last scan (a few stat calls)."""
        return self._stat() != self._stamp

    def _stat(self) -> tuple[object, ...]:
        return tuple(_stat_key(self.path.with_name(self.path.name + s)) for s in ("", "-wal"))

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """The connection, used by one caller at a time; SQLite errors name the source DB."""
        with self._lock, _sqlite_errors(self.path):
            if self._conn is None:
                self._conn = _open_source(self.path)
            yield self._conn

    @contextmanager
    def _read(self) -> Iterator[tuple[sqlite3.Connection, _Layout]]:
        """One read transaction, so every query sees the same snapshot."""
        with self._connection() as conn, _transaction(conn):
            yield conn, self._schema(conn)

    def _schema(self, conn: sqlite3.Connection) -> _Layout:
        version = int(conn.execute("PRAGMA src.schema_version").fetchone()[0])
        if self._layout is None or self._layout[0] != version:
            self._layout = (version, _read_layout(conn, self.path))
        return self._layout[1]

    def scan(self) -> list[SourceGame]:
        """Games completed since the previous scan, each reported once per GameSource."""
        stamp = self._stat()  # taken first: a commit during the scan triggers another
        with self._read() as (conn, layout):
            self.last_scan_rows = 0
            found: list[SourceGame] = []
            if layout.games:
                select = _scan_select(layout)
                # Re-check first: rows added by this scan need no second look.
                found = self._recheck(conn, select) + self._scan_new(conn, select)
        self._stamp = stamp
        return found

    def _scan_new(self, conn: sqlite3.Connection, select: str) -> list[SourceGame]:
        cur = self._cursor
        rows = conn.execute(f"{select} WHERE rowid > ? ORDER BY rowid", (cur.max_rowid,))
        found, examined = [], 0
        for rowid, gid, status, board, players in rows:
            examined += 1
            cur.max_rowid = rowid
            game = self._classify(rowid, gid, status, board, players)
            if game is not None:
                found.append(game)
        self.last_scan_rows += examined
        return found

    def _recheck(self, conn: sqlite3.Connection, select: str) -> list[SourceGame]:
        """Re-read only the rows that were in progress before this scan."""
        cur = self._cursor
        waiting = list(cur.pending)
        found = []
        for chunk in _chunks(waiting):
            seen = set()
            for rowid, gid, status, board, players in conn.execute(
                    f"{select} WHERE rowid IN ({_marks(len(chunk))})", chunk):
                seen.add(rowid)
                game = self._classify(rowid, gid, status, board, players)
                if game is not None:
                    found.append(game)
            for gone in set(chunk) - seen:  # deleted (aborted) games
                cur.pending.pop(gone, None)
            self.last_scan_rows += len(seen)
        return found

    def _classify(self, rowid: int, gid: object, status: object, board: object,
                  players: object) -> SourceGame | None:
        state = str(status).lower()
        if state in _COMPLETED and isinstance(gid, str):
            self._cursor.pending.pop(rowid, None)
            return SourceGame(gid, config_key_for(board, players))
        if state in _ABANDONED or not isinstance(gid, str):
            self._cursor.pending.pop(rowid, None)
        else:
            self._cursor.pending[rowid] = gid
        return None

    def extract(self, game_ids: Sequence[str], *, source_node: str) -> list[GameBatch]:
        """All rows of the completed games among ``game_ids``, one GameBatch per config key.

        The rows are copied inside SQLite, from one snapshot, into an in-memory DB whose
        image becomes the batch; ids that are not found or not completed are skipped.
        """
        wanted = list(dict.fromkeys(game_ids))
        if not wanted:
            return []
        with self._connection() as conn, _attached_memory(conn, "out"):
            with _transaction(conn):
                layout = self._schema(conn)
                groups = _completed_games(conn, layout, wanted) if layout.games else {}
                tables = _copy_games(conn, layout, groups) if groups else ()
            if len(groups) == 1:
                ((key, ids),) = groups.items()
                return [GameBatch(source_node, key, tuple(ids), tables,
                                  conn.serialize(name="out"))]
            return [_split_image(conn, source_node, key, ids, tables)
                    for key, ids in groups.items()]




def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _scan_select(layout: _Layout) -> str:
    # Without a game_status column every row is a finished game.
    status = _q("game_status") if layout.has("game_status") else "'completed'"
    cols = [_q(c) if layout.has(c) else "NULL" for c in ("board_type", "num_players")]
    return f"SELECT rowid, {_q(GAME_ID)}, {status}, {', '.join(cols)} FROM src.{_q(GAMES)}"


def _read_layout(conn: sqlite3.Connection, path: Path) -> _Layout:
    names = [str(r[0]) for r in conn.execute(
        "SELECT name FROM src.sqlite_master WHERE type='table' ORDER BY name")]
    games = _safe_columns(_table_columns(conn, GAMES, "src"), GAMES, path) if GAMES in names else ()
    if games and not any(c.name == GAME_ID for c in games):
        raise CorruptDataError(f"{path}: table games has no game_id column")
    if games and _without_rowid(conn):
        raise CorruptDataError(f"{path}: a WITHOUT ROWID games table is not supported")
    children = []
    for name in names:
        if name == GAMES or not is_safe_identifier(name):
            continue
        cols = _safe_columns(_table_columns(conn, name, "src"), name, path)
        if any(c.name == GAME_ID for c in cols):
            children.append((name, cols))
    return _Layout(games, tuple(children))


def _without_rowid(conn: sqlite3.Connection) -> bool:
    """True when games has no rowid, which the incremental scan cursor relies on."""
    try:
        conn.execute(f"SELECT rowid FROM src.{_q(GAMES)} LIMIT 0")
    except sqlite3.OperationalError:
        return True
    return False


def _safe_columns(columns: Iterable[Column], table: str, path: Path) -> tuple[Column, ...]:
    """Drop columns a receiver would refuse; blank out declared types it would refuse."""
    out = []
    for c in columns:
        if not is_safe_identifier(c.name):
            log.warning("%s: not shipping column %s.%r (unsafe name)", path, table, c.name)
            continue
        out.append(c if is_safe_decl_type(c.decl_type) else Column(c.name, "", c.pk, c.notnull))
    return tuple(out)


def _completed_games(conn: sqlite3.Connection, layout: _Layout,
                     ids: Sequence[str]) -> dict[str, list[str]]:
    """The completed games among ``ids``, grouped by config key."""
    _load_ids(conn, ids)
    groups: dict[str, list[str]] = {}
    for _, gid, status, board, players in conn.execute(f"{_scan_select(layout)} WHERE {_IN_IDS}"):
        if str(status).lower() in _COMPLETED and isinstance(gid, str):
            groups.setdefault(config_key_for(board, players), []).append(gid)
    return groups


def _copy_games(conn: sqlite3.Connection, layout: _Layout,
                groups: dict[str, list[str]]) -> tuple[TableSchema, ...]:
    """Copy the rows of every game in ``groups`` from src into out, table by table."""
    tables = (TableSchema(GAMES, layout.games),
              *(TableSchema(name, cols) for name, cols in layout.children))
    _load_ids(conn, (gid for ids in groups.values() for gid in ids))
    for table in tables:
        cols = ", ".join(_q(c.name) for c in table.columns)
        conn.execute(image_table_sql(table, "out"))
        conn.execute(f"INSERT INTO out.{_q(table.name)} SELECT {cols} "
                     f"FROM src.{_q(table.name)} WHERE {_IN_IDS}")
    return tables


def _split_image(conn: sqlite3.Connection, source_node: str, key: str, ids: list[str],
                 tables: tuple[TableSchema, ...]) -> GameBatch:
    """The batch of one config key, when the games of one extract span several."""
    with _attached_memory(conn, "part"):
        with _transaction(conn):
            _load_ids(conn, ids)
            for table in tables:
                conn.execute(image_table_sql(table, "part"))
                conn.execute(f"INSERT INTO part.{_q(table.name)} "
                             f"SELECT * FROM out.{_q(table.name)} WHERE {_IN_IDS}")
        return GameBatch(source_node, key, tuple(ids), tables, conn.serialize(name="part"))


