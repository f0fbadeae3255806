"""Issue 7 A1/A3: a merge's cost follows the batch, not the DB; the WAL stays bounded."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from ringsync.errors import BadInputError
from ringsync.ops.metrics import Metrics
from ringsync.selfplay_sim import SelfplayWriter
from ringsync.store import gamemerge
from ringsync.store.gamedb import GameMerger, GameSource, game_ids
from tests.unit.test_gamedb import one_batch, tampered

# Tables a batch brings (bounded by the batch) and the receiver's own scratch tables.
_BATCH_SIDE = ("incoming.", "temp.")
_BATCH_ALIASES = {"b"}  # temp.batch_ids AS b


@pytest.fixture
def merger(tmp_path: Path) -> Iterator[GameMerger]:
    m = GameMerger(tmp_path / "synced")
    yield m
    m.close()


def opened(merger: GameMerger, key: str = "hex8_2p") -> gamemerge._TargetDB:
    """The merger's open connection to ``key``'s DB (a first merge creates it and closes)."""
    return merger._target(merger._safe_path(key))


def plan_problems(conn: sqlite3.Connection, sql: str) -> list[str]:
    """Plan lines of ``sql`` that walk a table or index of the merged DB itself."""
    temp_indexes = {r[0] for r in conn.execute("SELECT name FROM temp.sqlite_master WHERE type='index'")}
    bad = []
    for *_, detail in conn.execute("EXPLAIN QUERY PLAN " + sql, _dummy_params(sql)):
        words = str(detail).split()
        if words[0] == "SCAN" and not (words[1].startswith(_BATCH_SIDE) or words[1] in _BATCH_ALIASES):
            bad.append(detail)
        if "IN-OPERATOR" in words and words[2] not in temp_indexes:
            bad.append(detail)
    return bad


def _dummy_params(sql: str) -> tuple[str, ...]:
    return ("x",) * sql.count("?")


@pytest.mark.parametrize("analyzed", [False, True], ids=["no-stats", "after-ANALYZE"])
def test_every_merge_statement_is_keyed_on_the_merged_db(
        writer: SelfplayWriter, source: GameSource, merger: GameMerger, tmp_path: Path,
        analyzed: bool) -> None:
    """No statement of a merge scans main.games or walks one of its indexes as an IN list."""
    ids = [writer.write_game() for _ in range(6)]
    source.scan()
    merger.merge(one_batch(source, ids[:3]))
    target = opened(merger)
    if analyzed:  # RingRift or an operator may have run ANALYZE: plans must not flip
        target.conn.execute("ANALYZE main")
    statements: list[str] = []
    target.conn.set_trace_callback(statements.append)
    try:
        merger.merge(one_batch(source, ids))  # 3 held (late-row path), 3 new
    finally:
        target.conn.set_trace_callback(None)
    dml = [s for s in statements if s.split()[0].upper() in {"INSERT", "DELETE", "SELECT", "UPDATE"}
           and "main." in s and "sqlite_master" not in s]
    split = next(s for s in dml if "present_ids" in s and 'main."games"' in s)
    with target.lock, closing(sqlite3.connect(":memory:")):
        target.conn.execute("ATTACH ':memory:' AS incoming")
        try:
            for table in one_batch(source, ids).tables:
                cols = ", ".join(f'"{c.name}"' for c in table.columns)
                target.conn.execute(f'CREATE TABLE incoming."{table.name}" ({cols})')
            # _refuse_short's DELETEs of a refused game's rows, for every child table
            dml += [f'DELETE FROM main."{name}" WHERE game_id = ?' for name, table in target._tables.items()
                    if name != "games" and "game_id" in table.columns]
            problems = {s: plan_problems(target.conn, s) for s in dml}
        finally:
            target.conn.execute("DETACH incoming")
    assert not {s: p for s, p in problems.items() if p}
    plan = [r[3] for r in target.conn.execute("EXPLAIN QUERY PLAN " + split)]
    assert any(p.startswith("SEARCH g USING COVERING INDEX sqlite_autoindex_games_1") for p in plan), plan


def test_wal_stays_bounded_while_a_reader_comes_and_goes(
        writer: SelfplayWriter, source: GameSource, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A reader's open snapshot stops checkpoints (counted, alarmed once); once it ends, the
    next merges empty the WAL again; the reader sees its snapshot whole throughout."""
    limit = 4 * gamemerge.TARGET_PAGE_SIZE
    monkeypatch.setattr(gamemerge, "CHECKPOINT_WAL_BYTES", limit)
    monkeypatch.setattr(gamemerge, "WAL_ALARM_BYTES", 40 * gamemerge.TARGET_PAGE_SIZE)
    monkeypatch.setattr(gamemerge, "CHECKPOINT_RETRY_S", 0.0)
    metrics = Metrics()
    merger = GameMerger(tmp_path / "synced", metrics=metrics)
    target = tmp_path / "synced" / "hex8_2p.db"
    blocked = "ringsync_checkpoints_blocked_total"
    try:
        first = [writer.write_game() for _ in range(5)]
        source.scan()
        merger.merge(one_batch(source, first))
        with closing(sqlite3.connect(target, isolation_level=None)) as reader:
            reader.execute("BEGIN")
            snapshot = reader.execute("SELECT game_id, total_moves FROM games ORDER BY game_id").fetchall()
            moves = reader.execute("SELECT count(*) FROM game_moves").fetchone()[0]
            peak = 0
            for _ in range(12):  # the reader stays in its transaction throughout
                ids = [writer.write_game() for _ in range(4)]
                source.scan()
                merger.merge(one_batch(source, ids))
                assert merger.wait_checkpoints(30)  # checkpoints run in a thread of their own
                peak = max(peak, os.stat(f"{target}-wal").st_size)
                assert reader.execute("SELECT game_id, total_moves FROM games "
                                      "ORDER BY game_id").fetchall() == snapshot
                assert reader.execute("SELECT count(*) FROM game_moves").fetchone()[0] == moves
            assert peak > gamemerge.WAL_ALARM_BYTES  # pinned by the reader
            assert (metrics.registry.get_sample_value(blocked) or 0) >= 1
            assert metrics.registry.get_sample_value("ringsync_merged_wal_bytes") == peak
            reader.execute("COMMIT")
        for _ in range(2):  # readers gone: the next merges checkpoint and empty the WAL
            ids = [writer.write_game() for _ in range(4)]
            source.scan()
            merger.merge(one_batch(source, ids))
            assert merger.wait_checkpoints(30)
        # The WAL restarted and its file was cut back (to wal_size_limit()): it holds at most
        # the last merge's frames now, a fraction of what the reader had pinned.
        size = os.stat(f"{target}-wal").st_size
        assert size < peak // 4, (size, peak)
        assert (metrics.registry.get_sample_value("ringsync_merged_wal_bytes") or 0) < peak // 4
        assert len(game_ids(target)) == 5 + 12 * 4 + 2 * 4
        with closing(sqlite3.connect(target)) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        merger.close()
    alarms = [r.getMessage() for r in caplog.records if "alarm" in r.getMessage()]
    assert len(alarms) == 2, alarms  # once when it passed the alarm, once when back under
    assert "keeps checkpoints from finishing" in alarms[0]
    assert "back to" in alarms[1]


