"""Game DBs: extract completed games from a live selfplay DB, merge batches at the receiver."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any

from ringsync.errors import BadInputError, CorruptDataError, UnsafePathError
from ringsync.protocol.batch import (
    Column,
    GameBatch,
    TableRows,
    config_key_for,
    is_safe_decl_type,
    is_safe_identifier,
    validate_config_key,
)

__all__ = [
    "GameMerger",
    "GameSource",
    "MergeResult",
    "SourceGame",
    "count_games",
    "discover_sources",
    "game_ids",
]

log = logging.getLogger(__name__)

GAMES = "games"
GAME_ID = "game_id"
CHUNK = 500  # stays well below SQLite's bound-parameter limit
_COMPLETED = frozenset({"completed", "finished"})
# Terminal but never shipped: dropping them keeps incremental scans O(new + live games).
_ABANDONED = frozenset({"aborted", "abandoned", "cancelled", "canceled", "failed", "error"})
_CORRUPT_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_SIDECAR_SUFFIXES = ("-wal", "-shm", "-journal")
_SQLITE_MAGIC = b"SQLite format 3\x00"


@dataclass(frozen=True, slots=True)
class SourceGame:
    """A game that became completed in a source DB."""

    game_id: str
    config_key: str


@dataclass(frozen=True, slots=True)
class MergeResult:
    """What one merge did: games added and games already present."""

    inserted: int
    duplicates: int


def _q(name: str) -> str:
    """Quote an identifier that already passed is_safe_identifier."""
    return f'"{name}"'


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
        raise


def _table_columns(conn: sqlite3.Connection, table: str) -> tuple[Column, ...]:
    info = conn.execute(f"PRAGMA table_info({_q(table)})").fetchall()
    return tuple(Column(str(r[1]), str(r[2] or ""), int(r[5]), bool(r[3])) for r in info)


# -- discovery -----------------------------------------------------------------------------


def discover_sources(games_dir: Path, *, exclude: Path) -> list[Path]:
    """SQLite DBs under ``games_dir`` whose ``games`` table has ``game_id`` (not under exclude)."""
    if not games_dir.is_dir():
        return []
    excluded = exclude.resolve()
    found = []
    for path in sorted(games_dir.rglob("*.db")):
        if _is_candidate(path, games_dir, excluded) and _has_games_table(path):
            found.append(path)
    return found


def _is_candidate(path: Path, root: Path, excluded: Path) -> bool:
    parts = path.relative_to(root).parts
    if any(p.startswith((".", "~")) or ".tmp" in p for p in parts):
        return False
    if path.name.endswith(_SIDECAR_SUFFIXES) or not path.is_file():
        return False
    return not path.resolve().is_relative_to(excluded)


def _has_games_table(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            header = fh.read(20)
        if len(header) < 20 or header[:16] != _SQLITE_MAGIC:
            return False
        # A WAL DB with no -shm has no live connection: a read-only open would create
        # -wal/-shm files nobody asked for, so read the (checkpointed) file as immutable.
        idle_wal = header[18] == 2 and not path.with_name(path.name + "-shm").exists()
        with closing(_open_readonly(path, immutable=idle_wal)) as conn:
            return any(c.name == GAME_ID for c in _table_columns(conn, GAMES))
    except (OSError, sqlite3.Error) as exc:
        log.warning("skipping %s: not a readable game DB (%s)", path, exc)
        return False


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
    """One live selfplay DB, read through one persistent read-only connection.

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

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = _open_readonly(self.path)
        return self._conn

    @contextmanager
    def _read(self) -> Iterator[tuple[sqlite3.Connection, _Layout]]:
        """One read transaction, so every query sees the same snapshot."""
        with self._lock, _sqlite_errors(self.path):
            conn = self._connection()
            conn.execute("BEGIN")
            try:
                yield conn, self._schema(conn)
            finally:
                conn.execute("COMMIT")

    def _schema(self, conn: sqlite3.Connection) -> _Layout:
        version = int(conn.execute("PRAGMA schema_version").fetchone()[0])
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
        """All rows of the completed games among ``game_ids``, one GameBatch per config key."""
        wanted = list(dict.fromkeys(game_ids))
        with self._read() as (conn, layout):
            if not layout.games or not wanted:
                return []
            groups = _completed_games(conn, layout, wanted)
            if not groups:
                return []
            children = [(name, cols, _select_rows(conn, name, cols, wanted))
                        for name, cols in layout.children]
        return _build_batches(source_node, layout.games, groups, children)


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
    return f"SELECT rowid, {_q(GAME_ID)}, {status}, {', '.join(cols)} FROM {_q(GAMES)}"


