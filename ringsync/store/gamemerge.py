"""GameMerger: merge a peer's batch into the per-config DBs in one transaction."""

from __future__ import annotations

import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ringsync.errors import BadInputError, UnsafePathError
from ringsync.ops.logsafe import quoted
from ringsync.ops.metrics import Metrics
from ringsync.protocol.batch import (
    Column,
    GameBatch,
    TableSchema,
    image_table_sql,
    validate_config_key,
)
from ringsync.protocol.results import MergeResult
from ringsync.store import ringrift_schema
from ringsync.store._sqlite import (
    _IN_IDS,
    GAME_ID,
    GAMES,
    _attached_memory,
    _load_ids,
    _q,
    _sqlite_errors,
    _transaction,
)
from ringsync.store.shards import (
    HeldFilter,
    held_filter_path,
    parse_shard,
    shard_path,
    shard_paths,
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")


# -- receiver side -------------------------------------------------------------------------

MAX_OPEN_TARGETS = 256  # full shards are looked up in on every merge: kept open
# A config's merged DB takes new games until it holds this much (RINGRIFT_MERGED_SHARD_MB).
DEFAULT_SHARD_BYTES = 512 * 1024 * 1024
# Full shards a saved filter may miss and still be completed on a merge's path (~50 ms each).
_COVER_HERE = 4
TARGET_PAGE_SIZE = 16384
# A checkpoint runs once the WAL holds this much, not after every merge: a page that many
# merges dirty (an index leaf, the tail of a table) is copied into the DB once per
# checkpoint instead of once per merge. Merges stay durable without it (synchronous=FULL).
CHECKPOINT_WAL_BYTES = 32 * 1024 * 1024
# The next checkpoint of a DB starts this long after the last one at the earliest (or once
# the WAL file has grown by another CHECKPOINT_WAL_BYTES): not on every merge, whether the
# last one finished or a reader's snapshot stopped it.
CHECKPOINT_RETRY_S = 1.0
# A merged DB's WAL above this is logged once (and once when it is back under it).
WAL_ALARM_BYTES = 1024 ** 3
# Rows the target refuses (duplicate keys, too big, a trigger's RAISE): the batch is bad input.
_REJECTED = (sqlite3.IntegrityError, sqlite3.DataError)
# The trigger of a fresh RingRift DB that refuses short completed games (the RingRift facts, §2).
_INSERT_TRIGGER = "enforce_moves_on_insert"
_COMPLETED_STATUSES = "('completed', 'finished')"  # exactly the trigger's test
_MOVES = "game_moves"
# The batch's ids drive the loop; each is looked up in the games primary key (an EXISTS,
# not "IN (SELECT game_id FROM main.games)", which SQLite runs by walking the whole games
# index as the IN list). A test checks the plan: SEARCH main.games, never SCAN.
_PRESENT = (f"SELECT b.game_id FROM temp.batch_ids AS b WHERE EXISTS "
            f"(SELECT 1 FROM main.{_q(GAMES)} AS g WHERE g.{_q(GAME_ID)} = b.game_id)")
_SPLIT_PRESENT = f"INSERT INTO temp.present_ids {_PRESENT}"
_PRESENT_OF = (f"SELECT b.value FROM json_each(?) AS b WHERE EXISTS "
               f"(SELECT 1 FROM main.{_q(GAMES)} AS g WHERE g.{_q(GAME_ID)} = b.value)")


def wal_size_limit() -> int:
    """Bytes a merged DB's WAL file keeps after a checkpoint restarted it (journal_size_limit)."""
    return 2 * CHECKPOINT_WAL_BYTES


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


@dataclass(frozen=True, slots=True)
class CheckpointResult:
    """One checkpoint of a merged DB: ``done`` unless a reader's snapshot stopped it."""

    done: bool
    frames: int  # WAL frames when it ran
    copied: int  # of those, now in the DB file
    wal_bytes: int  # the WAL file's size after it


@dataclass(frozen=True, slots=True)
class _TargetColumn:
    name: str
    decl_type: str
    required: bool  # NOT NULL: a NULL or missing value gets a neutral one


@dataclass(slots=True)
class _TargetTable:
    columns: dict[str, _TargetColumn]  # by lower-case name, in the target's order
    keyed: bool  # has a primary key or unique index besides the rowid


class _TargetDB:
    """One merged config DB: its write connection and lock, and a cache of its tables.

    A new DB is created the way RingRift creates one (v18 tables, indexes, both triggers,
    ``schema_metadata``), so RingRift's readers open it unchanged. An existing one, made by
    RingRift or migrated by it while we were away, is written by column name whatever
    its column order; the cache is dropped whenever SQLite's schema cookie moves.

    Durability: every commit fsyncs the WAL (synchronous=FULL), so a merge that returned
    survives a power cut. Checkpoints are decoupled from acks: once the WAL holds
    CHECKPOINT_WAL_BYTES (``checkpoint_due``), ``checkpoint()`` copies it into the DB on a
    connection of its own, in the merger's checkpoint thread, while merges go on: a
    RESTART checkpoint that never waits (busy timeout 0). With no reader in the WAL it
    copies every frame, and the WAL starts again from its beginning (at once, or with the
    next commit when a merge was running), its file cut back to wal_size_limit(); a reader's
    open snapshot stops it part-way (counted), and it is tried again shortly, so the WAL
    grows only while a reader pins it and shrinks as soon as readers allow.
    Nothing here opens the DB's files outside SQLite (the WAL's size comes from stat):
    closing any descriptor of a file drops every POSIX lock this process holds on it,
    its SQLite connections' included.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.conn = _connect(path)
        # Only takes effect before the first table exists. With rows of a few hundred
        # bytes, 16 KiB pages cut merge CPU by about a fifth (docs/benchmarks.md).
        self.conn.execute(f"PRAGMA page_size={TARGET_PAGE_SIZE}")
        self.conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit fsyncs the WAL, so the ack needs no checkpoint (checkpoint_if_due).
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA wal_autocheckpoint=0")
        # The WAL file is kept (up to twice the checkpoint size) and overwritten from its
        # start after a checkpoint: cutting it to nothing and growing it again made every
        # commit's fsync a file-system journal commit too (1,208 vs 1,448 games/s, same run).
        self.conn.execute(f"PRAGMA journal_size_limit={wal_size_limit()}")
        # cache_size stays SQLite's 2 MiB: at 100k games held, 2/16/64 MiB took 15.2/16.1/16.3
        # CPU-s per 10k games merged but peaked at 159/186/258 MB RSS (docs/benchmarks.md).
        # Off (SQLite's default, said explicitly): child rows go in before their games row,
        # which is what satisfies enforce_moves_on_insert; RingRift's own connections turn
        # foreign keys on, and the games row is in place before this transaction commits.
        self.conn.execute("PRAGMA foreign_keys=OFF")
        # Defence in depth: images are verified before they are attached here.
        self.conn.execute("PRAGMA trusted_schema=OFF")
        self.conn.execute("PRAGMA cell_size_check=ON")
        self.conn.execute("PRAGMA temp_store=MEMORY")
        self.conn.execute("CREATE TEMP TABLE present_ids (game_id TEXT PRIMARY KEY)")
        self._tables: dict[str, _TargetTable] = {}
        self._cookie = -1  # PRAGMA schema_version the cache was read at
        self._refuses_short = False
        self._warned_refused = False
        self.wal_path = Path(f"{path}-wal")
        self._retry_at = 0.0  # monotonic time before which a stopped checkpoint is not retried
        self._retry_bytes = CHECKPOINT_WAL_BYTES  # ... unless the WAL has grown past this
        self._checkpointer: sqlite3.Connection | None = None  # the checkpoint thread's
        self._checkpoint_lock = threading.Lock()  # held by a checkpoint, and by close()
        self.closed = False

    def merge(self, batch: GameBatch, ids: Sequence[str] | None = None) -> MergeResult:
        """Merge a batch whose image passed _verify_image, or only its games ``ids``;
        the caller holds ``lock``."""
        with _attached_memory(self.conn, "incoming"):
            self.conn.deserialize(batch.image, name="incoming")
            _load_ids(self.conn, batch.game_ids if ids is None else ids)
            return self._merge_attached(batch, len(batch.game_ids) if ids is None else len(ids),
                                        whole=ids is None)

    def present(self, ids: Sequence[str]) -> list[str]:
        """Which of ``ids`` this DB holds: one keyed lookup each, no write lock taken
        (about 0.5 ms for 500 ids in a 30k-game DB)."""
        try:
            return [str(r[0]) for r in self.conn.execute(_PRESENT_OF, (json.dumps(list(ids)),))]
        except sqlite3.OperationalError:
            if self._has_games():
                raise
            return []  # no games table: it holds none of them

    def game_ids(self) -> Iterator[str]:
        """Every game id this DB holds, row by row (none without a games table): a million
        ids never sit in memory at once. Consume it under ``lock``."""
        if self._has_games():
            yield from (str(r[0]) for r in self.conn.execute(
                f"SELECT {_q(GAME_ID)} FROM main.{_q(GAMES)}"))

    def game_count(self) -> int:
        """Rows in games (by its primary key's index): sizes a filter before it is filled."""
        if not self._has_games():
            return 0
        return int(self.conn.execute(f"SELECT count(*) FROM main.{_q(GAMES)}").fetchone()[0])

    def _has_games(self) -> bool:
        return self.conn.execute(f"SELECT 1 FROM main.sqlite_master WHERE type = 'table' AND "
                                 f"lower(name) = '{GAMES}'").fetchone() is not None

    def _merge_attached(self, batch: GameBatch, games: int, *, whole: bool) -> MergeResult:
        try:
            with _transaction(self.conn, "BEGIN IMMEDIATE"):
                self._refresh_cache()
                if GAMES not in self._tables:
                    self._create_ringrift_schema()
                for table in batch.tables:
                    self._ensure_table(table)
                result = self._insert(batch, games, whole=whole)
                self._cookie = self._schema_cookie()
        except BaseException as exc:
            self._cookie = -1  # DDL of this batch was rolled back too
            if isinstance(exc, _REJECTED):
                raise BadInputError(
                    f"batch {batch.config_key} from {batch.source_node} rejected, nothing merged: "
                    f"{type(exc).__name__}: {exc}") from exc
            raise
        if result.refused:
            self._report_refused(batch, result.refused)
        return result

    # -- the target's schema

    def _schema_cookie(self) -> int:
        return int(self.conn.execute("PRAGMA main.schema_version").fetchone()[0])

    def _refresh_cache(self) -> None:
        """Re-read the target's tables if anyone (RingRift migrating it, say) changed them."""
        cookie = self._schema_cookie()
        if cookie == self._cookie:
            return
        self._tables.clear()
        names = self.conn.execute(
            "SELECT type, name FROM main.sqlite_master WHERE type IN ('table', 'trigger')").fetchall()
        for kind, name in names:
            if kind == "table" and not name.lower().startswith("sqlite_"):
                self._tables[name.lower()] = self._read_table(name)
        self._refuses_short = any(kind == "trigger" and name.lower() == _INSERT_TRIGGER
                                  for kind, name in names)
        self._cookie = cookie

    def _read_table(self, name: str) -> _TargetTable:
        info = self.conn.execute(f"PRAGMA main.table_info({_q(name)})").fetchall()
        # cid, name, type, notnull, dflt_value, pk. A default fills a missing column
        # already, and SQLite numbers an INTEGER PRIMARY KEY (a rowid alias) itself.
        pks = [r for r in info if r[5]]
        alias = pks[0][1] if len(pks) == 1 and str(pks[0][2]).upper() == "INTEGER" else None
        columns = {str(r[1]).lower(): _TargetColumn(
            str(r[1]), str(r[2] or ""), bool(r[3]) and r[4] is None and r[1] != alias)
            for r in info}
        indexes = self.conn.execute(f"PRAGMA main.index_list({_q(name)})").fetchall()
        return _TargetTable(columns, keyed=any(r[2] for r in indexes))

    def _create_ringrift_schema(self) -> None:
        """A DB RingRift would accept as its own: v18 and schema_metadata, triggers included."""
        ringrift_schema.create_schema(self.conn)
        self._cookie = -1
        self._refresh_cache()

    def _ensure_table(self, table: TableSchema) -> None:
        """Create the batch's table if the target lacks it, and add the columns it lacks.

        The target's keys never come from a peer (see _create), so no batch can make a
        later one conflict; columns beyond MAX_TARGET_COLUMNS are not added (not merged).
        """
        if table.name.lower() not in self._tables:
            self._create(table)
        existing = self._tables[table.name.lower()]
        new = [c for c in table.columns if c.name.lower() not in existing.columns]
        room = MAX_TARGET_COLUMNS - len(existing.columns)
        for col in new[:max(room, 0)]:
            # ADD COLUMN cannot carry NOT NULL without a default; older rows are NULL.
            self._ddl(table.name, f"ALTER TABLE main.{_q(table.name)} ADD COLUMN "
                                  f"{_q(col.name)} {col.decl_type}")
            existing.columns[col.name.lower()] = _TargetColumn(col.name, col.decl_type, False)
        if len(new) > room:  # warned when the bound is reached, then at debug
            log.log(logging.WARNING if room > 0 else logging.DEBUG,
                    "%s: table %s has %d columns, the most batches may create; not merging "
                    "its columns %s", self.path, table.name, MAX_TARGET_COLUMNS,
                    quoted(", ".join(c.name for c in new[max(room, 0):])))

    def _create(self, table: TableSchema) -> None:
        """A table the target lacks, in a shape no peer chooses.

        One of RingRift's v18 tables (missing from a DB made before, or by RingRift) gets
        RingRift's own DDL and indexes. Any other table gets the batch's columns without
        NOT NULLs and without keys: a key a first batch declared would refuse the rows of
        every later batch that declares another one, forever. Its game_id index is named
        outside the names a peer table can take (they are plain identifiers).
        """
        if table.name.lower() in ringrift_schema.TABLES:
            for statement in ringrift_schema.table_statements(table.name):
                self._ddl(table.name, statement)
            self._tables[table.name.lower()] = self._read_table(table.name)
            return
        self._refuse_taken_name(table.name)
        # No NOT NULL from a peer: sources with older or newer schemas feed the same
        # DB, and a constraint one of them declares must not reject the others' games
        # forever. game_id never gets INTEGER affinity.
        defs = [f"{_q(c.name)} {_receiver_type(c)}".rstrip() for c in table.columns]
        self._ddl(table.name, f"CREATE TABLE main.{_q(table.name)} ({', '.join(defs)})")
        self._ddl(table.name, f"CREATE INDEX main.{_q(_game_id_index(table.name))} "
                              f"ON {_q(table.name)} ({_q(GAME_ID)})")
        self._tables[table.name.lower()] = self._read_table(table.name)

    def _refuse_taken_name(self, name: str) -> None:
        """A peer table may not take the name of an index, trigger or view of the target."""
        taken = self.conn.execute("SELECT type, name FROM main.sqlite_master WHERE lower(name) = ?",
                                  (name.lower(),)).fetchone()
        if taken is not None:
            raise BadInputError(f"table {name!r} cannot be created here: the receiver has a "
                                f"{taken[0]} of that name; rename the table at the source")

    def _ddl(self, table: str, statement: str) -> None:
        """Run DDL for a batch's table; a statement SQLite refuses is the batch's fault."""
        try:
            self.conn.execute(statement)
        except sqlite3.OperationalError as exc:
            code = getattr(exc, "sqlite_errorcode", -1) & 0xFF
            if code != sqlite3.SQLITE_ERROR:  # full disk, I/O, busy: not the batch's fault
                raise
            raise BadInputError(f"table {table!r} cannot be merged here: {exc}") from exc

    # -- the rows

    def _insert(self, batch: GameBatch, wanted: int, *, whole: bool) -> MergeResult:
        """Child rows first, games rows last: the insert trigger counts the moves already in.

        ``wanted`` games are in temp.batch_ids: the whole batch's (``whole``) or some of them.
        """
        present = self._split_present()
        children = [t for t in batch.tables if t.name.lower() != GAMES]
        games = [t for t in batch.tables if t.name.lower() == GAMES]
        every = present == 0 and whole
        for table in children if present < wanted else ():
            self._copy(table, "" if every else f" WHERE {_IN_IDS}")
        refused = self._refuse_short(batch, children)
        for table in games if present + len(refused) < wanted else ():
            self._copy(table, "" if every and not refused else f" WHERE {_IN_IDS}")
        updated = 0
        for table in children if present else ():
            if self._tables[table.name.lower()].keyed:  # a rowid-only table would get copies
                updated += self._copy(table, " WHERE game_id IN (SELECT game_id FROM temp.present_ids)",
                                      verb="INSERT OR IGNORE")
        new = wanted - present - len(refused)
        return MergeResult(new, present, refused, updated)

    def _split_present(self) -> int:
        """Move the games this DB already holds from temp.batch_ids to temp.present_ids.

        One keyed lookup per batch id in the games primary key (_SPLIT_PRESENT): the cost
        follows the batch, not the DB (``IN (SELECT game_id FROM main.games)`` walked the
        whole index, 135 ms per batch at 1M games held).
        """
        self.conn.execute("DELETE FROM temp.present_ids")
        cur = self.conn.execute(_SPLIT_PRESENT)
        if cur.rowcount:
            self.conn.execute("DELETE FROM temp.batch_ids WHERE game_id IN "
                              "(SELECT game_id FROM temp.present_ids)")
        return cur.rowcount

    def _refuse_short(self, batch: GameBatch, children: list[TableSchema]) -> tuple[str, ...]:
        """Drop the new games the insert trigger would refuse, child rows included.

        Runs after the child rows are in: the moves are counted on the target's index,
        exactly as the trigger counts them. Such a game is rare, so undoing its rows is.
        """
        if not self._refuses_short or _MOVES not in self._tables:
            return ()
        status = self._value(self._tables[GAMES].columns.get("game_status"),
                             _batch_columns(batch, GAMES))
        if status is None:
            return ()
        refused = tuple(str(r[0]) for r in self.conn.execute(
            f"SELECT game_id FROM incoming.{_q(GAMES)} WHERE {_IN_IDS} AND "
            f"{status} IN {_COMPLETED_STATUSES} AND (SELECT count(*) FROM main.{_q(_MOVES)} m "
            f"WHERE m.game_id = incoming.{_q(GAMES)}.game_id) < {ringrift_schema.MIN_MOVES_REQUIRED}"))
        if refused:
            ids = [(gid,) for gid in refused]
            self.conn.executemany("DELETE FROM temp.batch_ids WHERE game_id = ?", ids)
            for table in children:
                self.conn.executemany(f"DELETE FROM main.{_q(table.name)} WHERE game_id = ?", ids)
        return refused

    def _copy(self, table: TableSchema, where: str, *, verb: str = "INSERT") -> int:
        """Copy the batch's rows of ``table`` by column name, NOT NULL gaps filled."""
        target = self._tables[table.name.lower()]
        batch_cols = _batch_columns_of(table)
        names, values = [], []
        for col in target.columns.values():
            value = self._value(col, batch_cols)
            if value is not None:
                names.append(_q(col.name))
                values.append(value)
        cur = self.conn.execute(f"{verb} INTO main.{_q(table.name)} ({', '.join(names)}) "
                                f"SELECT {', '.join(values)} FROM incoming.{_q(table.name)}{where}")
        return cur.rowcount

    @staticmethod
    def _value(col: _TargetColumn | None, batch_cols: dict[str, Column]) -> str | None:
        """The SELECT expression for a target column, or None to leave it to its default."""
        if col is None:
            return None
        source = batch_cols.get(col.name.lower())
        if source is None:
            return _neutral(col) if col.required else None
        if not col.required or source.notnull:  # a NULL under a source's NOT NULL: bad input
            return _q(source.name)
        # A source with an older (or other) schema must not be refused forever for a
        # constraint it never knew: a neutral value instead of NULL.
        return f"coalesce({_q(source.name)}, {_neutral(col)})"

    def _report_refused(self, batch: GameBatch, refused: tuple[str, ...]) -> None:
        if self._warned_refused:
            log.debug("%s: refused %d short completed games", self.path, len(refused))
            return
        self._warned_refused = True
        log.warning(
            "%s refuses completed games with fewer than %d moves (its %s trigger); dropped %d "
            "from %s, e.g. %s (counted in ringsync_games_refused_total; further ones at debug)",
            self.path, ringrift_schema.MIN_MOVES_REQUIRED, _INSERT_TRIGGER, len(refused),
            quoted(batch.source_node), quoted(refused[0]))

    # -- the WAL

    def wal_bytes(self) -> int:
        """Size of the DB's WAL file (0 if there is none), by stat: no descriptor opened."""
        try:
            return os.stat(self.wal_path).st_size
        except FileNotFoundError:
            return 0

    def checkpoint_due(self, size: int, *, now: float | None = None) -> bool:
        # ``size`` is the WAL file's: what it holds, or up to wal_size_limit() kept from before.
        """True once the WAL holds CHECKPOINT_WAL_BYTES, unless a reader stopped the last
        checkpoint less than CHECKPOINT_RETRY_S ago and the WAL has not grown by as much again."""
        now = time.monotonic() if now is None else now
        return size >= CHECKPOINT_WAL_BYTES and (now >= self._retry_at or size >= self._retry_bytes)

    def checkpoint(self, *, now: float | None = None) -> CheckpointResult | None:
        """Copy the WAL into the DB on a connection of its own, without waiting for anyone.

        RESTART with busy timeout 0: it copies what no reader's snapshot still needs and,
        when it can take the write lock with no reader in the WAL, restarts the WAL;
        while a merge holds the write lock it copies every frame and the merge's commit
        restarts the WAL. ``done`` when every frame was copied; otherwise it is retried after
        CHECKPOINT_RETRY_S or once the WAL has grown by another CHECKPOINT_WAL_BYTES.
        None if the DB was closed meanwhile.
        """
        with self._checkpoint_lock:
            if self.closed:
                return None
            size = self.wal_bytes()
            now = time.monotonic() if now is None else now
            if self._checkpointer is None:
                self._checkpointer = _connect(self.path)
                self._checkpointer.execute("PRAGMA busy_timeout=0")
                self._checkpointer.execute(f"PRAGMA journal_size_limit={wal_size_limit()}")
            _, frames, copied = self._checkpointer.execute(
                "PRAGMA main.wal_checkpoint(RESTART)").fetchone()
        done = copied >= frames  # frames -1: not in WAL mode, nothing to copy
        # The next one waits CHECKPOINT_RETRY_S, or for the file to grow by as much again: a
        # restarted WAL keeps its file (wal_size_limit), so the file's size alone would make
        # every merge's commit look due.
        self._retry_at = now + CHECKPOINT_RETRY_S
        self._retry_bytes = size + CHECKPOINT_WAL_BYTES
        return CheckpointResult(done=done, frames=max(frames, 0), copied=max(copied, 0),
                                wal_bytes=self.wal_bytes())

    def close(self) -> None:
        """Close the connections once no checkpoint runs (the caller holds ``lock``)."""
        self.closed = True
        with self._checkpoint_lock:
            if self._checkpointer is not None:
                self._checkpointer.close()
        self.conn.close()  # the last connection to a DB checkpoints it and removes the WAL


def _batch_columns_of(table: TableSchema) -> dict[str, Column]:
    """The batch's columns of ``table`` by lower-case name, its own rowid alias left out.

    The source's rowid-alias ids would collide with other sources': SQLite assigns ours.
    """
    alias = _rowid_alias(table)
    return {c.name.lower(): c for c in table.columns if c is not alias}


def _batch_columns(batch: GameBatch, name: str) -> dict[str, Column]:
    for table in batch.tables:
        if table.name.lower() == name:
            return _batch_columns_of(table)
    return {}


def _neutral(col: _TargetColumn) -> str:
    """A value of the column's type affinity for a NOT NULL column the batch leaves empty."""
    decl = col.decl_type.upper()
    if "INT" in decl:
        return "0"
    if any(word in decl for word in ("CHAR", "CLOB", "TEXT")):
        # RingRift's timestamps are ISO-8601 text (created_at, completed_at, ...).
        return "strftime('%Y-%m-%dT%H:%M:%f', 'now')" if col.name.lower().endswith("_at") else "''"
    if "BLOB" in decl or not decl:
        return "x''"
    return "0"


# Columns batches may give one target table (RingRift's widest, games, has 26).
MAX_TARGET_COLUMNS = 256
# Tables of RingRift's schema a batch may not write: not per-game data.
_NOT_PER_GAME = frozenset({"schema_metadata"})


def _game_id_index(table: str) -> str:
    """The name of our game_id index on a table made from a batch: ':' is never in a
    peer's table name, so no peer table can take it."""
    return f"ringsync:{table}:game_id"


def _verify_image(batch: GameBatch) -> None:
    """Raise BadInputError unless the image holds exactly the header's tables and games.

    Runs on a throwaway connection, before any target DB is opened or created: an
    untrusted image never reaches a target's connection unverified.
    """
    def reject(why: str) -> BadInputError:
        return BadInputError(f"batch {batch.config_key} from {quoted(batch.source_node)} rejected, "
                             f"nothing merged: {why}")

    problem = _name_problem(batch) or _encoding_problem(batch.image)
    if problem:
        raise reject(problem)
    try:
        with closing(sqlite3.connect(":memory:", isolation_level=None)) as conn:
            # No functions or virtual tables run from the image's schema; every b-tree
            # cell is bounds-checked as it is read.
            conn.execute("PRAGMA trusted_schema=OFF")
            conn.execute("PRAGMA cell_size_check=ON")
            conn.deserialize(batch.image)
            problem = _image_problem(conn, batch)
    except (sqlite3.Error, OverflowError, ValueError) as exc:  # ValueError: undecodable text
        raise reject(f"unreadable image: {type(exc).__name__}: {exc}") from exc
    if problem:
        raise reject(problem)


def _name_problem(batch: GameBatch) -> str | None:
    """A table name the receiver keeps for itself (checked before any file is touched)."""
    for table in batch.tables:
        name = table.name.lower()
        if name in _NOT_PER_GAME:
            return f"table {table.name}: RingRift's {name} is not per-game data; batches may not write it"
        if name in ringrift_schema.OBJECT_NAMES and name not in ringrift_schema.TABLES:
            return (f"table {table.name}: the name of an index or trigger of RingRift's schema "
                    "in the receiver's DB; rename the table at the source")
    return None


def _encoding_problem(image: bytes) -> str | None:
    """Attached to a target of another text encoding, an image cannot be read at all.

    Read from the header (offset 56: 1 UTF-8, 2 UTF-16le, 3 UTF-16be), not with PRAGMA
    encoding, which reports whatever a corrupt header byte points at.
    """
    code = int.from_bytes(image[56:60], "big")
    if code == 1:
        return None
    if code in (2, 3):
        return f"image text encoding is UTF-16{'le' if code == 2 else 'be'}; batch images must be UTF-8"
    return f"unreadable image: its header's text encoding field is {code}"


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


def _remove_db_files(db: Path) -> None:
    """Unlink a DB no connection has open, with its sidecars (unlinking opens nothing)."""
    for name in (db, *(Path(f"{db}{suffix}") for suffix in ("-wal", "-shm", "-journal"))):
        name.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (the directory is opened, never a DB file)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(slots=True)
class _Shards:
    """A config's merged DBs, oldest first; the newest takes new games until it is full.

    ``lock`` serialises the config's merges: a game is looked up in the full shards and
    merged into the newest one as one step, so two pushes of it cannot both miss it.
    """

    key: str
    lock: threading.Lock
    paths: list[Path]
    sealed: Path | None = None  # the newest, once found full: it stays full in this process
    held: HeldFilter | None = None  # the ids of the full ones, once loaded or built
    loaded: bool = False  # the saved filter was tried
    building: threading.Thread | None = None  # building ``held`` in the background


class GameMerger:
    """Merges batches into ``synced_dir/<config_key>.db``, one transaction per batch.

    A config's DB takes new games until it holds ``shard_bytes``
    (RINGRIFT_MERGED_SHARD_MB; 0: no bound); then ``<config_key>+2.db`` does, and so on
    (ringsync/store/shards.py says why). A game already in any of them is a duplicate.
    Thread-safe; merges into the same config are serialised, different configs run in
    parallel. Checkpoints run in a thread of their own (started with the first one due),
    never on a merge's path to its ack: at a million games held, one copies ~100 MB of
    random pages. With ``metrics``, the largest WAL among the open DBs is a gauge and
    checkpoints a reader stopped are counted; a WAL above WAL_ALARM_BYTES is logged once,
    and once more when it is back under.
    """

    def __init__(self, synced_dir: Path, *, max_open: int = MAX_OPEN_TARGETS,
                 metrics: Metrics | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.synced_dir = Path(synced_dir)
        self._lock = threading.Lock()
        self._dbs: OrderedDict[str, _TargetDB] = OrderedDict()  # by file name
        self._max_open = max_open
        self._metrics = metrics
        self._shard_bytes = shard_bytes
        self._shards: dict[str, _Shards] = {}  # by config key (under _lock)
        self._wal_sizes: dict[str, int] = {}  # by file name, open DBs only (under _lock)
        self._alarmed: set[str] = set()  # file names whose WAL is above WAL_ALARM_BYTES
        self._due: queue.SimpleQueue[tuple[str, _TargetDB] | None] = queue.SimpleQueue()
        self._queued: set[str] = set()  # file names waiting for the checkpoint thread
        self._checkpointing = threading.Condition()  # guards _queued, _running, _thread
        self._running = False
        self._thread: threading.Thread | None = None
        self._closed = False

    def merge(self, batch: GameBatch) -> MergeResult:
        """Insert the games of ``batch`` not already present, with their child rows.

        For games already present, child rows the DB lacks are added by key (rows a
        source adds to a finished game later), in whichever shard holds the game; the
        games row itself is left alone. Returns once the merge is durable (its commit
        fsynced the WAL).
        """
        key = validate_config_key(batch.config_key)
        _verify_image(batch)  # first: a bad batch creates nothing, not even the target DB
        base = self._safe_path(key)
        shards = self._shards_of(key)
        with _sqlite_errors(base), shards.lock:
            if not all(path.exists() for path in shards.paths):  # an operator removed one
                shards.paths = shard_paths(self.synced_dir, key)
            full = bool(shards.paths) and (shards.sealed == shards.paths[-1]
                                           or self._is_full(shards.paths[-1]))
            if full:  # sticky: its WAL file going away on close must not reopen it to new games
                shards.sealed = shards.paths[-1]
            elif shards.paths:
                self._taking_games(shards, shards.paths[-1])
            older = shards.paths if full else shards.paths[:-1]
            ids, held, updated = list(batch.game_ids), 0, 0
            if older:
                maybe = self._held_filter(shards, older)
                candidates = ids if maybe is None else [i for i in ids if maybe.may_hold(i)]
                for path in older if candidates else ():
                    found, rows = self._merge_held(path, batch, candidates)
                    if found:
                        held, updated = held + len(found), updated + rows
                        candidates = [i for i in candidates if i not in found]
                        ids = [i for i in ids if i not in found]
            if not ids:
                return MergeResult(0, held, (), updated)
            subset = None if held == 0 else ids
            if full or not shards.paths:
                path = shard_path(self.synced_dir, key, _next_number(shards.paths))
                result = self._merge_creating(path, batch, subset)
                shards.paths.append(path)
            else:
                result = self._merge_into(shards.paths[-1], batch, subset)
        return MergeResult(result.inserted, result.duplicates + held, result.refused,
                           result.rows_updated + updated)

    def _shards_of(self, key: str) -> _Shards:
        with self._lock:
            if key not in self._shards:
                self._shards[key] = _Shards(key, threading.Lock(), shard_paths(self.synced_dir, key))
            return self._shards[key]

    def prepare_filter(self, key: str) -> bool:
        """Load, or build now and save, the filter of ``key``'s full shards, as a node that
        ran before has it (the benchmarks start from that state); True if one is ready."""
        shards = self._shards_of(validate_config_key(key))
        with shards.lock:
            full = shards.paths if shards.paths and self._is_full(shards.paths[-1]) else shards.paths[:-1]
            if not full:
                return False
            self._held_filter(shards, full)
            builder = shards.building
        if builder is not None:
            builder.join()
        return shards.held is not None

    def _saved_filter(self, shards: _Shards) -> HeldFilter | None:
        """The filter, loaded from beside the shards the first time (the caller holds
        ``shards.lock``)."""
        if not shards.loaded:
            shards.loaded = True
            shards.held = HeldFilter.load(held_filter_path(self.synced_dir, shards.key))
        return shards.held

    def _taking_games(self, shards: _Shards, path: Path) -> None:
        """``path`` takes new games: a filter must not say it covers them (a shard found
        full by an earlier process, under a smaller RINGRIFT_MERGED_SHARD_MB, may take
        games again). Saved at once, so a restart does not believe it either."""
        held = self._saved_filter(shards)
        if held is not None and held.covered.pop(path, None) is not None:
            self._save_filter(shards.key, held)

    def _held_filter(self, shards: _Shards, older: list[Path]) -> HeldFilter | None:
        """The filter of the ids in ``older`` (the full shards; the caller holds
        ``shards.lock``), or None while it is being built: then every id is looked up.

        Loaded from beside the shards (a restart reads ~4 MB at a million ids); a shard
        found full later is added here (~50 ms for 15k ids) and the filter saved again.
        Built from scratch, in a thread of its own, when there is none, when it misses
        more than a few shards (reading a million ids takes ~2 s, which would hold up the
        merges), or when it is full: then twice as big.
        """
        held = self._saved_filter(shards)
        new = [] if held is None else [path for path in older if path not in held.covered]
        if held is not None and new:
            fits = len(new) <= _COVER_HERE and held.count + sum(
                self._shard(path, _TargetDB.game_count) for path in new) <= held.capacity
            if fits:
                self._cover(held, new)
                self._save_filter(shards.key, held)
            else:
                shards.held = held = None
        if held is None and shards.building is None and not self._closed:
            shards.building = threading.Thread(target=self._build_filter, args=(shards, list(older)),
                                               name="ringsync-held-filter", daemon=True)
            shards.building.start()
        return held

    def _build_filter(self, shards: _Shards, older: list[Path]) -> None:
        try:
            present = [path for path in older if path.exists()]  # one removed meanwhile: none
            held = HeldFilter(2 * sum(self._shard(path, _TargetDB.game_count) for path in present))
            self._cover(held, present)
            if not self._closed:
                with shards.lock:
                    shards.held = held
                    self._save_filter(shards.key, held)
        except sqlite3.Error as exc:  # merges go on looking every id up; tried again later
            log.warning("could not read the game ids of the full merged DBs (%s: %s); each "
                        "merge looks its games up in all of them", type(exc).__name__, exc)
        finally:
            with shards.lock:
                shards.building = None

    def _cover(self, held: HeldFilter, paths: list[Path]) -> None:
        for path in paths:
            if self._closed:
                return
            with self._locked(path) as target:
                held.cover(path, target.game_ids())

    def _save_filter(self, key: str, held: HeldFilter) -> None:
        """Keep the filter for the next start; failing to changes nothing else (logged)."""
        try:
            held.save(held_filter_path(self.synced_dir, key))
        except OSError as exc:
            log.warning("could not save the filter of %s's full merged DBs (%s); the next "
                        "start reads their game ids again", key, exc)

    def _shard(self, path: Path, read: Callable[[_TargetDB], _T]) -> _T:
        """``read`` the open DB at ``path`` under its lock."""
        with self._locked(path) as target:
            return read(target)

    @contextmanager
    def _locked(self, path: Path) -> Iterator[_TargetDB]:
        """The open target DB at ``path``, its lock held."""
        while True:
            target = self._target(path)
            with target.lock:
                if target.closed:  # evicted between lookup and lock: reopen
                    continue
                yield target
                return

    def _is_full(self, path: Path) -> bool:
        """The DB and its WAL hold ``shard_bytes`` (by stat: no descriptor opened)."""
        if not self._shard_bytes:
            return False
        size = 0
        for name in (path, Path(f"{path}-wal")):
            with suppress(FileNotFoundError):
                size += name.stat().st_size
        return size >= self._shard_bytes

    def _merge_held(self, path: Path, batch: GameBatch, ids: list[str]) -> tuple[set[str], int]:
        """The games of ``ids`` a full shard holds, and the late child rows merged into it."""
        with self._locked(path) as target:
            found = target.present(ids)
            if not found or len(batch.tables) == 1:  # games rows only: nothing to add
                return set(found), 0
            result = target.merge(batch, found)
        self._after_merge(path, target)
        return set(found), result.rows_updated

    def _merge_into(self, path: Path, batch: GameBatch, ids: Sequence[str] | None) -> MergeResult:
        with self._locked(path) as target:
            result = target.merge(batch, ids)
        self._after_merge(path, target)
        return result

    def _after_merge(self, path: Path, target: _TargetDB) -> None:
        size = target.wal_bytes()
        if target.checkpoint_due(size):
            self._schedule(path.name, target)
        self._watch_wal(path.name, target, size)

    def _merge_creating(self, path: Path, batch: GameBatch,
                        ids: Sequence[str] | None) -> MergeResult:
        """Create ``path`` by merging its first games under a hidden name, then renaming it.

        Nobody ever sees the DB without its tables (a trainer would read "no such table",
        a RingRift reader would take a DB without schema_metadata for v1 and migrate it),
        and a first batch that fails leaves no file behind. Durable before it returns:
        checkpointed into the file (fsynced), the rename fsynced in the directory.
        """
        tmp = path.with_name(f".{path.name}.creating")  # not *.db: no scan or status sees it
        _remove_db_files(tmp)  # a leftover of a crash mid-creation; never renamed, never read
        target = _TargetDB(tmp)
        try:
            with target.lock:
                result = target.merge(batch, ids)
                target.conn.execute("PRAGMA main.wal_checkpoint(TRUNCATE)")
                target.close()  # the last connection: the WAL and -shm go away
            os.rename(tmp, path)
        except BaseException:
            if not target.closed:
                target.close()
            _remove_db_files(tmp)
            raise
        _fsync_dir(path.parent)
        return result

    # -- checkpoints, in a thread of their own

    def _schedule(self, key: str, target: _TargetDB) -> None:
        with self._checkpointing:
            if key in self._queued:
                return
            self._queued.add(key)
            if self._thread is None:
                self._thread = threading.Thread(target=self._checkpoint_loop,
                                                name="ringsync-checkpoint", daemon=True)
                self._thread.start()
        self._due.put((key, target))

    def _checkpoint_loop(self) -> None:
        while (item := self._due.get()) is not None:
            key, target = item
            with self._checkpointing:
                self._queued.discard(key)
                self._running = True
            try:
                checkpoint = self._checkpoint(target)
                if checkpoint is not None:
                    if not checkpoint.done and self._metrics is not None:
                        self._metrics.checkpoints_blocked.inc()
                    self._watch_wal(key, target, checkpoint.wal_bytes)
            finally:
                with self._checkpointing:
                    self._running = False
                    self._checkpointing.notify_all()

    def _checkpoint(self, target: _TargetDB) -> CheckpointResult | None:
        """A due checkpoint; its failure fails nothing (the merges are durable already)."""
        try:
            return target.checkpoint()
        except sqlite3.Error as exc:
            log.warning("%s: checkpoint failed (%s: %s); the WAL keeps growing until one succeeds",
                        target.path, type(exc).__name__, exc)
            return None

    def wait_checkpoints(self, timeout: float | None = None) -> bool:
        """Wait until no checkpoint is queued or running; False on timeout."""
        with self._checkpointing:
            return self._checkpointing.wait_for(
                lambda: not self._queued and not self._running, timeout)

    def _watch_wal(self, key: str, target: _TargetDB, size: int) -> None:
        with self._lock:
            if key in self._dbs:
                self._wal_sizes[key] = size
            self._report_wal(key, target.path, size)

    def _report_wal(self, key: str, path: Path, size: int) -> None:
        """Gauge the largest WAL; log a crossing of WAL_ALARM_BYTES (caller holds _lock)."""
        if size >= WAL_ALARM_BYTES and key not in self._alarmed:
            self._alarmed.add(key)
            log.warning("%s: WAL is %d MiB (alarm at %d MiB): a reader's open transaction keeps "
                        "checkpoints from finishing; it shrinks once readers allow",
                        path, size >> 20, WAL_ALARM_BYTES >> 20)
        elif size < WAL_ALARM_BYTES and key in self._alarmed:
            self._alarmed.discard(key)
            log.warning("%s: WAL back to %d MiB (under the %d MiB alarm)",
                        path, size >> 20, WAL_ALARM_BYTES >> 20)
        if self._metrics is not None:
            self._metrics.merged_wal_bytes.set(max(self._wal_sizes.values(), default=0))

    def _target(self, path: Path) -> _TargetDB:
        with self._lock:
            name = path.name
            if name not in self._dbs:
                self._dbs[name] = _TargetDB(path)
            self._dbs.move_to_end(name)
            self._evict_idle()
            return self._dbs[name]

    def _evict_idle(self) -> None:
        """Keep at most ``max_open`` target DBs open (4 fds each), closing idle ones first.

        Config keys come from peers; without a bound, many distinct keys would
        exhaust file descriptors and stop every merge.
        """
        for name in list(self._dbs)[:-1]:
            if len(self._dbs) <= self._max_open:
                return
            db = self._dbs[name]
            if db.lock.acquire(blocking=False):  # never close one mid-merge
                try:
                    db.close()
                finally:
                    db.lock.release()
                del self._dbs[name]
                self._wal_sizes.pop(name, None)

    def _safe_path(self, key: str) -> Path:
        root = self.synced_dir.resolve()
        path = (root / f"{key}.db").resolve()
        if path.parent != root:
            raise UnsafePathError(f"config_key {key!r} resolves outside {root}")
        root.mkdir(parents=True, exist_ok=True)
        return path

    def close(self) -> None:
        """Stop the checkpoint thread (a running checkpoint ends first) and any filter
        being built; close every connection."""
        self._closed = True
        with self._lock:
            builders = [s.building for s in self._shards.values() if s.building is not None]
        for builder in builders:
            builder.join()
        with self._checkpointing:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._due.put(None)
            thread.join()
        with self._lock:
            dbs, self._dbs = list(self._dbs.values()), OrderedDict()
        for db in dbs:
            with db.lock:
                db.close()


def _next_number(paths: list[Path]) -> int:
    """The number of the shard after ``paths`` (1 for a config's first DB)."""
    numbers = [parsed[1] for p in paths if (parsed := parse_shard(p.name)) is not None]
    return max(numbers, default=0) + 1
