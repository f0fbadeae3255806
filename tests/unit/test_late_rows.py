"""Issue 6 item 5 and loud sources: games that change after completion, bounded re-checks,
games deleted after shipping, and sources that cannot be read."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

from ringsync.daemons.auto_sync import AutoSyncDaemon
from ringsync.daemons.auto_sync.triggers import Trigger
from ringsync.daemons.base import HealthState
from ringsync.errors import CorruptDataError
from ringsync.node import NodeContext
from ringsync.selfplay_sim import SelfplayWriter
from ringsync.store.gamesource import GameSource
from ringsync.store.receiver import GameReceiver
from ringsync.transport.memory import MemoryTransport
from tests.conftest import write_games
from tests.unit.test_auto_sync import held
from tests.unit.test_lock_loss import touch_file_like_a_header_check, write_in_other_process


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def transport(tmp_path: Path) -> MemoryTransport:
    t = MemoryTransport()
    t.receivers.update({n: GameReceiver(tmp_path / n / "synced") for n in ("train-1", "train-2")})
    return t


def ids(games: object) -> list[str]:
    return [g.game_id for g in games]  # type: ignore[attr-defined]


def sample(ctx: NodeContext, name: str, **labels: str) -> float:
    return ctx.metrics.registry.get_sample_value(name, labels) or 0.0


def test_rows_added_after_completion_report_the_game_once(tmp_path: Path) -> None:
    db = tmp_path / "sp.db"
    with SelfplayWriter(db, moves_per_game=20, seed=1) as w:
        first = [w.write_game() for _ in range(3)]
        source = GameSource(db)
        try:
            assert ids(source.scan_all().completed) == first
            w.change_later(first[1])
            fresh = w.write_game()
            w.change_later(fresh)  # changed before anyone saw it: ships whole, not as a change
            scan = source.scan_all()
            assert (ids(scan.completed), ids(scan.changed)) == ([fresh], [first[1]])
            assert scan.changed[0].config_key == "hex8_2p"
            again = source.scan_all()
            assert (again.completed, again.changed) == ([], [])
        finally:
            source.close()


def test_rows_added_while_no_source_was_open_are_found_from_saved_cursors(tmp_path: Path) -> None:
    """A restart between a game's shipping and its late rows must not lose those rows."""
    db = tmp_path / "sp.db"
    with SelfplayWriter(db, moves_per_game=20, seed=1) as w:
        first = [w.write_game() for _ in range(3)]
        source = GameSource(db)
        try:
            source.scan_all()
            saved = source.child_cursors
        finally:
            source.close()
        assert saved
        w.change_later(first[0])  # while ringsync is down
        fresh = w.write_game()
        resumed = GameSource(db, child_cursors=saved)
        forgetful = GameSource(db)
        try:
            scan = resumed.scan_all()
            # fresh is reported too (its rows are past the cursors): re-queueing a game that
            # no target holds yet does nothing, so only the changed one goes out again.
            assert set(ids(scan.changed)) == {first[0], fresh}
            assert ids(scan.completed) == [*first, fresh]
            assert resumed.scan_all().changed == []
            assert forgetful.scan_all().changed == []  # without them, the late rows are lost
        finally:
            resumed.close()
            forgetful.close()


def test_truncated_games_are_not_rechecked_and_placeholders_are_given_up(tmp_path: Path) -> None:
    db = tmp_path / "sp.db"
    clock = Clock()
    with SelfplayWriter(db, moves_per_game=20, seed=2, mode="incremental") as w:
        truncated = w.write_game("truncated")
        killed = w.write_game("killed")
        source = GameSource(db, active_timeout=3600, clock=clock)
        try:
            assert source.scan_all().completed == []
            source.scan_all()
            assert source.last_scan_rows == 1  # only the placeholder is re-read
            clock.now += 3601
            assert source.scan_all().given_up == 1
            source.scan_all()
            assert source.last_scan_rows == 0
        finally:
            source.close()
    assert truncated != killed


def test_manifest_requeue_puts_delivered_games_back_for_their_holders(
        node_factory: Callable[..., NodeContext]) -> None:
    from ringsync.store.manifest import LocalGame
    manifest = node_factory("selfplay-1").manifest
    manifest.record_discovered([LocalGame("a", "s.db", "hex8_2p"),
                                LocalGame("b", "s.db", "hex8_2p")], ["t1", "t2"])
    manifest.ack("t1", ["a", "b"])
    manifest.ack("t2", ["a"])
    assert manifest.requeue(["a", "unknown"]) == 2  # only where it was delivered
    assert [g.game_id for g in manifest.pending("t1", 10)] == ["a"]
    assert [g.game_id for g in manifest.pending("t2", 10)] == ["a", "b"]
    assert manifest.delivered_from("s.db", 10) == ["a", "b"]
    assert manifest.delivered_from("s.db", 1, after="a") == ["b"]
    manifest.ack("t1", ["a"])
    manifest.ack("t2", ["a", "b"])
    assert manifest.requeue(["a", "b"], "t2") == 2  # the one target whose copy is old
    assert manifest.pending("t1", 10) == []
    assert [g.game_id for g in manifest.pending("t2", 10)] == ["a", "b"]
    assert manifest.requeue(["a"], "nobody") == 0


