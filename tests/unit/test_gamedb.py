"""Tests for game extraction from live selfplay DBs and merging at the receiver (real SQLite)."""

from __future__ import annotations

import dataclasses
import os
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

import ringsync.selfplay_sim
import ringsync.store.gamesource
from ringsync.errors import BadInputError, CorruptDataError, UnsafePathError
from ringsync.protocol.batch import (
    Column,
    GameBatch,
    TableSchema,
    batch_rows,
    build_batch,
    decode_batch,
    encode_batch,
)
from ringsync.selfplay_sim import SelfplayWriter
from ringsync.store import gamemerge
from ringsync.store.gamedb import (
    GameMerger,
    GameSource,
    SourceGame,
    count_games,
    game_ids,
)

PER_GAME_TABLES = {
    "games", "game_players", "game_initial_state", "game_moves", "game_state_snapshots",
    "game_choices", "game_history_entries", "game_nnue_features", "game_events",
    "orphaned_games",  # keyed by game_id, no rows for healthy games
}
REPO = Path(ringsync.selfplay_sim.__file__).resolve().parents[1]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "games" / "selfplay.db"


@pytest.fixture
def writer(db_path: Path) -> Iterator[SelfplayWriter]:
    with SelfplayWriter(db_path, moves_per_game=30, seed=1, extra_tables=True) as w:
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


def dir_listing(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in directory.iterdir()}


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
    mixed = one_batch(source, [live, done])
    assert mixed.game_ids == (done,)
    for table in mixed.tables:
        at = [c.name for c in table.columns].index("game_id")
        assert {r[at] for r in batch_rows(mixed, table.name)} <= {done}, table.name
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
            "SELECT game_id FROM games WHERE game_status='active'")}
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
            cols = ", ".join(f'"{c.name}"' for c in table.columns)
            expected = conn.execute(
                f'SELECT {cols} FROM "{table.name}" WHERE game_id=?', (gid,)).fetchall()
            assert sorted(batch_rows(batch, table.name), key=repr) == sorted(expected, key=repr)
            assert expected or table.name == "orphaned_games", table.name
    assert all(isinstance(r[3], bytes) for r in batch_rows(batch, "game_nnue_features"))


