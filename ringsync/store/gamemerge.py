"""GameMerger: merge a peer's batch into the per-config DBs in one transaction."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections import OrderedDict
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from ringsync.errors import BadInputError, UnsafePathError
from ringsync.protocol.batch import (
    Column,
    GameBatch,
    TableSchema,
    image_table_sql,
    validate_config_key,
)
from ringsync.store._sqlite import (
    _IN_IDS,
    GAME_ID,
    GAMES,
    _attached_memory,
    _load_ids,
    _q,
    _sqlite_errors,
    _table_columns,
    _transaction,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MergeResult:
    """What one merge did: games added and games already present."""

    inserted: int
    duplicates: int



# -- receiver side -------------------------------------------------------------------------

# Rows the target refuses (NOT NULL, duplicate keys, too big): the batch is bad input.
MAX_OPEN_TARGETS = 32
TARGET_PAGE_SIZE = 16384
# A checkpointed WAL is cut back to this size (SQLite otherwise keeps its largest size).
WAL_SIZE_LIMIT = 64 * 1024 * 1024
_REJECTED = (sqlite3.IntegrityError, sqlite3.DataError)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


class _TargetDB:
    """One merged config DB: its write connection and lock, and a cache of its columns.

    Only the row work of a merge holds the write lock. Its two disk waits come after the
    lock is released, while the next batch merges: ``sync_wal()`` makes the commit durable
    (so an acknowledged batch survives a power cut, not only a crash) and ``checkpoint()``
    copies the WAL into the DB file, on a connection of its own.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.conn = _connect(path)
        # Only takes effect before the first table exists. With rows of a few hundred
        # bytes, 16 KiB pages cut merge CPU by about a fifth (docs/benchmarks.md).
        self.conn.execute(f"PRAGMA page_size={TARGET_PAGE_SIZE}")
        self.conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit does not fsync under the lock; sync_wal() does it after.
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA wal_autocheckpoint=0")
        self.conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        # Defence in depth: images are verified before they are attached here.
        self.conn.execute("PRAGMA trusted_schema=OFF")
        self.conn.execute("PRAGMA cell_size_check=ON")
        self.conn.execute("PRAGMA temp_store=MEMORY")
        self._columns: dict[str, set[str]] = {}
        self._checkpoint_lock = threading.Lock()
        self._checkpoint_due = False
        self.closed = False

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
        # No NOT NULL from a peer: sources with older or newer schemas feed the same
        # DB, and a constraint one of them declares must not reject the others' games
        # forever. game_id never gets INTEGER affinity: "INTEGER PRIMARY KEY" would
        # make it a rowid alias that refuses every text id after the first batch.
        defs = [f"{_q(c.name)} {_receiver_type(c)}" + (" PRIMARY KEY" if alias is c else "")
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

    def sync_wal(self) -> None:
        """fsync the WAL: every commit so far is durable (fsync covers the file, whoever wrote it)."""
        try:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        except FileNotFoundError:
            return  # no WAL: the last connection closed, checkpointed and synced the DB file
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def checkpoint(self) -> None:
        """Copy committed WAL frames into the DB file; one checkpoint at a time.

        A caller that finds one running leaves a mark instead of waiting; the running
        one sees it after releasing the lock and goes again, so no commit is left behind.
        """
        self._checkpoint_due = True
        while self._checkpoint_due and self._checkpoint_lock.acquire(blocking=False):
            try:
                self._checkpoint_due = False
                if not self.closed:
                    # PASSIVE: never waits for (or blocks) the writer or a trainer reading.
                    with closing(_connect(self.path)) as conn:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as exc:  # the batch is committed; the WAL just stays longer
                log.warning("checkpoint of %s failed, retried after the next merge: %s",
                            self.path, exc)
            finally:
                self._checkpoint_lock.release()

    def close(self) -> None:
        """Close the connection once no checkpoint runs (the caller holds ``lock``)."""
        self.closed = True
        with self._checkpoint_lock:
            self.conn.close()  # the last connection to a DB checkpoints it and removes the WAL


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


def _receiver_type(column: Column) -> str:
    if column.name.lower() == GAME_ID and column.decl_type.upper().startswith("INT"):
        return ""
    return column.decl_type


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
    The checkpoint after a merge runs outside the DB's write lock, overlapping the next merge.
    """

    def __init__(self, synced_dir: Path, *, max_open: int = MAX_OPEN_TARGETS) -> None:
        self.synced_dir = Path(synced_dir)
        self._lock = threading.Lock()
        self._dbs: OrderedDict[str, _TargetDB] = OrderedDict()
        self._max_open = max_open

    def merge(self, batch: GameBatch) -> MergeResult:
        """Insert the games of ``batch`` not already present, with their child rows."""
        key = validate_config_key(batch.config_key)
        _verify_image(batch)  # first: a bad batch creates nothing, not even the target DB
        path = self._safe_path(key)
        with _sqlite_errors(path):
            while True:
                target = self._target(key, path)
                with target.lock:
                    if target.closed:  # evicted between lookup and lock: reopen
                        continue
                    result = target.merge(batch)
                target.sync_wal()  # before the peer is told: an ack means on disk
                target.checkpoint()
                return result

    def _target(self, key: str, path: Path) -> _TargetDB:
        with self._lock:
            if key not in self._dbs:
                self._dbs[key] = _TargetDB(path)
            self._dbs.move_to_end(key)
            self._evict_idle()
            return self._dbs[key]

    def _evict_idle(self) -> None:
        """Keep at most ``max_open`` target DBs open (4 fds each), closing idle ones first.

        Config keys come from peers; without a bound, many distinct keys would
        exhaust file descriptors and stop every merge.
        """
        for key in list(self._dbs)[:-1]:
            if len(self._dbs) <= self._max_open:
                return
            db = self._dbs[key]
            if db.lock.acquire(blocking=False):  # never close one mid-merge
                try:
                    db.close()
                finally:
                    db.lock.release()
                del self._dbs[key]

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
            dbs, self._dbs = list(self._dbs.values()), OrderedDict()
        for db in dbs:
            with db.lock:
                db.close()