async def test_changed_game_is_sent_again_to_its_holders(
        node_factory: Callable[..., NodeContext], transport: MemoryTransport, tmp_path: Path) -> None:
    ctx = node_factory("selfplay-1")
    db = ctx.settings.games_dir / "sp.db"
    done, _ = write_games(db, 4)
    daemon = AutoSyncDaemon(ctx, transport, retry_initial=0.0)
    await daemon.sync_once()
    assert sorted(held(tmp_path, "train-1")) == sorted(done)
    with SelfplayWriter(db, moves_per_game=20, seed=8) as w:
        w.change_later(done[2])
    await daemon.sync_once(Trigger.EVENT)
    assert sample(ctx, "ringsync_source_games_changed_total") == 1
    for peer in ("train-1", "train-2"):
        assert sample(ctx, "ringsync_games_already_present_total", peer=peer) == 1
        assert ctx.manifest.outbox_size(peer) == 0
    await daemon.sync_once()
    assert sample(ctx, "ringsync_source_games_changed_total") == 1  # exactly once
    await daemon.close()


def nnue_rows(tmp_path: Path, node: str) -> int:
    total = 0
    for db in (tmp_path / node / "synced").glob("*.db"):
        with closing(sqlite3.connect(db)) as conn:
            total += conn.execute("SELECT count(*) FROM game_nnue_features").fetchone()[0]
    return total


async def test_late_rows_added_while_the_daemon_is_down_reach_the_holders(
        node_factory: Callable[..., NodeContext], transport: MemoryTransport, tmp_path: Path) -> None:
    ctx = node_factory("selfplay-1")
    db = ctx.settings.games_dir / "sp.db"
    done, _ = write_games(db, 4)
    first = AutoSyncDaemon(ctx, transport, retry_initial=0.0)
    await first.sync_once()
    await first.close()  # ringsync stops (or is killed) ...
    before = nnue_rows(tmp_path, "train-1")
    with SelfplayWriter(db, moves_per_game=20, seed=8) as w:
        w.change_later(done[1])  # ... and a feature cache is filled meanwhile
    second = AutoSyncDaemon(ctx, transport, retry_initial=0.0)
    await second.sync_once()
    assert nnue_rows(tmp_path, "train-1") > before
    assert nnue_rows(tmp_path, "train-2") == nnue_rows(tmp_path, "train-1")
    await second.close()


async def test_a_db_replaced_under_the_same_name_does_not_inherit_the_old_cursors(
        node_factory: Callable[..., NodeContext], transport: MemoryTransport, tmp_path: Path) -> None:
    ctx = node_factory("selfplay-1")
    db = ctx.settings.games_dir / "sp.db"
    write_games(db, 2)
    first = AutoSyncDaemon(ctx, transport, retry_initial=0.0)
    await first.sync_once()
    await first.close()
    db.rename(db.with_name("sp.old.db"))  # rotated away; a bigger new DB takes the name
    fresh, _ = write_games(db, 6, seed=9)
    second = AutoSyncDaemon(ctx, transport, retry_initial=0.0)
    await second.sync_once()
    # Saved rowids of the old file would mark the new file's first rows as late changes.
    assert sample(ctx, "ringsync_source_games_changed_total") == 0
    assert set(fresh) <= set(held(tmp_path, "train-1"))
    await second.close()


async def test_game_deleted_after_shipping_is_counted_once(
        node_factory: Callable[..., NodeContext], transport: MemoryTransport) -> None:
    ctx = node_factory("selfplay-1")
    db = ctx.settings.games_dir / "sp.db"
    done, _ = write_games(db, 3)
    daemon = AutoSyncDaemon(ctx, transport, retry_initial=0.0)
    await daemon.sync_once()
    with SelfplayWriter(db, moves_per_game=20) as w:
        w.abort_game(done[0])  # DELETE FROM games, cascading
    for _ in range(3):
        await daemon.sync_once(Trigger.INTERVAL)
    assert sample(ctx, "ringsync_source_games_deleted_total") == 1
    await daemon.close()


def rename_game_id(db: Path, old: str, new: str) -> None:
    with closing(sqlite3.connect(db)) as conn:
        conn.execute(f"ALTER TABLE games RENAME COLUMN {old} TO {new}")
        conn.commit()