def test_extract_reads_every_table_from_one_snapshot(
        writer: SelfplayWriter, source: GameSource, db_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    gid = writer.write_game()
    source.scan()
    real_copy = ringsync.store.gamesource._copy_games

    def copy_after_a_concurrent_commit(*args: Any) -> Any:
        # The games rows were read already; a commit now must not show in the other tables.
        with closing(sqlite3.connect(db_path)) as other:
            other.execute("DELETE FROM game_moves WHERE game_id=?", (gid,))
            other.execute("DROP TRIGGER enforce_moves_on_complete")
            other.execute("UPDATE games SET total_moves=0 WHERE game_id=?", (gid,))
            other.commit()
        return real_copy(*args)

    monkeypatch.setattr(ringsync.store.gamesource, "_copy_games", copy_after_a_concurrent_commit)
    batch = one_batch(source, [gid])
    assert len(batch_rows(batch, "game_moves")) == 30
    assert batch_rows(batch, "games")[0][9] == 30  # total_moves
    monkeypatch.undo()
    assert batch_rows(one_batch(source, [gid]), "game_moves") == []


def test_extract_creates_nothing_next_to_the_live_db(
        writer: SelfplayWriter, db_path: Path, tmp_path: Path) -> None:
    ids = [writer.write_game() for _ in range(3)]
    live = sqlite3.connect(db_path)  # another reader keeps the WAL (a per-op writer holds none)
    live.execute("SELECT count(*) FROM games").fetchone()
    before = dir_listing(db_path.parent)
    assert {"selfplay.db-wal", "selfplay.db-shm"} <= set(before)  # the writer is live
    src = GameSource(db_path)
    try:
        src.scan()
        batches = src.extract(ids, source_node="n")
    finally:
        src.close()
    assert [sorted(b.game_ids) for b in batches] == [sorted(ids)]
    assert dir_listing(db_path.parent) == before  # no new files, WAL neither grown nor reset
    assert writer.write_game()  # the writer is undisturbed
    live.close()


def test_extract_splits_configs_into_one_image_each(
        db_path: Path, writer: SelfplayWriter, merger: GameMerger, tmp_path: Path) -> None:
    hex_ids = [writer.write_game() for _ in range(2)]
    with SelfplayWriter(db_path, board_type="square8", num_players=3, moves_per_game=30,
                        seed=9) as other:
        square_ids = [other.write_game() for _ in range(3)]
    src = GameSource(db_path)
    try:
        src.scan()
        batches = {b.config_key: b for b in src.extract([*square_ids, *hex_ids],
                                                        source_node="n")}
    finally:
        src.close()
    assert {k: sorted(b.game_ids) for k, b in batches.items()} == {
        "hex8_2p": sorted(hex_ids), "square8_3p": sorted(square_ids)}
    for key, batch in batches.items():
        assert len(batch_rows(batch, "game_moves")) == 30 * len(batch.game_ids)
        assert merger.merge(decode_batch(encode_batch(batch))).inserted == len(batch.game_ids)
        assert game_ids(tmp_path / "synced" / f"{key}.db") == set(batch.game_ids)


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
    writer.add_moves(live[0], 5)  # RingRift's trigger: a completed game has >= 5 moves
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
    assert batch.tables[0].columns[-1].name == "extra"
    assert batch_rows(batch, "games")[0][-1] == "x"


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
    assert batch_rows(batch, "moves") == [("a", 1), ("a", 2)]


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
        with SelfplayWriter(db, moves_per_game=10, seed=seed, extra_tables=True) as w:
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


def test_merged_batch_is_durable_when_merge_returns(
        writer: SelfplayWriter, source: GameSource, merger: GameMerger, tmp_path: Path) -> None:
    """The commit itself fsyncs the WAL (synchronous=FULL); no checkpoint is needed for the ack."""
    ids = [writer.write_game() for _ in range(3)]
    source.scan()
    merger.merge(one_batch(source, ids[:1]))  # the first creates the DB (checkpointed, renamed)
    merger.merge(one_batch(source, ids[1:]))
    (target,) = merger._dbs.values()
    assert target.conn.execute("PRAGMA main.synchronous").fetchone()[0] == 2  # FULL
    assert target.wal_bytes() > 0  # in the WAL, not yet checkpointed: CHECKPOINT_WAL_BYTES
    assert game_ids(tmp_path / "synced" / "hex8_2p.db") == set(ids)
    with closing(sqlite3.connect(tmp_path / "synced" / "hex8_2p.db")) as conn:
        assert conn.execute("PRAGMA page_size").fetchone()[0] == gamemerge.TARGET_PAGE_SIZE


def tampered(batch: GameBatch, *statements: str) -> GameBatch:
    """A copy of ``batch`` whose image was changed by ``statements`` (the header is kept)."""
    with closing(sqlite3.connect(":memory:", isolation_level=None)) as conn:
        conn.deserialize(batch.image)
        for sql in statements:
            conn.execute(sql)
        return dataclasses.replace(batch, image=conn.serialize())


def first_id(batch: GameBatch) -> str:
    return batch.game_ids[0]


@pytest.mark.parametrize("statement", [
    "INSERT INTO game_moves SELECT * FROM game_moves WHERE rowid=1",  # duplicate primary key
    "INSERT INTO game_players SELECT * FROM game_players WHERE rowid=2",  # in another table
])
def test_failing_merge_changes_nothing(
        writer: SelfplayWriter, source: GameSource, merger: GameMerger, tmp_path: Path,
        statement: str) -> None:
    good, bad = writer.write_game(), writer.write_game()
    source.scan()
    merger.merge(one_batch(source, [good]))
    target = tmp_path / "synced" / "hex8_2p.db"
    before = table_counts(target)
    with pytest.raises(BadInputError, match="nothing merged"):
        merger.merge(tampered(one_batch(source, [bad]), statement))
    assert table_counts(target) == before
    assert game_ids(target) == {good}
    assert merger.merge(one_batch(source, [bad])).inserted == 1  # the DB is still usable


def test_failing_first_merge_creates_no_tables(
        writer: SelfplayWriter, source: GameSource, merger: GameMerger, tmp_path: Path) -> None:
    gid = writer.write_game()
    source.scan()
    with pytest.raises(BadInputError):
        merger.merge(tampered(one_batch(source, [gid]),
                              "INSERT INTO game_players SELECT * FROM game_players WHERE rowid=1"))
    assert table_counts(tmp_path / "synced" / "hex8_2p.db") == {}
    assert merger.merge(one_batch(source, [gid])).inserted == 1


def _other_columns(batch: GameBatch) -> GameBatch:
    """The header claims one column fewer for game_moves than the image holds."""
    tables = tuple(dataclasses.replace(t, columns=t.columns[:-1]) if t.name == "game_moves" else t
                   for t in batch.tables)
    return dataclasses.replace(batch, tables=tables)


def _image_of(data: bytes) -> Callable[[GameBatch], GameBatch]:
    return lambda b: dataclasses.replace(b, image=data)


def _overwrite_page(page: int) -> Callable[[GameBatch], GameBatch]:
    def tamper(b: GameBatch) -> GameBatch:
        image = bytearray(b.image)
        image[4096 * page:4096 * (page + 1)] = GARBAGE[:4096]
        return dataclasses.replace(b, image=bytes(image))
    return tamper


def _sql(*statements: str) -> Callable[[GameBatch], GameBatch]:
    return lambda b: tampered(b, *(s.format(id=first_id(b), other=b.game_ids[1])
                                   for s in statements))


UNREADABLE = "unreadable image"
SCHEMA = "image schema does not match the header"
STRAY = "belong to games not in the header"
GAMES_ROWS = "games table has"
GARBAGE = random.Random(0).randbytes(64 * 1024)

BAD_IMAGES: dict[str, tuple[Callable[[GameBatch], GameBatch], str]] = {
    "random bytes": (_image_of(GARBAGE), UNREADABLE),
    "sqlite magic then garbage": (_image_of(b"SQLite format 3\x00" + GARBAGE), UNREADABLE),
    "truncated": (lambda b: dataclasses.replace(b, image=b.image[:len(b.image) // 2]),
                  UNREADABLE),
    "overwritten b-tree page": (_overwrite_page(3), UNREADABLE),
    "empty database": (lambda b: tampered(b, *(f'DROP TABLE "{t.name}"' for t in b.tables)),
                       SCHEMA),
    "extra table": (_sql("CREATE TABLE extra (game_id TEXT)"), SCHEMA),
    "missing table": (_sql("DROP TABLE game_events"), SCHEMA),
    "view": (_sql("CREATE VIEW v AS SELECT * FROM games"), SCHEMA),
    "trigger": (_sql("CREATE TRIGGER t AFTER INSERT ON games BEGIN DELETE FROM games; END"),
                SCHEMA),
    "index": (_sql("CREATE INDEX i ON game_moves (game_id)"), SCHEMA),
    "extra column in the image": (_sql("ALTER TABLE game_moves ADD COLUMN x TEXT"), SCHEMA),
    "fewer columns in the header": (_other_columns, SCHEMA),
    "child row of a game not in the header": (
        _sql("UPDATE game_moves SET game_id='intruder' WHERE rowid=1"), STRAY),
    "child row without game_id": (_sql("UPDATE game_moves SET game_id=NULL WHERE rowid=1"), STRAY),
    "games row not in the header": (_sql("UPDATE games SET game_id='intruder' WHERE rowid=1"),
                                    STRAY),
    "games table misses a header id": (_sql("DELETE FROM games WHERE game_id='{id}'"),
                                       GAMES_ROWS),
    "games table duplicates a header id": (
        _sql("INSERT INTO games SELECT * FROM games WHERE game_id='{id}'"), GAMES_ROWS),
    "games table duplicates one id instead of another": (
        _sql("UPDATE games SET game_id='{id}' WHERE game_id='{other}'"), GAMES_ROWS),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_malformed_image_is_rejected_and_changes_nothing(
        writer: SelfplayWriter, source: GameSource, merger: GameMerger, tmp_path: Path,
        name: str) -> None:
    done = [writer.write_game() for _ in range(2)]
    fresh = [writer.write_game() for _ in range(2)]
    source.scan()
    merger.merge(one_batch(source, done))
    target = tmp_path / "synced" / "hex8_2p.db"
    before = table_counts(target)
    tamper, reason = BAD_IMAGES[name]
    with pytest.raises(BadInputError, match=f"nothing merged: .*{reason}"):
        merger.merge(tamper(one_batch(source, fresh)))
    assert table_counts(target) == before
    assert game_ids(target) == set(done)
    assert merger.merge(one_batch(source, fresh)).inserted == 2  # the DB is still usable


def test_schema_evolution_adds_columns(merger: GameMerger, tmp_path: Path) -> None:
    base = (Column("game_id", "TEXT", 1, True), Column("board_type", "TEXT", 0, True))
    x_cols = (Column("id", "INTEGER", 1, False), Column("game_id", "TEXT", 0, True))
    old = build_batch("n", "cfg", ("a",), [
        (TableSchema("games", base), [("a", "hex8")]),
        (TableSchema("game_x", x_cols), [(7, "a")]),
    ])
    new_cols = (*base, Column("quality_score", "REAL", 0, True))
    y_cols = (Column("game_id", "TEXT", 0, True), Column("v", "BLOB", 0, False))
    new = build_batch("n", "cfg", ("b",), [
        (TableSchema("games", new_cols), [("b", "hex8", 0.75)]),
        (TableSchema("game_y", y_cols), [("b", b"\x00\xff")]),
    ])
    assert merger.merge(old).inserted == 1
    assert merger.merge(new).inserted == 1
    with closing(sqlite3.connect(tmp_path / "synced" / "cfg.db")) as conn:
        rows = conn.execute("SELECT game_id, quality_score FROM games ORDER BY game_id").fetchall()
        assert rows == [("a", None), ("b", 0.75)]
        assert conn.execute("SELECT v FROM game_y").fetchone() == (b"\x00\xff",)
        # No key from a peer (it could refuse later batches): the source's row id is not kept.
        assert conn.execute("SELECT id, game_id FROM game_x").fetchone() == (None, "a")
        assert [r[5] for r in conn.execute("PRAGMA table_info(game_x)")] == [0, 0]
        indexes = {r[1] for r in conn.execute("PRAGMA index_list(game_y)")}
        assert "ringsync:game_y:game_id" in indexes


@pytest.mark.parametrize("key", ["../x", "a/b", "..", "/etc"])
def test_merge_refuses_unsafe_config_key(merger: GameMerger, key: str) -> None:
    cols = (Column("game_id", "TEXT", 1, True),)
    batch = build_batch("n", key, ("a",), [(TableSchema("games", cols), [("a",)])])
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


def test_sources_with_diverging_constraints_all_merge(
        writer: SelfplayWriter, source: GameSource, merger: GameMerger, tmp_path: Path) -> None:
    """A NOT NULL that one source declares must not reject another source's games forever."""
    first, second = writer.write_game(), writer.write_game()
    source.scan()
    merger.merge(one_batch(source, [first]))
    nulls = tampered(one_batch(source, [second]), "UPDATE game_moves SET phase=NULL")
    older_schema = dataclasses.replace(nulls, tables=tuple(
        dataclasses.replace(t, columns=tuple(dataclasses.replace(c, notnull=False)
                                             for c in t.columns)) for t in nulls.tables))
    assert merger.merge(older_schema).inserted == 1  # a neutral '' where the target says NOT NULL
    assert game_ids(tmp_path / "synced" / "hex8_2p.db") == {first, second}


def test_integer_declared_game_id_does_not_lock_out_text_ids(
        writer: SelfplayWriter, source: GameSource, merger: GameMerger) -> None:
    first, second = writer.write_game(), writer.write_game()
    source.scan()
    batch = one_batch(source, [first])
    tables = tuple(dataclasses.replace(t, columns=tuple(
        dataclasses.replace(c, decl_type="INTEGER") if c.name == "game_id" else c
        for c in t.columns)) if t.name == "games" else t for t in batch.tables)
    odd = build_batch(batch.source_node, batch.config_key, batch.game_ids,
                      [(t, batch_rows(batch, t.name)) for t in tables])
    assert merger.merge(odd).inserted == 1
    assert merger.merge(one_batch(source, [second])).inserted == 1


def test_many_config_keys_keep_open_files_bounded(
        writer: SelfplayWriter, source: GameSource, tmp_path: Path) -> None:
    """Config keys come from peers: distinct keys must not pile up open connections."""
    ids = [writer.write_game() for _ in range(12)]
    source.scan()
    merger = GameMerger(tmp_path / "many", max_open=4)
    fds_before = len(os.listdir("/proc/self/fd"))
    try:
        for i, gid in enumerate(ids):
            merger.merge(dataclasses.replace(one_batch(source, [gid]), config_key=f"peer_key_{i}"))
        # db + wal + shm, plus the db fd SQLite keeps for reuse after a checkpoint connection
        assert len(os.listdir("/proc/self/fd")) - fds_before <= 4 * 4
        for i, gid in enumerate(ids):
            assert game_ids(tmp_path / "many" / f"peer_key_{i}.db") == {gid}
        again = merger.merge(dataclasses.replace(one_batch(source, [ids[0]]), config_key="peer_key_0"))
        assert again.duplicates == 1  # an evicted DB reopens and still de-duplicates
    finally:
        merger.close()
