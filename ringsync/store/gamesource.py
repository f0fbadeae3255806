"""GameSource: completed games from a live selfplay DB, read without copying the file."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
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
    stat_key,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SourceGame:
    """A game that became completed in a source DB."""

    game_id: str
    config_key: str



# -- source side ---------------------------------------------------------------------------


# A game still 'active' this long after it was first seen is a killed writer's placeholder.
ACTIVE_GAME_TIMEOUT = 6 * 3600.0


@dataclass(slots=True)
class _Pending:
    """A games row not finished yet, and when this source first saw it (monotonic seconds)."""

    game_id: str
    since: float
    wall: float = 0.0  # the same moment on the wall clock (saved across restarts)


# Rows remembered at the top of the scanned range, to find rowids SQLite handed out again.
TAIL_ROWS = 16


@dataclass(slots=True)
class _Cursor:
    """Where the last scan stopped: highest rowid seen per table, and the games in progress.

    ``tail``: (rowid, game_id) of the last rows read, highest last. Without AUTOINCREMENT,
    SQLite gives a new row max(rowid) + 1, so a new row can only take a rowid at or below
    the cursor once every row from there up was deleted (aborted games at the top). While
    the row at the cursor is still the game we read there, nothing new is below it; when it
    is not, the scan goes back to the highest tail row still in place (to the start when
    none is: one full rescan, which the manifest de-duplicates). Rows deleted in the middle
    never give their rowids again (AUTOINCREMENT tables never reuse any).
    """

    max_rowid: int = 0
    pending: dict[int, _Pending] = field(default_factory=dict)
    children: dict[str, int] | None = None  # per child table; None until the first scan
    tail: list[tuple[int, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ScanState:
    """A GameSource's cursor as plain data, to save (JSON) and resume from after a restart.

    Save it only after the games its scans found are durably queued: a crash in between
    then re-finds them (the manifest ignores known games) instead of losing them.
    """

    max_rowid: int
    pending: tuple[tuple[int, str, float], ...]  # (rowid, game_id, wall-clock first seen)
    children: dict[str, int] | None
    tail: tuple[tuple[int, str], ...]

    def to_json(self) -> dict[str, object]:
        return {"rowid": self.max_rowid, "pending": [list(p) for p in self.pending],
                "children": self.children, "tail": [list(t) for t in self.tail]}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> ScanState | None:
        """The state saved by ``to_json``, or None when it is not one (scan from the start)."""
        try:
            rowid, children = data["rowid"], data.get("children")
            pending = tuple((int(r), str(g), float(t)) for r, g, t in data["pending"])  # type: ignore[attr-defined]
            tail = tuple((int(r), str(g)) for r, g in data["tail"])  # type: ignore[attr-defined]
            if not isinstance(rowid, int) or not (children is None or isinstance(children, dict)):
                return None
            kids = None if children is None else {str(k): int(v) for k, v in children.items()}
        except (KeyError, TypeError, ValueError):
            return None
        return cls(rowid, pending, kids, tail)


@dataclass(frozen=True, slots=True)
class Scan:
    """What one scan found.

    ``completed``: games that became completed. ``changed``: games reported completed by an
    earlier scan that gained rows in a per-game table since (feature caches, backfills).
    ``given_up``: rows no longer watched because they stayed unfinished past the active-game
    timeout (killed writers' placeholders). Truncated games are dropped without counting.
    """

    completed: list[SourceGame]
    changed: list[SourceGame]
    given_up: int = 0
    more: bool = False  # the scan stopped at its row limit: call again for the rest


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
    The file is only ever opened by SQLite: a Python open()/close() of it in this process
    would drop the POSIX locks our connection holds (they belong to the process), and a
    connection-per-operation writer would then checkpoint and delete the WAL under us.
    """

    def __init__(self, path: Path, *, active_timeout: float = ACTIVE_GAME_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic,
                 child_cursors: dict[str, int] | None = None,
                 resume: ScanState | None = None) -> None:
        """``resume``: the state a previous process saved (see ``state``), so a restart
        neither reads the file's history again nor misses rows added while it was down.
        ``child_cursors``: only the per-table cursors of such a state (older manifests)."""
        self.path = Path(path)
        self.last_scan_rows = 0  # rows examined by the last scan (cost accounting)
        self.rows_below_cursor = 0  # rows read again below a cursor (rowids reused; counted)
        self.active_timeout = active_timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        if resume is not None:
            child_cursors = resume.children
        self._cursor = _Cursor(children=dict(child_cursors) if child_cursors is not None else None)
        if resume is not None:
            self._resume(resume)
        # Resumed from child cursors alone, the first scan finds every game again as "new":
        # games among them that gained rows since the save must still be reported as changed.
        self._resumed = child_cursors is not None and resume is None
        self._stamp: tuple[object, ...] | None = None
        self._data_version: int | None = None
        self._layout: tuple[int, _Layout] | None = None
        self._wal_ino: int | None = None
        self.reconnects = 0  # stale views healed by reopening (see _lost_locks)

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
                self._data_version = None  # a version is only comparable on one connection

    def _resume(self, state: ScanState) -> None:
        cur, now, wall = self._cursor, self._clock(), time.time()
        cur.max_rowid = state.max_rowid
        cur.tail = list(state.tail)
        cur.pending = {r: _Pending(g, now - max(0.0, wall - t), t) for r, g, t in state.pending}

    def state(self) -> ScanState:
        """The cursor as plain data (see ScanState); pass it as ``resume`` after a restart."""
        with self._lock:
            cur = self._cursor
            return ScanState(cur.max_rowid,
                             tuple((r, p.game_id, p.wall) for r, p in cur.pending.items()),
                             None if cur.children is None else dict(cur.children), tuple(cur.tail))

    def changed(self) -> bool:
        """True when another connection committed to the DB since the last scan.

        ``PRAGMA data_version`` on our own connection is exact (it changes on every commit
        of any other connection, whatever the files' stat says); the stat of the DB and its
        WAL is checked as well, for a file replaced under the same name. While a scan or an
        extract holds the connection, the answer is "changed" (scan and see).
        """
        if self._stat() != self._stamp:
            return True
        if not self._lock.acquire(blocking=False):
            return True
        try:
            if self._conn is None or self._data_version is None:
                return False  # closed (after a failure): its versions are gone; stat decides
            try:
                return self._read_data_version(self._conn) != self._data_version
            except sqlite3.Error:
                return True
        finally:
            self._lock.release()

    @staticmethod
    def _read_data_version(conn: sqlite3.Connection) -> int:
        return int(conn.execute("PRAGMA src.data_version").fetchone()[0])

    def _stat(self) -> tuple[object, ...]:
        return tuple(stat_key(self.path.with_name(self.path.name + s)) for s in ("", "-wal"))

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """The connection, used by one caller at a time; SQLite errors name the source DB."""
        with self._lock, _sqlite_errors(self.path):
            if self._conn is not None and self._wal_inode() != self._wal_ino:
                self._lost_locks()
            if self._conn is None:
                self._conn = _open_source(self.path)
                # The first read creates -wal/-shm next to a DB whose writer's last close
                # removed them; do it now, so that the scan's stamp does not see our own files.
                self._conn.execute("SELECT count(*) FROM src.sqlite_master").fetchone()
                self._wal_ino = self._wal_inode()
            yield self._conn

    def _wal_inode(self) -> int | None:
        key = stat_key(self.path.with_name(self.path.name + "-wal"))
        return None if key is None else key[2]

    def _lost_locks(self) -> None:
        """The WAL was deleted while we held it open: only possible when our locks were lost.

        Something in this process opened and closed the DB file outside SQLite (POSIX locks
        belong to the process), and a writer's last close then checkpointed and deleted the
        WAL. Our view is stale; a fresh connection reads the file as it is.
        """
        assert self._conn is not None
        self.reconnects += 1
        log.error("%s: its WAL was deleted while ringsync held it open (our SQLite locks were "
                  "dropped by an open()/close() of the file in this process); reopening", self.path)
        self._conn.close()
        self._conn = None
        self._data_version = None

    def _schema(self, conn: sqlite3.Connection) -> _Layout:
        version = int(conn.execute("PRAGMA src.schema_version").fetchone()[0])
        if self._layout is None or self._layout[0] != version:
            self._layout = (version, _read_layout(conn, self.path))
        return self._layout[1]

    def scan(self) -> list[SourceGame]:
        """Games completed since the previous scan, each reported once per GameSource."""
        return self.scan_all().completed

    def scan_all(self, max_rows: int | None = None) -> Scan:
        """Completed games, and finished games that gained rows, since the previous scan.

        ``max_rows`` bounds the new games rows read by this call (a large first scan is
        then shipped chunk by chunk); ``Scan.more`` says rows were left for the next call.
        """
        with self._connection() as conn:
            stamp = self._stat()  # before reading: a commit during the scan triggers another
            version = self._read_data_version(conn)
            with _transaction(conn):
                layout = self._schema(conn)
                self.last_scan_rows = 0
                if not layout.games:
                    self._stamp, self._data_version = stamp, version
                    return Scan([], [])
                select = _scan_select(layout)
                # Re-check first: rows added by this scan need no second look.
                found = self._recheck(conn, select)
                new, more = self._scan_new(conn, select, max_rows)
                found += new
                given_up = self._give_up()
                changed = self._changed_games(conn, layout, select, {g.game_id for g in found})
        self._stamp, self._data_version = stamp, version
        return Scan(found, changed, given_up, more)

    def _scan_new(self, conn: sqlite3.Connection, select: str,
                  max_rows: int | None) -> tuple[list[SourceGame], bool]:
        cur = self._cursor
        self._step_back(conn)
        limit = -1 if max_rows is None else max(1, max_rows)
        rows = conn.execute(f"{select} WHERE rowid > ? ORDER BY rowid LIMIT ?", (cur.max_rowid, limit))
        found, examined = [], 0
        for rowid, gid, status, board, players, moves in rows:
            examined += 1
            cur.max_rowid = rowid
            cur.tail.append((rowid, str(gid)))
            game = self._classify(rowid, gid, status, board, players, moves)
            if game is not None:
                found.append(game)
        del cur.tail[:-TAIL_ROWS]
        self.last_scan_rows += examined
        return found, examined == limit

    def _step_back(self, conn: sqlite3.Connection) -> None:
        """Go back below rowids SQLite may have handed out again (see _Cursor); rows read
        again are reported again, and the manifest ignores games it knows."""
        cur = self._cursor
        if not cur.tail or cur.tail[-1][0] != cur.max_rowid:
            return  # nothing read yet (or an old saved state): nothing to check
        marks = _marks(len(cur.tail))
        now = dict(conn.execute(f"SELECT rowid, {_q(GAME_ID)} FROM src.{_q(GAMES)} "
                                f"WHERE rowid IN ({marks})", [r for r, _ in cur.tail]).fetchall())
        while cur.tail and str(now.get(cur.tail[-1][0])) != cur.tail[-1][1]:
            cur.tail.pop()
        back_to = cur.tail[-1][0] if cur.tail else 0
        if back_to < cur.max_rowid:
            self.rows_below_cursor += int(conn.execute(
                f"SELECT count(*) FROM src.{_q(GAMES)} NOT INDEXED WHERE rowid > ? AND rowid <= ?",
                (back_to, cur.max_rowid)).fetchone()[0])
            cur.max_rowid = back_to
            for rowid in [r for r in cur.pending if r > back_to]:
                del cur.pending[rowid]  # read again below, with the row there now

    def _recheck(self, conn: sqlite3.Connection, select: str) -> list[SourceGame]:
        """Re-read only the rows that were in progress before this scan."""
        cur = self._cursor
        waiting = list(cur.pending)
        found = []
        for chunk in _chunks(waiting):
            seen = set()
            for rowid, gid, status, board, players, moves in conn.execute(
                    f"{select} WHERE rowid IN ({_marks(len(chunk))})", chunk):
                seen.add(rowid)
                game = self._classify(rowid, gid, status, board, players, moves)
                if game is not None:
                    found.append(game)
            for gone in set(chunk) - seen:  # deleted (aborted) games
                cur.pending.pop(gone, None)
            self.last_scan_rows += len(seen)
        return found

    def _classify(self, rowid: int, gid: object, status: object, board: object,
                  players: object, moves: object) -> SourceGame | None:
        state = str(status).lower()
        pending = self._cursor.pending
        if state in _COMPLETED and isinstance(gid, str):
            pending.pop(rowid, None)
            return SourceGame(gid, config_key_for(board, players))
        # RingRift finalises a game cut off at max_moves as 'active' with its moves counted
        # (a placeholder has 0): it never completes, so it is not watched any more.
        truncated = state == "active" and isinstance(moves, int) and moves > 0
        if state in _ABANDONED or truncated or not isinstance(gid, str):
            pending.pop(rowid, None)
        elif rowid not in pending:
            pending[rowid] = _Pending(gid, self._clock(), time.time())
        return None

    def _give_up(self) -> int:
        """Stop watching rows unfinished for longer than the active-game timeout."""
        deadline = self._clock() - self.active_timeout
        stale = [r for r, p in self._cursor.pending.items() if p.since < deadline]
        for rowid in stale:
            del self._cursor.pending[rowid]
        return len(stale)

    def _changed_games(self, conn: sqlite3.Connection, layout: _Layout, select: str,
                       new: set[str]) -> list[SourceGame]:
        """Games completed before this scan that gained child rows since the last one.

        One rowid cursor per child table: the first scan starts at the end (rows present
        then ship with their games), so the cost is proportional to the rows added.
        NOT INDEXED: for DISTINCT, SQLite otherwise walks the whole game_id index (1.4 s at
        5M move rows, on every scan that found a new game) instead of the rowid range.
        """
        cur = self._cursor
        first = cur.children is None
        cursors = cur.children if cur.children is not None else {}
        touched: set[str] = set()
        for name, _ in layout.children:
            top = _max_rowid(conn, name)
            if top is None:
                continue  # WITHOUT ROWID: no cursor possible
            since = cursors.get(name, 0 if not first else top)
            if top > since:
                touched.update(str(r[0]) for r in conn.execute(
                    f"SELECT DISTINCT {_q(GAME_ID)} FROM src.{_q(name)} NOT INDEXED WHERE rowid > ?",
                    (since,))
                    if isinstance(r[0], str))
            cursors[name] = top
        cur.children = cursors
        if not self._resumed:
            touched -= new
        self._resumed = False
        if not touched:
            return []
        _load_ids(conn, touched)
        return [SourceGame(gid, config_key_for(board, players))
                for _, gid, status, board, players, _ in conn.execute(
                    f"{select} WHERE {_IN_IDS} AND rowid <= ?", (cur.max_rowid,))
                if str(status).lower() in _COMPLETED and isinstance(gid, str)]

    @property
    def child_cursors(self) -> dict[str, int] | None:
        """Per child table, the highest rowid the scans have looked at (None before a scan).

        Save it after the changed games are queued again; pass it to the next GameSource of
        this file (e.g. after a restart) so late rows added in between are not missed.
        """
        children = self._cursor.children
        return None if children is None else dict(children)

    def missing(self, game_ids: Sequence[str]) -> list[str]:
        """Those of ``game_ids`` that are no longer in the games table (deleted at the source)."""
        wanted = list(dict.fromkeys(game_ids))
        if not wanted:
            return []
        with self._connection() as conn, _transaction(conn):
            if not self._schema(conn).games:
                return wanted
            _load_ids(conn, wanted)
            present = {str(r[0]) for r in conn.execute(
                f"SELECT {_q(GAME_ID)} FROM src.{_q(GAMES)} WHERE {_IN_IDS}")}
        return [g for g in wanted if g not in present]

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




def _max_rowid(conn: sqlite3.Connection, table: str) -> int | None:
    try:
        row = conn.execute(f"SELECT max(rowid) FROM src.{_q(table)}").fetchone()
    except sqlite3.OperationalError:  # WITHOUT ROWID
        return None
    return int(row[0] or 0)


def _scan_select(layout: _Layout) -> str:
    # Without a game_status column every row is a finished game.
    status = _q("game_status") if layout.has("game_status") else "'completed'"
    cols = [_q(c) if layout.has(c) else "NULL" for c in ("board_type", "num_players", "total_moves")]
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
    for _, gid, status, board, players, _ in conn.execute(f"{_scan_select(layout)} WHERE {_IN_IDS}"):
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