async def test_unreadable_source_is_loud_once_and_recovers(
        node_factory: Callable[..., NodeContext], transport: MemoryTransport, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    ctx = node_factory("selfplay-1")
    db = ctx.settings.games_dir / "sp.db"
    first, _ = write_games(db, 3)
    daemon = AutoSyncDaemon(ctx, transport, retry_initial=0.0)
    caplog.set_level(logging.INFO, "ringsync.daemons.auto_sync")
    await daemon.sync_once()
    rename_game_id(db, "game_id", "gid")  # a source ringsync cannot read any more
    for _ in range(3):
        await daemon.sync_once()
    health = daemon.health()
    assert health.state is HealthState.DEGRADED
    assert "source games/sp.db unreadable" in health.detail
    assert sample(ctx, "ringsync_sources_unreadable") == 1
    assert sample(ctx, "ringsync_source_read_errors_total", kind="corrupt") == 3
    assert sum("cannot read source games/sp.db" in r.message for r in caplog.records) == 1
    rename_game_id(db, "gid", "game_id")
    more, _ = write_games(db, 2, seed=5)
    await daemon.sync_once()
    assert daemon.health().state is HealthState.HEALTHY
    assert sample(ctx, "ringsync_sources_unreadable") == 0
    assert sum("readable again" in r.message for r in caplog.records) == 1
    assert sorted(held(tmp_path, "train-1")) == sorted(first + more)
    await daemon.close()


async def test_a_view_made_stale_by_lost_locks_heals_and_loses_nothing(
        node_factory: Callable[..., NodeContext], transport: MemoryTransport, tmp_path: Path) -> None:
    """The issue's failure: our locks dropped, a per-op writer deletes the WAL under us."""
    ctx = node_factory("selfplay-1")
    db = ctx.settings.games_dir / "sp.db"
    write_in_other_process(db, 3, seed=1)
    daemon = AutoSyncDaemon(ctx, transport, retry_initial=0.0)
    await daemon.sync_once()
    touch_file_like_a_header_check(db)  # what the old discovery did
    write_in_other_process(db, 3, seed=2)  # its last close checkpoints and deletes the WAL
    await daemon.sync_once(Trigger.EVENT)
    assert len(set(held(tmp_path, "train-1"))) == len(held(tmp_path, "train-1")) == 6
    assert sample(ctx, "ringsync_source_lost_locks_total") == 1
    await daemon.close()


def test_active_game_timeout_comes_from_the_environment(tmp_path: Path) -> None:
    from ringsync.errors import ConfigError
    from ringsync.settings import load_settings
    env = {"RINGRIFT_NODE_ID": "n1", "RINGRIFT_DATA_DIR": str(tmp_path / "d"),
           "RINGRIFT_ACTIVE_GAME_TIMEOUT": "90"}
    assert load_settings(env, cwd=tmp_path).active_game_timeout == 90.0
    with pytest.raises(ConfigError, match="RINGRIFT_ACTIVE_GAME_TIMEOUT = '-1'"):
        load_settings({**env, "RINGRIFT_ACTIVE_GAME_TIMEOUT": "-1"}, cwd=tmp_path)


async def test_a_source_failing_at_extract_time_is_loud_and_its_games_stay_queued(
        node_factory: Callable[..., NodeContext], transport: MemoryTransport, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = node_factory("selfplay-1")
    done, _ = write_games(ctx.settings.games_dir / "sp.db", 3)

    def unreadable(self: GameSource, *args: object, **kwargs: object) -> None:
        raise CorruptDataError(f"{self.path}: cannot read game DB: disk I/O error")

    monkeypatch.setattr(GameSource, "extract", unreadable)
    daemon = AutoSyncDaemon(ctx, transport, retry_initial=0.0)
    for _ in range(2):
        await daemon.sync_once(Trigger.EVENT)
    assert daemon.health().state is HealthState.DEGRADED
    assert sample(ctx, "ringsync_sources_unreadable") == 1
    assert sum("cannot read source games/sp.db" in r.message for r in caplog.records) == 1
    assert ctx.manifest.outbox_size("train-1") == 3
    monkeypatch.undo()
    await daemon.sync_once()
    assert daemon.health().state is HealthState.HEALTHY
    assert sorted(held(tmp_path, "train-1")) == sorted(done)
    await daemon.close()


def test_a_game_that_reuses_the_rowid_of_an_aborted_one_is_found(tmp_path: Path) -> None:
    """SQLite gives the rowid of a deleted newest row to the next insert."""
    db = tmp_path / "sp.db"
    with SelfplayWriter(db, moves_per_game=20, seed=1, mode="incremental") as w:
        first = w.write_game()
        source = GameSource(db)
        try:
            assert ids(source.scan_all().completed) == [first]
            doomed = w.start_game()
            w.add_moves(doomed, 3)
            assert source.scan_all().completed == []  # seen in progress
            w.abort_game(doomed)
            assert source.scan_all().completed == []  # seen gone
            reused = w.write_game()
            assert ids(source.scan_all().completed) == [reused]
        finally:
            source.close()