def test_a_failed_checkpoint_does_not_fail_the_durable_merge(
        writer: SelfplayWriter, source: GameSource, merger: GameMerger, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(self: gamemerge._TargetDB, **_: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    ids = [writer.write_game() for _ in range(3)]
    source.scan()
    merger.merge(one_batch(source, ids[:1]))  # creates the DB
    monkeypatch.setattr(gamemerge, "CHECKPOINT_WAL_BYTES", 1)  # due after every merge
    monkeypatch.setattr(gamemerge._TargetDB, "checkpoint", broken)
    result = merger.merge(one_batch(source, ids[1:]))
    assert merger.wait_checkpoints(30)
    assert result.inserted == 2
    assert game_ids(tmp_path / "synced" / "hex8_2p.db") == set(ids)
    assert any("checkpoint failed" in r.getMessage() for r in caplog.records)


def test_a_new_db_appears_whole_and_a_failed_first_batch_leaves_nothing(
        writer: SelfplayWriter, source: GameSource, merger: GameMerger, tmp_path: Path) -> None:
    """A reader polling the directory never finds the merged DB without its tables."""
    ids = [writer.write_game() for _ in range(40)]
    source.scan()
    target = tmp_path / "synced" / "hex8_2p.db"
    problems: list[str] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            if target.exists():
                try:
                    with closing(sqlite3.connect(f"file:{target}?mode=ro", uri=True)) as conn:
                        conn.execute("SELECT count(*) FROM games").fetchone()
                        conn.execute("SELECT value FROM schema_metadata").fetchone()
                except sqlite3.Error as exc:
                    problems.append(str(exc))
            time.sleep(0.0005)

    with pytest.raises(BadInputError):  # passes verification, fails in the merge
        merger.merge(tampered(one_batch(source, ids[:1]),
                              "INSERT INTO game_players SELECT * FROM game_players WHERE rowid=1"))
    assert sorted(p.name for p in target.parent.iterdir()) == []
    reader = threading.Thread(target=poll)
    reader.start()
    try:
        merger.merge(one_batch(source, ids))
    finally:
        stop.set()
        reader.join(10)
    assert problems == []
    assert len(game_ids(target)) == 40
    assert sorted(p.name for p in target.parent.iterdir() if "creating" in p.name) == []


def test_a_checkpoint_never_holds_up_a_merge_or_its_ack(
        writer: SelfplayWriter, source: GameSource, merger: GameMerger, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """At a million games held a checkpoint copies ~100 MB of random pages: it runs in the
    merger's checkpoint thread while merges return (and are acknowledged) meanwhile."""
    release, finished = threading.Event(), threading.Event()
    real = gamemerge._TargetDB.checkpoint

    def slow(self: gamemerge._TargetDB, **kwargs: Any) -> gamemerge.CheckpointResult | None:
        release.wait(20)
        try:
            return real(self, **kwargs)
        finally:
            finished.set()

    ids = [writer.write_game() for _ in range(6)]
    source.scan()
    merger.merge(one_batch(source, ids[:2]))  # creates the DB
    monkeypatch.setattr(gamemerge, "CHECKPOINT_WAL_BYTES", 1)  # due after every merge
    monkeypatch.setattr(gamemerge._TargetDB, "checkpoint", slow)
    assert merger.merge(one_batch(source, ids[2:4])).inserted == 2
    assert merger.merge(one_batch(source, ids[4:])).inserted == 2
    assert not finished.is_set()  # both merges returned while the checkpoint was held up
    release.set()
    assert merger.wait_checkpoints(30)
    assert finished.is_set()
    assert game_ids(tmp_path / "synced" / "hex8_2p.db") == set(ids)
