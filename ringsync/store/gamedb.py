"""Game DBs: extract completed games from a live selfplay DB, merge batches at the receiver."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ringsync.errors import BadInputError, CorruptDataError, UnsafePathError
from ringsync.protocol.batch import (
    Column,
    GameBatch,
    TableSchema,
    config_key_for,
    image_table_sql,
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


@contextmanager
def _attached_memory(conn: sqlite3.Connection, name: str) -> Iterator[None]:
    """An empty in-memory DB attached as ``name`` (outside any transaction) for the block."""
    conn.execute(f"ATTACH ':memory:' AS {_q(name)}")
    try:
        yield
    finally:
        conn.execute(f"DETACH {_q(name)}")


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


# -- receiver side -------------------------------------------------------------------------

# Rows the target refuses (NOT NULL, duplicate keys, too big): the batch is bad input.
_REJECTED = (sqlite3.IntegrityError, sqlite3.DataError)


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
        # Defence in depth: images are verified before they are attached here.
        self.conn.execute("PRAGMA trusted_schema=OFF")
        self.conn.execute("PRAGMA cell_size_check=ON")
        self.conn.execute("PRAGMA temp_store=MEMORY")
        self._columns: dict[str, set[str]] = {}

    def merge(self, batch: GameBatch) -> MergeResult:
        """Insert the new games of a batch whose image passed _verify_image."""
        with _attached_memory(self.conn, "incoming"):
            self.conn.deserialize(batch.image, name="incoming")
            _load_ids(self.conn, batch.game_ids)
            return self._insert_new(batch)

    def _insert_new(self, batch: GameBatch) -> MergeResult:
        try:
            with _transaction(self.conn, "BEGIN IMMEDIATE"):
                for table in batch.tables:
                    self._ensure_table(table)
                new = self._keep_new_ids(len(batch.game_ids))
                for table in batch.tables if new else ():
                    self._insert(table, everything=new == len(batch.game_ids))
        except BaseException as exc:
            self._columns.clear()  # DDL of this batch was rolled back too
            if isinstance(exc, _REJECTED):
                raise BadInputError(
                    f"batch {batch.config_key} from {batch.source_node} rejected, nothing merged: "
                    f"{type(exc).__name__}: {exc}") from exc
            raise
        return MergeResult(new, len(batch.game_ids) - new)

    def _existing(self, table: str) -> set[str]:
        if table not in self._columns:
            cols = _table_columns(self.conn, table)
            self._columns[table] = {c.name.lower() for c in cols}
        return self._columns[table]

    def _ensure_table(self, table: TableSchema) -> None:
        existing = self._existing(table.name)
        if not existing:
            self._create(table)
            return
        for col in table.columns:
            if col.name.lower() not in existing:
                # ADD COLUMN cannot carry NOT NULL without a default; older rows are NULL.
                self.conn.execute(f"ALTER TABLE main.{_q(table.name)} ADD COLUMN "
                                  f"{_q(col.name)} {col.decl_type}")
                existing.add(col.name.lower())

    def _create(self, table: TableSchema) -> None:
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
        self.conn.execute(f"CREATE TABLE main.{_q(table.name)} ({', '.join(defs)})")
        if not is_games and (not pk or pk[0] != GAME_ID):
            # A PK that starts with game_id already serves lookups by game.
            self.conn.execute(f"CREATE INDEX main.{_q('idx_' + table.name + '_game_id')} "
                              f"ON {_q(table.name)} ({_q(GAME_ID)})")
        self._columns[table.name] = {c.name.lower() for c in table.columns}

    def _keep_new_ids(self, total: int) -> int:
        """Drop the games this DB already holds from temp.batch_ids; return how many are left."""
        cur = self.conn.execute(f"DELETE FROM temp.batch_ids WHERE game_id IN "
                                f"(SELECT {_q(GAME_ID)} FROM main.{_q(GAMES)})")
        return total - cur.rowcount

    def _insert(self, table: TableSchema, *, everything: bool) -> None:
        # The source's own rowid-alias ids would collide with other sources': SQLite assigns ours.
        alias = _rowid_alias(table)
        names = ", ".join(_q(c.name) for c in table.columns if c is not alias)
        where = "" if everything else f" WHERE {_IN_IDS}"
        self.conn.execute(f"INSERT INTO main.{_q(table.name)} ({names}) "
                          f"SELECT {names} FROM incoming.{_q(table.name)}{where}")

    def close(self) -> None:
        self.conn.close()


def _verify_image(batch: GameBatch) -> None:
    """Raise BadInputError unless the image holds exactly the header's tables and games.

    Runs on a throwaway connection, before any target DB is opened or created: an
    untrusted image never reaches a target's connection unverified.
    """
    def reject(why: str) -> BadInputError:
        return BadInputError(f"batch {batch.config_key} from {batch.source_node} rejected, "
                             f"nothing merged: {why}")

    try:
        with closing(sqlite3.connect(":memory:", isolation_level=None)) as conn:
            # No functions or virtual tables run from the image's schema; every b-tree
            # cell is bounds-checked as it is read.
            conn.execute("PRAGMA trusted_schema=OFF")
            conn.execute("PRAGMA cell_size_check=ON")
            conn.deserialize(batch.image)
            problem = _image_problem(conn, batch)
    except (sqlite3.Error, OverflowError) as exc:
        raise reject(f"unreadable image: {exc}") from exc
    if problem:
        raise reject(problem)


def _image_problem(conn: sqlite3.Connection, batch: GameBatch) -> str | None:
    check = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
    if check != ["ok"]:
        return f"unreadable image: quick_check says {'; '.join(map(str, check[:3]))}"
    # Equal CREATE TABLE text means equal columns, and no constraints, defaults or
    # generated columns; any other object (index, view, trigger) is an extra row.
    found = set(conn.execute("SELECT type, name, sql FROM main.sqlite_master").fetchall())
    wanted = {("table", t.name, image_table_sql(t)) for t in batch.tables}
    if found != wanted:
        extra = sorted(f"{kind} {name}" for kind, name, _ in found - wanted)
        missing = sorted(name for _, name, _ in wanted - found)
        return (f"image schema does not match the header (unexpected or different: "
                f"{extra[:5]}, expected: {missing[:5]})")
    _load_ids(conn, batch.game_ids)
    for table in batch.tables:
        stray = conn.execute(f"SELECT count(*) FROM main.{_q(table.name)} WHERE "
                             f"{_q(GAME_ID)} IS NULL OR NOT {_IN_IDS}").fetchall()[0][0]
        if stray:
            return f"table {table.name}: {stray} rows belong to games not in the header"
    rows, distinct = conn.execute(f"SELECT count(*), count(DISTINCT {_q(GAME_ID)}) "
                                  f"FROM main.{_q(GAMES)}").fetchall()[0]
    if rows != distinct or rows != len(batch.game_ids):
        return (f"games table has {rows} rows for {distinct} of the header's "
                f"{len(batch.game_ids)} game ids")
    return None


def _rowid_alias(table: TableSchema) -> Column | None:
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
        _verify_image(batch)  # first: a bad batch creates nothing, not even the target DB
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