def _read_layout(conn: sqlite3.Connection, path: Path) -> _Layout:
    names = [str(r[0]) for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
    games = _safe_columns(_table_columns(conn, GAMES), GAMES, path) if GAMES in names else ()
    if games and not any(c.name == GAME_ID for c in games):
        raise CorruptDataError(f"{path}: table games has no game_id column")
    if games and _without_rowid(conn):
        raise CorruptDataError(f"{path}: a WITHOUT ROWID games table is not supported")
    children = []
    for name in names:
        if name == GAMES or not is_safe_identifier(name):
            continue
        cols = _safe_columns(_table_columns(conn, name), name, path)
        if any(c.name == GAME_ID for c in cols):
            children.append((name, cols))
    return _Layout(games, tuple(children))


def _without_rowid(conn: sqlite3.Connection) -> bool:
    """True when games has no rowid, which the incremental scan cursor relies on."""
    try:
        conn.execute(f"SELECT rowid FROM {_q(GAMES)} LIMIT 0")
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


def _select_rows(conn: sqlite3.Connection, table: str, cols: tuple[Column, ...],
                 ids: Sequence[str]) -> list[tuple[Any, ...]]:
    sql = f"SELECT {', '.join(_q(c.name) for c in cols)} FROM {_q(table)} WHERE {_q(GAME_ID)} IN "
    rows: list[tuple[Any, ...]] = []
    for chunk in _chunks(ids):
        rows.extend(conn.execute(sql + f"({_marks(len(chunk))})", chunk))
    return rows


def _completed_games(conn: sqlite3.Connection, layout: _Layout,
                     ids: Sequence[str]) -> dict[str, list[tuple[Any, ...]]]:
    """Completed games rows, grouped by config key."""
    rows = _select_rows(conn, GAMES, layout.games, ids)
    status, board, players = (layout.index(n) for n in ("game_status", "board_type",
                                                          "num_players"))
    groups: dict[str, list[tuple[Any, ...]]] = {}
    for row in rows:
        if status is not None and str(row[status]).lower() not in _COMPLETED:
            continue
        key = config_key_for(None if board is None else row[board],
                             None if players is None else row[players])
        groups.setdefault(key, []).append(row)
    return groups


def _build_batches(
    source_node: str, games_cols: tuple[Column, ...], groups: dict[str, list[tuple[Any, ...]]],
    children: list[tuple[str, tuple[Column, ...], list[tuple[Any, ...]]]],
) -> list[GameBatch]:
    gid_at = next(i for i, c in enumerate(games_cols) if c.name == GAME_ID)
    owner = {row[gid_at]: key for key, rows in groups.items() for row in rows}
    split: dict[str, list[TableRows]] = {k: [TableRows(GAMES, games_cols, r)]
                                         for k, r in groups.items()}
    for name, cols, rows in children:
        for key, part in _split_rows(cols, rows, owner, groups.keys()).items():
            split[key].append(TableRows(name, cols, part))
    return [GameBatch(source_node, key, tuple(r[gid_at] for r in groups[key]), tuple(tables))
            for key, tables in split.items()]


def _split_rows(cols: tuple[Column, ...], rows: list[tuple[Any, ...]], owner: dict[Any, str],
                keys: Iterable[str]) -> dict[str, list[tuple[Any, ...]]]:
    """Child rows per config key; rows of games that were not shipped are dropped."""
    gid = next(i for i, c in enumerate(cols) if c.name == GAME_ID)
    out: dict[str, list[tuple[Any, ...]]] = {k: [] for k in keys}
    for row in rows:
        key = owner.get(row[gid])
        if key is not None:
            out[key].append(row)
    return out


# -- receiver side -------------------------------------------------------------------------

_REJECTED = (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError,
             sqlite3.DataError, OverflowError, TypeError, ValueError)


class _TargetDB:
    """One merged config DB: its connection, its write lock and a cache of its columns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.conn = sqlite3.connect(path, timeout=30.0, isolation_level=None,
                                    check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: still atomic, fsync at checkpoints; much faster merges.
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA busy_timeout=30000")
        self._columns: dict[str, set[str]] = {}

    def merge(self, batch: GameBatch) -> MergeResult:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for table in batch.tables:
                self._ensure_table(table)
            new = self._new_ids(batch.game_ids)
            if new:
                everything = len(new) == len(batch.game_ids)
                for table in batch.tables:
                    self._insert(table, None if everything else new)
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:  # some errors (e.g. disk full) already rolled back
                conn.execute("ROLLBACK")
            self._columns.clear()  # DDL of this batch was rolled back too
            if isinstance(exc, _REJECTED):
                raise BadInputError(
                    f"batch {batch.config_key} from {batch.source_node} rejected, nothing merged: "
                    f"{type(exc).__name__}: {exc}") from exc
            raise
        return MergeResult(len(new), len(batch.game_ids) - len(new))

    def _existing(self, table: str) -> set[str]:
        if table not in self._columns:
            cols = _table_columns(self.conn, table)
            self._columns[table] = {c.name.lower() for c in cols}
        return self._columns[table]

    def _ensure_table(self, table: TableRows) -> None:
        existing = self._existing(table.name)
        if not existing:
            self._create(table)
            return
        for col in table.columns:
            if col.name.lower() not in existing:
                # ADD COLUMN cannot carry NOT NULL without a default; older rows are NULL.
                self.conn.execute(f"ALTER TABLE {_q(table.name)} ADD COLUMN "
                                  f"{_q(col.name)} {col.decl_type}")
                existing.add(col.name.lower())

    def _create(self, table: TableRows) -> None:
        is_games = table.name.lower() == GAMES
        pk = [GAME_ID] if is_games else [c.name for c in sorted(table.columns, key=lambda c: c.pk)
                                         if c.pk]
        alias = _rowid_alias(table)
        defs = [f"{_q(c.name)} {c.decl_type}"
                + (" PRIMARY KEY" if alias is c else "")
                + (" NOT NULL" if c.notnull and alias is not c else "")
                for c in table.columns]
        if pk and alias is None:
            defs.append(f"PRIMARY KEY ({', '.join(_q(n) for n in pk)})")
        self.conn.execute(f"CREATE TABLE {_q(table.name)} ({', '.join(defs)})")
        if not is_games and (not pk or pk[0] != GAME_ID):
            # A PK that starts with game_id already serves lookups by game.
            self.conn.execute(f"CREATE INDEX {_q('idx_' + table.name + '_game_id')} "
                              f"ON {_q(table.name)} ({_q(GAME_ID)})")
        self._columns[table.name] = {c.name.lower() for c in table.columns}

    def _new_ids(self, ids: Sequence[str]) -> set[str]:
        present: set[str] = set()
        sql = f"SELECT {_q(GAME_ID)} FROM {_q(GAMES)} WHERE {_q(GAME_ID)} IN "
        for chunk in _chunks(ids):
            present.update(r[0] for r in self.conn.execute(sql + f"({_marks(len(chunk))})",
                                                           chunk))
        return set(ids) - present

    def _insert(self, table: TableRows, only: set[str] | None) -> None:
        rows: Iterable[tuple[Any, ...]] = table.rows
        if only is not None:
            gid = next(i for i, c in enumerate(table.columns) if c.name == GAME_ID)
            rows = [r for r in rows if r[gid] in only]
        alias = _rowid_alias(table)
        keep = [i for i, c in enumerate(table.columns) if c is not alias]
        if len(keep) < len(table.columns):
            # The source's own ids would collide with other sources': let SQLite assign ours.
            pick = itemgetter(*keep)
            rows = (pick(r) for r in rows) if len(keep) > 1 else ((r[keep[0]],) for r in rows)
        names = ", ".join(_q(table.columns[i].name) for i in keep)
        self.conn.executemany(f"INSERT INTO {_q(table.name)} ({names}) VALUES "
                              f"({_marks(len(keep))})", rows)

    def close(self) -> None:
        self.conn.close()


def _rowid_alias(table: TableRows) -> Column | None:
    """The child table's own single INTEGER primary key (not game_id), if it has one."""
    if table.name.lower() == GAMES:
        return None
    pk = [c for c in table.columns if c.pk]
    if len(pk) == 1 and pk[0].name != GAME_ID and pk[0].decl_type.upper() == "INTEGER":
        return pk[0]
    return None


class GameMerger:
    """Merges batches into ``synced_dir/<config_key>.db``, one transaction per batch.

    Thread-safe; merges into the same DB are serialised, different DBs run in parallel.
    """

    def __init__(self, synced_dir: Path) -> None:
        self.synced_dir = Path(synced_dir)
        self._lock = threading.Lock()
        self._dbs: dict[str, _TargetDB] = {}

    def merge(self, batch: GameBatch) -> MergeResult:
        """Insert the games of ``batch`` not already present, with their child rows."""
        key = validate_config_key(batch.config_key)
        path = self._safe_path(key)
        with _sqlite_errors(path):
            target = self._target(key, path)
            with target.lock:
                return target.merge(batch)

    def _target(self, key: str, path: Path) -> _TargetDB:
        with self._lock:
            if key not in self._dbs:
                self._dbs[key] = _TargetDB(path)
            return self._dbs[key]

    def _safe_path(self, key: str) -> Path:
        root = self.synced_dir.resolve()
        path = (root / f"{key}.db").resolve()
        if path.parent != root:
            raise UnsafePathError(f"config_key {key!r} resolves outside {root}")
        root.mkdir(parents=True, exist_ok=True)
        return path

    def close(self) -> None:
        """Close every cached connection."""
        with self._lock:
            dbs, self._dbs = list(self._dbs.values()), {}
        for db in dbs:
            with db.lock:
                db.close()


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
