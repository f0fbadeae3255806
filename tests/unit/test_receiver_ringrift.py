"""Received DBs that RingRift accepts, and a receiver that accepts DBs RingRift made (real SQLite).

Targets here are created, read and migrated the way RingRift's GameReplayDB does it
(the shared RingRift facts, §2): connection per operation, WAL, foreign keys on,
wal_checkpoint(TRUNCATE) on close, v18 schema with its two triggers.
"""

from __future__ import annotations

import logging
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from ringsync.ops.metrics import Metrics
from ringsync.protocol.batch import Column, GameBatch, TableSchema, build_batch, content_digest, encode_batch
from ringsync.store import ringrift_schema
from ringsync.store.gamedb import GameMerger, GameSource, game_ids
from ringsync.store.manifest import DataManifest
from ringsync.store.receiver import GameReceiver

CONFIG = "hex8_2p"
V18_TABLES = {
    "schema_metadata", "games", "game_players", "game_initial_state", "game_moves",
    "game_state_snapshots", "game_choices", "game_history_entries", "game_nnue_features",
    "orphaned_games",
}


class RingRiftSource:
    """A selfplay DB written the way RingRift's bulk store_game writes a game."""

    def __init__(self, path: Path, *, triggers: bool = True) -> None:
        self.path = path
        with closing(sqlite3.connect(path)) as conn:
            ringrift_schema.create_schema(conn, triggers=triggers)
            conn.execute("CREATE TABLE game_notes (id INTEGER PRIMARY KEY, game_id TEXT, note TEXT)")
            conn.commit()
        self.source = GameSource(path)
        self._n = 0

    def write_game(self, moves: int = 8, status: str = "completed") -> str:
        self._n += 1
        gid = f"g{self._n:04d}-{self.path.stem}"
        with closing(sqlite3.connect(self.path)) as conn:
            conn.execute("INSERT INTO games (game_id, board_type, num_players, created_at, game_status,"
                         " total_moves, total_turns, schema_version) VALUES (?, 'hex8', 2,"
                         " '2026-01-01T00:00:00', 'in_progress', 0, 0, 18)", (gid,))
            conn.executemany(
                "INSERT INTO game_moves (game_id, move_number, turn_number, player, phase, move_type,"
                " move_json) VALUES (?, ?, ?, ?, 'movement', 'move', '{}')",
                [(gid, m, m, m % 2 + 1) for m in range(moves)])
            conn.executemany("INSERT INTO game_players (game_id, player_number, player_type) "
                             "VALUES (?, ?, 'ai')", [(gid, 1), (gid, 2)])
            conn.execute("INSERT INTO game_notes (game_id, note) VALUES (?, 'written')", (gid,))
            conn.execute("UPDATE games SET game_status = ?, total_moves = ?, winner = 1 "
                         "WHERE game_id = ?", (status, moves, gid))
            conn.commit()
        return gid

    def add_features(self, gid: str, moves: range) -> None:
        """What a feature-cache tool does to a finished game later."""
        with closing(sqlite3.connect(self.path)) as conn:
            conn.executemany(
                "INSERT INTO game_nnue_features VALUES (?, ?, 1, x'00ff', 0.5, 'hex8', 2)",
                [(gid, m) for m in moves])
            conn.execute("INSERT INTO game_notes (game_id, note) VALUES (?, 'later')", (gid,))
            conn.commit()

    def batch(self, ids: list[str]) -> GameBatch:
        self.source.scan()
        (batch,) = self.source.extract(ids, source_node="node-a")
        return batch

    def close(self) -> None:
        self.source.close()


@pytest.fixture
def src(tmp_path: Path) -> Iterator[RingRiftSource]:
    s = RingRiftSource(tmp_path / "selfplay.db", triggers=False)  # lets it hold short games too
    yield s
    s.close()


@pytest.fixture
def synced(tmp_path: Path) -> Path:
    d = tmp_path / "games" / "synced"
    d.mkdir(parents=True)
    return d


