"""The test writer reproduces RingRift's writer: a fixture kinder than the real one hides bugs."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing
from pathlib import Path

import pytest

from ringsync.selfplay_sim import Mix, SelfplayWriter, main, simulate
from ringsync.store.ringrift_schema import SCHEMA_VERSION


def rows(db: Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql, args).fetchall()


def sidecars(db: Path) -> set[str]:
    return {p.name for p in db.parent.iterdir() if p.name.startswith(db.name + "-")}


def test_per_op_writer_leaves_no_wal_behind_when_nobody_else_holds_the_db(tmp_path: Path) -> None:
    db = tmp_path / "sp.db"
    with SelfplayWriter(db, moves_per_game=10, seed=1) as w:
        w.write_game()
        assert sidecars(db) == set()  # its last close checkpointed and deleted -wal/-shm
        with closing(sqlite3.connect(db)) as other:
            other.execute("SELECT 1 FROM games").fetchall()  # another user holds the DB
            w.write_game()
            assert sidecars(db) == {"sp.db-wal", "sp.db-shm"}
    assert rows(db, "PRAGMA journal_mode") == [("wal",)]


def test_long_lived_writer_keeps_its_wal(tmp_path: Path) -> None:
    db = tmp_path / "sp.db"
    with SelfplayWriter(db, moves_per_game=10, seed=1, pattern="long-lived") as w:
        w.write_game()
        assert sidecars(db) == {"sp.db-wal", "sp.db-shm"}


def test_schema_is_ringrift_v18_fresh_or_migrated(tmp_path: Path) -> None:
    fresh, migrated = tmp_path / "fresh.db", tmp_path / "migrated.db"
    SelfplayWriter(fresh).close()
    SelfplayWriter(migrated, fresh_schema=False).close()
    assert rows(fresh, "SELECT value FROM schema_metadata WHERE key='schema_version'") == [
        (str(SCHEMA_VERSION),)]
    triggers = "SELECT name FROM sqlite_master WHERE type='trigger' ORDER BY name"
    assert rows(fresh, triggers) == [("enforce_moves_on_complete",), ("enforce_moves_on_insert",)]
    assert rows(migrated, triggers) == [("enforce_moves_on_complete",)]


def test_bulk_game_is_one_transaction_and_incremental_is_visible_while_it_runs(
        tmp_path: Path) -> None:
    db = tmp_path / "sp.db"
    with SelfplayWriter(db, moves_per_game=10, seed=1, mode="incremental") as w:
        gid = w.start_game()
        w.add_moves(gid, 3)
        assert rows(db, "SELECT game_status, total_moves, source FROM games") == [
            ("active", 0, "unknown")]
        assert rows(db, "SELECT count(*), count(heuristic_features) FROM game_moves") == [(3, 3)]
        w.add_moves(gid, 7)
        w.complete_game(gid)
    assert rows(db, "SELECT game_status, total_moves FROM games") == [("completed", 10)]
    bulk = tmp_path / "bulk.db"
    with SelfplayWriter(bulk, moves_per_game=10, seed=1) as w:
        gid = w.write_game()
    assert rows(bulk, "SELECT game_status, total_moves, source FROM games") == [
        ("completed", 10, "selfplay")]
    assert rows(bulk, "SELECT count(*) FROM game_players") == [(2,)]


def test_outcomes_aborted_truncated_killed_late(tmp_path: Path) -> None:
    db = tmp_path / "sp.db"
    with SelfplayWriter(db, moves_per_game=20, seed=3) as w:
        aborted = w.write_game("aborted")
        truncated = w.write_game("truncated")
        killed = w.write_game("killed")
        late = w.write_game("late")
        w.change_later(late)
        with pytest.raises(ValueError, match="outcome='lost': use one of"):
            w.write_game("lost")
    status = dict(rows(db, "SELECT game_id, game_status || '/' || total_moves FROM games"))
    assert status == {truncated: "active/20", killed: "active/0", late: "completed/20"}
    assert rows(db, "SELECT count(*) FROM game_moves WHERE game_id=?", aborted) == [(0,)]  # cascade
    assert rows(db, "SELECT count(*) FROM game_moves WHERE game_id=?", killed) == [(10,)]
    assert rows(db, "SELECT parity_status FROM games WHERE game_id=?", late) == [("passed",)]
    assert rows(db, "SELECT count(*) FROM game_nnue_features WHERE game_id=?", late) == [(2,)]
    assert not db.with_name("sp.db.writing").exists()


def test_bad_options_name_the_option(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pattern='pooled': use one of per-op, long-lived"):
        SelfplayWriter(tmp_path / "a.db", pattern="pooled")
    with pytest.raises(ValueError, match="mode='batch': use one of bulk, incremental"):
        SelfplayWriter(tmp_path / "a.db", mode="batch")


def test_concurrent_writers_on_one_db_report_every_outcome(tmp_path: Path) -> None:
    db = tmp_path / "sp.db"
    out = simulate(db, 40, writers=3, seed=9, moves_per_game=10, mode="incremental",
                   mix=Mix(aborted=0.1, truncated=0.1, killed=0.1, late=0.1), leave_in_progress=2)
    assert len(out.completed) == 40
    completed = {r[0] for r in rows(db, "SELECT game_id FROM games WHERE game_status='completed'")}
    assert completed == set(out.completed)
    active = {r[0] for r in rows(db, "SELECT game_id FROM games WHERE game_status='active'")}
    assert active == set(out.truncated + out.killed + out.in_progress)
    assert not set(out.aborted) & {r[0] for r in rows(db, "SELECT game_id FROM games")}
    assert set(out.late) <= completed


def test_cli_writes_a_summary_of_which_game_ended_how(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    db, summary = tmp_path / "sp.db", tmp_path / "summary.json"
    assert main([str(db), "--games", "6", "--moves", "10", "--seed", "2", "--p-aborted", "0.3",
                 "--p-late", "0.3", "--writers", "2", "--summary", str(summary)]) == 0
    assert "completed 6" in capsys.readouterr().out
    report = json.loads(summary.read_text())
    assert len(report["completed"]) == 6
    assert set(report) == {"completed", "aborted", "truncated", "killed", "late", "in_progress"}


def test_cli_refuses_fewer_moves_than_ringrift_allows(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ringsync.selfplay_sim", str(tmp_path / "a.db"),
                           "--moves", "3"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "--moves 3" in proc.stderr


def test_stop_ends_the_writer_early(tmp_path: Path) -> None:
    stop = threading.Event()
    stop.set()
    assert simulate(tmp_path / "a.db", 100, stop=stop, moves_per_game=10).completed == []
