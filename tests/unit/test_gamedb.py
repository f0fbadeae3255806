"""Tests for game extraction from live selfplay DBs and merging at the receiver (real SQLite)."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

import ringsync.selfplay_sim
from ringsync.errors import BadInputError, CorruptDataError, UnsafePathError
from ringsync.protocol.batch import Column, GameBatch, TableRows, decode_batch, encode_batch
from ringsync.selfplay_sim import SelfplayWriter
from ringsync.store.gamedb import (
    GameMerger,
    GameSource,
    SourceGame,
    count_games,
    discover_sources,
    game_ids,
)

PER_GAME_TABLES = {
    "games", "game_players", "game_initial_state", "game_moves", "game_state_snapshots",
    "game_choices", "game_history_entries", "game_nnue_features", "game_events",
}
REPO = Path(ringsync.selfplay_sim.__file__).resolve().parents[1]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "games" / "selfplay.db"


@pytest.fixture
def writer(db_path: Path) -> Iterator[SelfplayWriter]:
    with SelfplayWriter(db_path, moves_per_game=30, seed=1) as w:
        yield w


@pytest.fixture
def source(db_path: Path, writer: SelfplayWriter) -> Iterator[GameSource]:
    src = GameSource(db_path)
    yield src
    src.close()


@pytest.fixture
def merger(tmp_path: Path) -> Iterator[GameMerger]:
    m = GameMerger(tmp_path / "synced")
    yield m
    m.close()


def ids_of(found: list[SourceGame]) -> list[str]:
    return [g.game_id for g in found]


def table_counts(db: Path) -> dict[str, int]:
    with closing(sqlite3.connect(db)) as conn:
        names = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")]
        return {n: conn.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0] for n in names}


def one_batch(src: GameSource, ids: list[str]) -> GameBatch:
    batches = src.extract(ids, source_node="node-a")
    assert len(batches) == 1
    return batches[0]


# -- source side ---------------------------------------------------------------------------


def test_in_progress_game_is_shipped_exactly_once_after_it_completes(
        writer: SelfplayWriter, source: GameSource) -> None:
    live = writer.start_game()
    writer.add_moves(live, 10)
    done = writer.write_game()
    assert ids_of(source.scan()) == [done]
    assert source.extract([live], source_node="n") == []
    writer.add_moves(live, 10)
    assert source.scan() == []
    writer.complete_game(live)
    found = source.scan()
    assert ids_of(found) == [live]
    assert found[0].config_key == "hex8_2p"
    later = [writer.write_game() for _ in range(3)]
    seen = ids_of(source.scan()) + [g for _ in range(5) for g in ids_of(source.scan())]
    assert seen == later


def test_scan_sees_a_writer_process_that_runs_concurrently(db_path: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ringsync.selfplay_sim", str(db_path), "--games", "120",
         "--in-progress", "3", "--moves", "20", "--seed", "5"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen: list[str] = []
    while not db_path.exists() and proc.poll() is None:
        time.sleep(0.01)
    src = GameSource(db_path)
    try:
        while proc.poll() is None:
            if src.changed():
                seen += ids_of(src.scan())
            time.sleep(0.002)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert b"completed 120" in out
        seen += ids_of(src.scan())
    finally:
        src.close()
    with closing(sqlite3.connect(db_path)) as conn:
        completed = {r[0] for r in conn.execute(
            "SELECT game_id FROM games WHERE game_status='completed'")}
        running = {r[0] for r in conn.execute(
            "SELECT game_id FROM games WHERE game_status='in_progress'")}
    assert len(seen) == len(set(seen)) == 120
    assert set(seen) == completed
    assert len(running) == 3
    assert not running & set(seen)


def test_extract_includes_every_per_game_table(
        writer: SelfplayWriter, source: GameSource, db_path: Path) -> None:
    gid = writer.write_game()
    writer.write_game()  # another game whose rows must not leak in
    source.scan()
    batch = one_batch(source, [gid, "no-such-game"])
    assert batch.game_ids == (gid,)
    assert batch.tables[0].name == "games"
    assert {t.name for t in batch.tables} == PER_GAME_TABLES
    with closing(sqlite3.connect(db_path)) as conn:
        for table in batch.tables:
            expected = conn.execute(
                f'SELECT count(*) FROM "{table.name}" WHERE game_id=?', (gid,)).fetchone()[0]
            assert len(table.rows) == expected > 0, table.name
    nnue = next(t for t in batch.tables if t.name == "game_nnue_features")
    assert all(isinstance(r[3], bytes) for r in nnue.rows)


def test_scan_cost_is_proportional_to_new_and_in_progress_rows(
        writer: SelfplayWriter, source: GameSource) -> None:
    for _ in range(40):
        writer.write_game()
    live = [writer.start_game() for _ in range(2)]
    assert len(source.scan()) == 40
    assert source.last_scan_rows == 42
    assert source.scan() == []
    assert source.last_scan_rows == 2  # idle: only the two games still in progress
    for _ in range(5):
        writer.write_game()
    writer.complete_game(live[0])
    assert len(source.scan()) == 6
    assert source.last_scan_rows == 2 + 5
    assert source.scan() == []
    assert source.last_scan_rows == 1


def test_changed_tracks_commits(writer: SelfplayWriter, source: GameSource) -> None:
    assert source.changed()
    source.scan()
    assert not source.changed()
    writer.write_game()
    assert source.changed()


def test_source_schema_change_is_picked_up(
        writer: SelfplayWriter, source: GameSource, db_path: Path) -> None:
    first = writer.write_game()
    source.scan()
    assert "extra" not in [c.name for c in one_batch(source, [first]).tables[0].columns]
    with closing(sqlite3.connect(db_path)) as conn:
        conn.execute("ALTER TABLE games ADD COLUMN extra TEXT")
        conn.execute("UPDATE games SET extra='x'")
        conn.commit()
    batch = one_batch(source, [first])
    assert batch.tables[0].rows[0][-1] == "x"


def test_minimal_schema_without_status_or_config_columns(tmp_path: Path) -> None:
    db = tmp_path / "tiny.db"
    with closing(sqlite3.connect(db)) as conn:
        conn.executescript("""
            CREATE TABLE games (game_id TEXT PRIMARY KEY, score INTEGER);
            CREATE TABLE moves (game_id TEXT, n INTEGER);
            INSERT INTO games VALUES ('a', 1), ('b', 2);
            INSERT INTO moves VALUES ('a', 1), ('a', 2), ('b', 1);
        """)
    src = GameSource(db)
    try:
        found = src.scan()
        assert {(g.game_id, g.config_key) for g in found} == {("a", "unknown"), ("b", "unknown")}
        batch = one_batch(src, ["a"])
    finally:
        src.close()
    assert batch.config_key == "unknown"
    assert [t.name for t in batch.tables] == ["games", "moves"]
    assert len(batch.tables[1].rows) == 2


def test_finished_status_is_completed_case_insensitively(tmp_path: Path) -> None:
    db = tmp_path / "legacy.db"
    with closing(sqlite3.connect(db)) as conn:
        conn.executescript("""
            CREATE TABLE games (game_id TEXT PRIMARY KEY, game_status TEXT, board_type TEXT,
                                num_players INTEGER);
            INSERT INTO games VALUES ('a', 'FINISHED', 'square8', 3), ('b', 'active', 'x', 2),
                                     ('c', 'aborted', 'square8', 3);
        """)
    src = GameSource(db)
    try:
        assert [(g.game_id, g.config_key) for g in src.scan()] == [("a", "square8_3p")]
        assert src.scan() == []
        assert src.last_scan_rows == 1
    finally:
        src.close()


def test_corrupt_source_raises_corrupt_data_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    src = GameSource(bad)
    try:
        with pytest.raises(CorruptDataError, match=r"bad\.db"):
            src.scan()
    finally:
        src.close()


def test_discover_sources_finds_game_dbs_only(
        writer: SelfplayWriter, db_path: Path) -> None:
    games = db_path.parent
    writer.write_game()
    merger_out = GameMerger(games / "synced")
    src = GameSource(db_path)
    try:
        src.scan()
        merger_out.merge(one_batch(src, list(game_ids(db_path))))
    finally:
        src.close()
        merger_out.close()
    (games / "nested").mkdir()
    with SelfplayWriter(games / "nested" / "other.db", seed=2):
        pass
    with closing(sqlite3.connect(games / "plain.db")) as conn:
        conn.execute("CREATE TABLE games (game_id TEXT)")
        conn.commit()
    with closing(sqlite3.connect(games / "elo.db")) as conn:
        conn.execute("CREATE TABLE ratings (model TEXT)")
        conn.commit()
    (games / "garbage.db").write_bytes(b"x" * 4096)
    (games / ".hidden.db").write_bytes((games / "plain.db").read_bytes())
    before = sorted(p.name for p in games.rglob("*"))
    found = discover_sources(games, exclude=games / "synced")
    assert found == [games / "nested" / "other.db", games / "plain.db", db_path]
    assert sorted(p.name for p in games.rglob("*")) == before  # nothing created or removed


# -- receiver side -------------------------------------------------------------------------


def test_merge_is_idempotent(
        writer: SelfplayWriter, source: GameSource, merger: GameMerger, tmp_path: Path) -> None:
    ids = [writer.write_game() for _ in range(4)]
    source.scan()
    batch = decode_batch(encode_batch(one_batch(source, ids)))
    target = tmp_path / "synced" / "hex8_2p.db"
    first = merger.merge(batch)
    assert (first.inserted, first.duplicates) == (4, 0)
    counts = table_counts(target)
    assert counts["games"] == 4
    assert counts["game_moves"] == 4 * 30
    assert merger.merge(batch).duplicates == 4
    assert table_counts(target) == counts
    assert game_ids(target) == set(ids)
    assert count_games(target) == 4


def test_merge_partial_overlap_adds_only_new_games(
        writer: SelfplayWriter, source: GameSource, merger: GameMerger, tmp_path: Path) -> None:
    ids = [writer.write_game() for _ in range(5)]
    source.scan()
    first = merger.merge(one_batch(source, ids[:3]))
    second = merger.merge(one_batch(source, ids[1:]))
    assert (first.inserted, second.inserted, second.duplicates) == (3, 2, 2)
    counts = table_counts(tmp_path / "synced" / "hex8_2p.db")
    assert counts["games"] == 5
    assert counts["game_moves"] == 5 * 30
    assert counts["game_events"] == 5 * 2


def test_merge_from_two_sources_reassigns_autoincrement_ids(
        tmp_path: Path, merger: GameMerger) -> None:
    batches = []
    for seed in (1, 2):
        db = tmp_path / f"node{seed}.db"
        with SelfplayWriter(db, moves_per_game=10, seed=seed) as w:
            gid = w.write_game()
        src = GameSource(db)
        try:
            src.scan()
            batches.append(one_batch(src, [gid]))
        finally:
            src.close()
    for batch in batches:
        assert merger.merge(batch).inserted == 1
    counts = table_counts(tmp_path / "synced" / "hex8_2p.db")
    assert counts["games"] == 2
    assert counts["game_events"] == 4


def test_merged_schema_keeps_primary_keys(
        writer: SelfplayWriter, source: GameSource, merger: GameMerger, tmp_path: Path) -> None:
    gid = writer.write_game()
    source.scan()
    merger.merge(one_batch(source, [gid]))
    with closing(sqlite3.connect(tmp_path / "synced" / "hex8_2p.db")) as conn:
        pk = {r[1]: r[5] for r in conn.execute("PRAGMA table_info(game_moves)")}
        assert (pk["game_id"], pk["move_number"]) == (1, 2)
        games_pk = [r[1] for r in conn.execute("PRAGMA table_info(games)") if r[5]]
        assert games_pk == ["game_id"]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _broken(batch: GameBatch, table: str, value: object) -> GameBatch:
    """A copy of ``batch`` whose first row of ``table`` has ``value`` in its third column."""
    tables = []
    for t in batch.tables:
        if t.name == table:
            rows = [(*t.rows[0][:2], value, *t.rows[0][3:]), *t.rows[1:]]
            t = dataclasses.replace(t, rows=rows)
        tables.append(t)
    return dataclasses.replace(batch, tables=tuple(tables))


@pytest.mark.parametrize("value", [None, [1, 2], 2**70])
def test_failing_merge_changes_nothing(
        writer: SelfplayWriter, source: GameSource, merger: GameMerger, tmp_path: Path,
        value: object) -> None:
    good, bad = writer.write_game(), writer.write_game()
    source.scan()
    merger.merge(one_batch(source, [good]))
    target = tmp_path / "synced" / "hex8_2p.db"
    before = table_counts(target)
    # game_moves.phase is NOT NULL; a list cannot be bound; 2**70 overflows SQLite's int64.
    broken = _broken(one_batch(source, [bad]), "game_moves", value)
    with pytest.raises(BadInputError, match="nothing merged"):
        merger.merge(broken)
    assert table_counts(target) == before
    assert game_ids(target) == {good}
    assert merger.merge(one_batch(source, [bad])).inserted == 1  # the DB is still usable


def test_failing_first_merge_creates_no_tables(
        writer: SelfplayWriter, source: GameSource, merger: GameMerger, tmp_path: Path) -> None:
    gid = writer.write_game()
    source.scan()
    with pytest.raises(BadInputError):
        merger.merge(_broken(one_batch(source, [gid]), "game_players", None))
    assert table_counts(tmp_path / "synced" / "hex8_2p.db") == {}
    assert merger.merge(one_batch(source, [gid])).inserted == 1


def test_schema_evolution_adds_columns(merger: GameMerger, tmp_path: Path) -> None:
    base = (Column("game_id", "TEXT", 1, True), Column("board_type", "TEXT", 0, True))
    old = GameBatch("n", "cfg", ("a",), (
        TableRows("games", base, [("a", "hex8")]),
        TableRows("game_x", (Column("id", "INTEGER", 1, False), Column("game_id", "TEXT", 0, True)),
                  [(7, "a")]),
    ))
    new_cols = (*base, Column("quality_score", "REAL", 0, True))
    new = GameBatch("n", "cfg", ("b",), (
        TableRows("games", new_cols, [("b", "hex8", 0.75)]),
        TableRows("game_y", (Column("game_id", "TEXT", 0, True), Column("v", "BLOB", 0, False)),
                  [("b", b"\x00\xff")]),
    ))
    assert merger.merge(old).inserted == 1
    assert merger.merge(new).inserted == 1
    with closing(sqlite3.connect(tmp_path / "synced" / "cfg.db")) as conn:
        rows = conn.execute("SELECT game_id, quality_score FROM games ORDER BY game_id").fetchall()
        assert rows == [("a", None), ("b", 0.75)]
        assert conn.execute("SELECT v FROM game_y").fetchone() == (b"\x00\xff",)
        assert conn.execute("SELECT id, game_id FROM game_x").fetchone() == (1, "a")
        indexes = {r[1] for r in conn.execute("PRAGMA index_list(game_y)")}
        assert "idx_game_y_game_id" in indexes


@pytest.mark.parametrize("key", ["../x", "a/b", "..", "/etc"])
def test_merge_refuses_unsafe_config_key(merger: GameMerger, key: str) -> None:
    cols = (Column("game_id", "TEXT", 1, True),)
    batch = GameBatch("n", key, ("a",), (TableRows("games", cols, [("a",)]),))
    with pytest.raises(UnsafePathError):
        merger.merge(batch)


def test_helpers_on_missing_db(tmp_path: Path) -> None:
    assert count_games(tmp_path / "nope.db") == 0
    assert game_ids(tmp_path / "nope.db") == set()


def test_without_rowid_games_table_is_reported(tmp_path: Path) -> None:
    db = tmp_path / "norowid.db"
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE games (game_id TEXT PRIMARY KEY) WITHOUT ROWID")
        conn.commit()
    src = GameSource(db)
    try:
        with pytest.raises(CorruptDataError, match="WITHOUT ROWID"):
            src.scan()
    finally:
        src.close()