@pytest.fixture
def merger(synced: Path) -> Iterator[GameMerger]:
    m = GameMerger(synced)
    yield m
    m.close()


@contextmanager
def ringrift_connection(db: Path) -> Iterator[sqlite3.Connection]:
    """One operation of GameReplayDB: its own connection, WAL, FKs on, TRUNCATE on close."""
    conn = sqlite3.connect(db, timeout=30.0)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA foreign_keys=ON")
        yield conn
        conn.commit()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def ringrift_schema_version(db: Path) -> int:
    """What GameReplayDB concludes: no schema_metadata means v1 (and it migrates)."""
    with ringrift_connection(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "schema_metadata" not in tables:
            return 1
        row = conn.execute("SELECT value FROM schema_metadata WHERE key='schema_version'").fetchone()
        return int(row[0]) if row else 1


def make_ringrift_target(db: Path, *, migrated: bool) -> None:
    """games/synced/<config>.db as RingRift leaves it: fresh v18, or migrated from v1."""
    with ringrift_connection(db) as conn:
        if not migrated:
            ringrift_schema.create_schema(conn)
            return
        # A v1 games table migrated in place: other column order, ADDed columns at the end,
        # only the BEFORE UPDATE trigger, no insert trigger.
        conn.execute("CREATE TABLE games (winner INTEGER, game_id TEXT PRIMARY KEY, "
                     "num_players INTEGER NOT NULL, board_type TEXT NOT NULL, "
                     "game_status TEXT NOT NULL, total_moves INTEGER NOT NULL, "
                     "created_at TEXT NOT NULL)")
        conn.execute("CREATE TABLE game_moves (move_json TEXT NOT NULL, game_id TEXT NOT NULL "
                     "REFERENCES games(game_id) ON DELETE CASCADE, move_number INTEGER NOT NULL, "
                     "PRIMARY KEY (game_id, move_number))")
        conn.execute("ALTER TABLE games ADD COLUMN quality_score REAL")
        conn.execute(ringrift_schema.TRIGGER_ON_COMPLETE)


def counts(db: Path, gid: str) -> dict[str, int]:
    with closing(sqlite3.connect(db)) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' "
                                            "AND name <> 'schema_metadata'")]
        return {n: conn.execute(f'SELECT count(*) FROM "{n}" WHERE game_id = ?', (gid,)).fetchone()[0]
                for n in names}


# -- item 4: merged DBs RingRift accepts, and DBs RingRift made that the receiver accepts ---


def test_new_target_is_a_db_ringrift_opens_as_v18(
        src: RingRiftSource, merger: GameMerger, synced: Path) -> None:
    gid = src.write_game()
    merger.merge(src.batch([gid]))
    db = synced / f"{CONFIG}.db"
    assert ringrift_schema_version(db) == ringrift_schema.SCHEMA_VERSION  # no migration
    with closing(sqlite3.connect(db)) as conn:
        objects = {(r[0], r[1]) for r in conn.execute("SELECT type, name FROM sqlite_master")}
        assert conn.execute("PRAGMA page_size").fetchone()[0] == 16384
    assert {("trigger", "enforce_moves_on_insert"), ("trigger", "enforce_moves_on_complete")} <= objects
    assert {("table", t) for t in V18_TABLES} <= objects
    assert counts(db, gid)["game_moves"] == 8


@pytest.mark.parametrize("migrated", [False, True], ids=["fresh-v18", "migrated-v1"])
def test_target_created_by_ringrift_with_its_triggers_merges_every_batch(
        src: RingRiftSource, merger: GameMerger, synced: Path, migrated: bool) -> None:
    db = synced / f"{CONFIG}.db"
    make_ringrift_target(db, migrated=migrated)
    ids = [src.write_game(moves=5 + i) for i in range(6)]
    results = [merger.merge(src.batch(ids[i:i + 2])) for i in range(0, 6, 2)]
    assert [r.inserted for r in results] == [2, 2, 2]
    assert game_ids(db) == set(ids)
    assert [counts(db, gid)["game_moves"] for gid in ids] == [5, 6, 7, 8, 9, 10]
    with ringrift_connection(db) as conn:  # RingRift, foreign keys on, finds nothing dangling
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        rows = conn.execute("SELECT game_id, game_status, winner FROM games ORDER BY game_id")
        assert [r[1:] for r in rows] == [("completed", 1)] * 6
    assert ringrift_schema_version(db) == (1 if migrated else 18)  # we never relabel its DB


def test_short_completed_game_is_refused_alone_and_logged_once(
        src: RingRiftSource, synced: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = synced / f"{CONFIG}.db"
    make_ringrift_target(db, migrated=False)
    good, short = src.write_game(moves=6), src.write_game(moves=3)
    late_short = src.write_game(moves=2)
    manifest = DataManifest(tmp_path / "state" / "manifest.db")
    metrics = Metrics()
    receiver = GameReceiver(synced, manifest=manifest, metrics=metrics)
    try:
        with caplog.at_level(logging.WARNING, logger="ringsync.store.gamemerge"):
            for ids in ([good, short], [good, short, late_short]):
                payload = encode_batch(src.batch(ids))
                receiver.receive(payload, content_digest(payload))
        assert game_ids(db) == {good}
        assert [r.message.count("fewer than 5 moves") for r in caplog.records] == [1]
        assert metrics.games_refused_received._value.get() == 3
        assert manifest.received_filter([good, short, late_short]) == {good}
    finally:
        receiver.close()
        manifest.close()


def test_batch_from_an_older_schema_fills_not_null_columns(merger: GameMerger, synced: Path) -> None:
    """A v9-style source lacks columns v18 declares NOT NULL: never refused for that."""
    games = TableSchema("games", (
        Column("game_id", "TEXT", 1, False), Column("board_type", "TEXT", 0, True),
        Column("num_players", "INTEGER", 0, True), Column("game_status", "TEXT", 0, True),
        Column("winner", "INTEGER", 0, False)))
    moves = TableSchema("game_moves", (
        Column("game_id", "TEXT", 1, True), Column("move_number", "INTEGER", 2, True),
        Column("player", "INTEGER", 0, True), Column("move_json", "TEXT", 0, False)))
    batch = build_batch("old-node", CONFIG, ("v9",), [
        (games, [("v9", "hex8", 2, "completed", 2)]),
        (moves, [("v9", m, 1, None if m == 0 else "{}") for m in range(5)]),
    ])
    assert merger.merge(batch).inserted == 1
    with closing(sqlite3.connect(synced / f"{CONFIG}.db")) as conn:
        row = conn.execute("SELECT created_at, total_moves, total_turns, schema_version "
                           "FROM games").fetchone()
        assert row[0].startswith("20")  # a timestamp, not ''
        assert row[1:] == (0, 0, 0)
        assert conn.execute("SELECT count(*) FROM game_moves WHERE phase = '' AND "
                            "move_json IS NOT NULL").fetchone()[0] == 5


def test_merging_goes_on_after_a_ringrift_reader_migrated_and_checkpointed(
        tmp_path: Path, merger: GameMerger, synced: Path) -> None:
    first = RingRiftSource(tmp_path / "first.db")
    later = RingRiftSource(tmp_path / "later.db")
    try:
        a = first.write_game()
        merger.merge(first.batch([a]))
        db = synced / f"{CONFIG}.db"
        # RingRift opens it (a newer release adds a column and a table), then closes.
        for sql in ("ALTER TABLE games ADD COLUMN elo_delta REAL",
                    "CREATE TABLE IF NOT EXISTS game_tags (game_id TEXT, tag TEXT)"):
            with ringrift_connection(db) as conn:
                conn.execute(sql)
        with closing(sqlite3.connect(later.path)) as conn:  # the source got that release too
            conn.execute("ALTER TABLE games ADD COLUMN elo_delta REAL")
            conn.commit()
        b = later.write_game()
        with closing(sqlite3.connect(later.path)) as conn:
            conn.execute("UPDATE games SET elo_delta = 1.5 WHERE game_id = ?", (b,))
            conn.commit()
        assert merger.merge(later.batch([b])).inserted == 1
        assert game_ids(db) == {a, b}
        with ringrift_connection(db) as conn:
            assert conn.execute("SELECT game_id, elo_delta FROM games ORDER BY game_id").fetchall() \
                == sorted([(a, None), (b, 1.5)])
    finally:
        first.close()
        later.close()


# -- item 5: rows added to a finished game reach the receiver, exactly once ------------------


def test_late_rows_of_a_held_game_merge_exactly_once(
        src: RingRiftSource, merger: GameMerger, synced: Path) -> None:
    gid = src.write_game(moves=6)
    assert merger.merge(src.batch([gid])).inserted == 1
    db = synced / f"{CONFIG}.db"
    before = counts(db, gid)
    src.add_features(gid, range(6))
    late = src.batch([gid])
    first = merger.merge(late)
    again = merger.merge(late)
    assert (first.inserted, first.duplicates, first.rows_updated) == (0, 1, 6)
    assert (again.duplicates, again.rows_updated) == (1, 0)
    after = counts(db, gid)
    assert after["game_nnue_features"] == 6
    # Keyed by rowid only: no key to merge by, so not re-merged for a held game.
    assert {k: v for k, v in after.items() if k != "game_nnue_features"} == \
        {k: v for k, v in before.items() if k != "game_nnue_features"}


# -- lock safety ------------------------------------------------------------------------------


class _OpenWatch:
    """Python-level opens (builtins.open, os.open) seen by an audit hook while active."""

    installed = False
    opened: list[str] | None = None

    @classmethod
    def hook(cls, event: str, args: tuple[object, ...]) -> None:
        if event == "open" and cls.opened is not None:
            path = args[0]
            cls.opened.append(path.decode() if isinstance(path, bytes) else str(path))


@contextmanager
def python_opens() -> Iterator[list[str]]:
    if not _OpenWatch.installed:  # audit hooks cannot be removed: one per process
        sys.addaudithook(_OpenWatch.hook)
        _OpenWatch.installed = True
    _OpenWatch.opened = seen = []
    try:
        yield seen
    finally:
        _OpenWatch.opened = None


def test_merges_never_open_the_target_files_outside_sqlite(
        src: RingRiftSource, merger: GameMerger, synced: Path) -> None:
    """Closing any fd of a file drops every POSIX lock this process holds on it."""
    ids = [src.write_game() for _ in range(4)]
    batches = [src.batch(ids[:2]), src.batch(ids[1:])]
    with python_opens() as seen:
        for batch in batches:
            merger.merge(batch)
    assert game_ids(synced / f"{CONFIG}.db") == set(ids)
    assert [p for p in seen if Path(p).name.startswith(CONFIG)] == []
    probe = synced / f"{CONFIG}.probe"  # the watch itself works (not on a live DB file!)
    with python_opens() as seen, open(probe, "wb"):
        pass
    assert [Path(p).name for p in seen] == [probe.name]


# -- the received-game registry ------------------------------------------------------------


def test_received_games_are_recorded_before_the_ack(
        src: RingRiftSource, synced: Path, tmp_path: Path) -> None:
    manifest = DataManifest(tmp_path / "state" / "manifest.db")
    receiver = GameReceiver(synced, manifest=manifest)
    try:
        ids = [src.write_game() for _ in range(3)]
        for part in (ids[:2], ids[1:]):  # a duplicate is recorded too (it is held here)
            payload = encode_batch(src.batch(part))
            receiver.receive(payload, content_digest(payload))
        assert manifest.received_filter([*ids, "local-game"]) == set(ids)
    finally:
        receiver.close()
        manifest.close()
    reopened = DataManifest(tmp_path / "state" / "manifest.db")
    try:
        assert reopened.received_filter(ids) == set(ids)  # durable
        assert reopened.received_filter([]) == set()
    finally:
        reopened.close()
