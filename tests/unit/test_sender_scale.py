"""Sender at scale (issue 7, A4-A7): saved scan cursors, chunked scans, rowid reuse,
exact change detection, a compact manifest and batches bounded by bytes."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest

from ringsync.daemons.auto_sync import AutoSyncDaemon
from ringsync.daemons.auto_sync._batches import PreparedCache
from ringsync.daemons.auto_sync.triggers import Trigger
from ringsync.node import NodeContext
from ringsync.store.gamedb import GameSource, game_ids
from ringsync.store.gamesource import ScanState
from ringsync.store.manifest import DataManifest, LocalGame
from ringsync.store.receiver import GameReceiver
from ringsync.transport.memory import MemoryTransport
from tests.conftest import write_games
from tests.unit.test_auto_sync import SizeRecorder


@pytest.fixture
def receivers(tmp_path: Path) -> Iterator[dict[str, GameReceiver]]:
    made = {name: GameReceiver(tmp_path / name / "synced") for name in ("train-1", "train-2")}
    yield made
    for r in made.values():
        r.close()


def ids(games: list[object]) -> list[str]:
    return [g.game_id for g in games]  # type: ignore[attr-defined]


def sample(ctx: NodeContext, name: str) -> float:
    return ctx.metrics.registry.get_sample_value(name, {}) or 0.0


# -- the games cursor ------------------------------------------------------------------------


def test_a_resumed_source_reads_only_rows_past_its_saved_cursor(tmp_path: Path) -> None:
    db = tmp_path / "sp.db"
    done, _ = write_games(db, 30, in_progress=2)
    first = GameSource(db)
    try:
        assert ids(first.scan_all().completed) == done
        state = ScanState.from_json(first.state().to_json())
    finally:
        first.close()
    assert state is not None
    more, _ = write_games(db, 3, seed=9)
    resumed = GameSource(db, resume=state)
    try:
        scan = resumed.scan_all()
        assert ids(scan.completed) == more
        assert resumed.last_scan_rows == 3 + 2  # the new rows and the two games in progress
        assert resumed.rows_below_cursor == 0
    finally:
        resumed.close()


def test_a_game_in_progress_at_the_save_is_reported_when_it_completes(tmp_path: Path) -> None:
    db = tmp_path / "sp.db"
    _, (open_id,) = write_games(db, 3, in_progress=1)
    first = GameSource(db)
    try:
        first.scan_all()
        state = first.state()
    finally:
        first.close()
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE games SET game_status='completed', total_moves=20 WHERE game_id=?",
                     (open_id,))
    resumed = GameSource(db, resume=state)
    try:
        assert ids(resumed.scan_all().completed) == [open_id]
    finally:
        resumed.close()


def test_a_scan_in_chunks_finds_every_game_once(tmp_path: Path) -> None:
    db = tmp_path / "sp.db"
    done, _ = write_games(db, 25)
    source = GameSource(db)
    found: list[str] = []
    try:
        while True:
            scan = source.scan_all(max_rows=10)
            found += ids(scan.completed)
            assert source.last_scan_rows <= 10
            if not scan.more:
                break
        assert found == done
        assert source.scan_all(max_rows=10).completed == []
    finally:
        source.close()


def test_a_rowid_handed_out_again_at_the_top_is_found(tmp_path: Path) -> None:
    """The newest game is deleted and the next insert takes its rowid before our next scan:
    the old cursor (max rowid only) never saw that game."""
    db = tmp_path / "sp.db"
    done, _ = write_games(db, 5)
    source = GameSource(db)
    try:
        assert ids(source.scan_all().completed) == done
        with closing(sqlite3.connect(db)) as conn, conn:
            (top,) = conn.execute("SELECT max(rowid) FROM games").fetchone()
            for table in ("game_moves", "game_players", "games"):
                conn.execute(f"DELETE FROM {table} WHERE game_id=?", (done[-1],))
        (again,), _ = write_games(db, 1, seed=7)
        with closing(sqlite3.connect(db)) as conn:
            assert conn.execute("SELECT rowid FROM games WHERE game_id=?", (again,)).fetchone()[0] == top
        scan = source.scan_all()
        assert ids(scan.completed) == [again]
        assert source.rows_below_cursor == 1
    finally:
        source.close()


def test_rows_deleted_in_the_middle_never_make_a_scan_go_back(tmp_path: Path) -> None:
    db = tmp_path / "sp.db"
    done, _ = write_games(db, 6)
    source = GameSource(db)
    try:
        source.scan_all()
        with closing(sqlite3.connect(db)) as conn, conn:
            conn.execute("DELETE FROM games WHERE game_id=?", (done[2],))
        more, _ = write_games(db, 2, seed=3)
        assert ids(source.scan_all().completed) == more
        assert source.rows_below_cursor == 0
    finally:
        source.close()


def test_a_commit_the_stat_cannot_see_is_seen_by_data_version(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "sp.db"
    write_games(db, 2, pattern="long-lived")
    source = GameSource(db)
    try:
        source.scan_all()
        monkeypatch.setattr(GameSource, "_stat", lambda self: ("blind",))
        source._stamp = ("blind",)
        assert not source.changed()
        write_games(db, 1, seed=4, pattern="long-lived")
        assert source.changed()
        source.scan_all()
        assert not source.changed()
    finally:
        source.close()


# -- the daemon across restarts --------------------------------------------------------------


async def test_a_restarted_sender_scans_no_rows_below_its_saved_cursor(
        node_factory: Callable[..., NodeContext], tmp_path: Path,
        receivers: dict[str, GameReceiver]) -> None:
    transport = MemoryTransport()
    transport.receivers.update(receivers)
    if True:
        ctx = node_factory("selfplay-1", scan_chunk_rows=10)
        db = ctx.settings.games_dir / "sp.db"
        done, _ = write_games(db, 40)
        daemon = AutoSyncDaemon(ctx, transport, retry_initial=0.0)  # a "large" first scan
        cycles = 0
        while True:
            await daemon.sync_once(Trigger.STARTUP if cycles == 0 else Trigger.BACKLOG)
            cycles += 1
            if not await daemon._backlog_waiting():
                break
        assert cycles == 3  # chunks of 10, 20 (doubled), then the 10 rows left
        assert sample(ctx, "ringsync_source_rows_scanned_total") == 40
        await daemon.close()
        ctx.close()

        later, _ = write_games(db, 4, seed=11)
        again = node_factory("selfplay-1")
        daemon = AutoSyncDaemon(again, transport, retry_initial=0.0)
        await daemon.sync_once(Trigger.STARTUP)
        assert sample(again, "ringsync_source_rows_scanned_total") == 4  # not 44
        got = [g for d in (tmp_path / "train-1" / "synced").glob("*.db") for g in game_ids(d)]
        assert sorted(got) == sorted(done + later)
        await daemon.close()


async def test_a_replaced_file_is_scanned_from_its_start(
        node_factory: Callable[..., NodeContext], tmp_path: Path,
        receivers: dict[str, GameReceiver]) -> None:
    transport = MemoryTransport()
    transport.receivers.update(receivers)
    if True:
        ctx = node_factory("selfplay-1")
        db = ctx.settings.games_dir / "sp.db"
        write_games(db, 5)
        daemon = AutoSyncDaemon(ctx, transport, retry_initial=0.0)
        await daemon.sync_once(Trigger.STARTUP)
        await daemon.close()
        ctx.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        other, _ = write_games(db, 3, seed=21)  # a new file (new inode), rowids from 1 again
        again = node_factory("selfplay-1")
        daemon = AutoSyncDaemon(again, transport, retry_initial=0.0)
        await daemon.sync_once(Trigger.STARTUP)
        got = {g for d in (tmp_path / "train-1" / "synced").glob("*.db") for g in game_ids(d)}
        assert set(other) <= got
        await daemon.close()


# -- the manifest ----------------------------------------------------------------------------


def test_a_delivered_game_costs_one_small_row(tmp_path: Path) -> None:
    m = DataManifest(tmp_path / "m.db")
    try:
        n = 20_000
        games = [LocalGame(f"{i:08d}-0000-4000-8000-{i:012d}", "games/hex8_2p.db", "hex8_2p")
                 for i in range(n)]
        m.record_discovered(games, ["train-1", "train-2"])
        for target in ("train-1", "train-2"):
            m.ack(target, [g.game_id for g in games])
        m._db.execute("VACUUM")  # the outbox's freed pages (reused in a running manifest)
        m._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = m.path.stat().st_size
    finally:
        m.close()
    assert size / n < 100  # ~57; one row per (target, game) and an index cost ~300


def test_holders_and_notes_survive_compaction_and_many_targets(tmp_path: Path) -> None:
    m = DataManifest(tmp_path / "m.db")
    try:
        targets = [f"t{i:02d}" for i in range(70)]  # past the 63 bits: the rest in overflow
        m.record_discovered([LocalGame("a", "s.db", "k"), LocalGame("b", "s.db", "k")],
                            targets)
        m.ack("t00", ["a"])
        m.ack("t01", ["a"], note="shared")
        m.ack("t01", ["a"])  # the first note stays
        m.ack("t65", ["a", "b"], note="shared")
        m.ack("t66", ["b"], note="refused")
        assert m.holders("a") == ["t00", "t01", "t65"]
        assert m.holders("b") == ["t65", "t66"]
        assert m.held_by("t02", ["t01", "t65"], 10) == ["a", "b"]
        assert m.held_by("t00", ["t66"], 10) == ["b"]
        assert m.requeue(["a"]) == 3
        summary = m.summary()
        assert summary["delivered"] == {"t00": 1, "t01": 1, "t65": 2, "t66": 1}  # type: ignore[index]
        assert summary["shared"] == {"t01": 1, "t65": 2}
        assert m.delivered_from("s.db", 10) == ["a", "b"]
    finally:
        m.close()


def test_a_target_that_returns_is_owed_what_was_found_while_it_was_gone(tmp_path: Path) -> None:
    m = DataManifest(tmp_path / "m.db")
    try:
        assert m.ensure_targets(["t1", "t2"]) == 0
        m.record_discovered([LocalGame("a", "s.db", "k")], ["t1", "t2"])
        m.ensure_targets(["t1"])  # t2 left the routing
        m.record_discovered([LocalGame("b", "s.db", "k")], ["t1"])
        assert m.ensure_targets(["t1"]) == 0  # nothing to do for a complete target
        assert m.ensure_targets(["t1", "t2"]) == 1
        assert ids(m.pending("t2", 10)) == ["a", "b"]  # type: ignore[arg-type]
    finally:
        m.close()


def test_a_manifest_of_one_row_per_delivery_is_converted(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    with closing(sqlite3.connect(path)) as db, db:
        db.executescript("""
            CREATE TABLE games (game_id TEXT PRIMARY KEY, source TEXT NOT NULL,
                config_key TEXT NOT NULL, discovered_at REAL NOT NULL) WITHOUT ROWID;
            CREATE TABLE outbox (target TEXT NOT NULL, game_id TEXT NOT NULL,
                PRIMARY KEY (target, game_id)) WITHOUT ROWID;
            CREATE TABLE deliveries (target TEXT NOT NULL, game_id TEXT NOT NULL,
                delivered_at REAL NOT NULL, note TEXT NOT NULL DEFAULT '',
                PRIMARY KEY (target, game_id)) WITHOUT ROWID;
            INSERT INTO games VALUES ('a', 's.db', 'k', 0), ('b', 'x.jsonl', 'k', 0);
            INSERT INTO deliveries VALUES ('t1', 'a', 0, ''), ('t2', 'a', 0, 'shared');
            INSERT INTO outbox VALUES ('t1', 'b'), ('t2', 'b');
        """)
    m = DataManifest(path)
    try:
        assert m.holders("a") == ["t1", "t2"]
        assert m.summary()["shared"] == {"t2": 1}
        assert [(p.game_id, p.source) for p in m.pending("t1", 10)] == [("b", "x.jsonl")]
        m.record_discovered([LocalGame("b", "db.db", "k")], ["t1"])  # row beats line
        assert [p.source for p in m.pending("t1", 10)] == ["db.db"]
    finally:
        m.close()


# -- memory bounded by bytes -----------------------------------------------------------------


async def test_the_batch_cache_is_bounded_by_bytes() -> None:
    cache = PreparedCache(capacity_bytes=1000)

    async def make(size: int) -> list[tuple[bytes, str, tuple[str, ...]]]:
        return [(b"x" * size, "d", ("g1", "g2"))]

    assert cache.page_size(500, 4000) == 64  # before any batch is seen
    for i in range(5):
        await cache.get(("s", (str(i),)), lambda: make(400))
    assert cache.held <= 1000
    assert len(cache.done) == 2
    assert cache.bytes_per_game == 200
    assert cache.page_size(500, 4000) == 20
    await cache.get(("s", ("big",)), lambda: make(5000))
    assert list(cache.done) == [("s", ("big",))]  # the newest stays, whatever its size


async def test_batches_are_cut_to_the_byte_budget(
        node_factory: Callable[..., NodeContext], receivers: dict[str, GameReceiver]) -> None:
    transport = SizeRecorder()
    transport.receivers.update(receivers)
    ctx = node_factory("selfplay-1", batch_games=500)
    write_games(ctx.settings.games_dir / "sp.db", 120)
    daemon = AutoSyncDaemon(ctx, transport, retry_initial=0.0)
    daemon._batches.batch_bytes = budget = 64 * 1024
    await daemon.sync_once(Trigger.STARTUP)
    assert ctx.manifest.outbox_size("train-1") == 0
    rest = sorted(transport.sizes)[:-2]  # but the first batch (64 games) of each target
    assert len(rest) >= 6  # the count limit alone makes one batch per target
    assert max(rest) < 1.5 * budget  # after the first batch (64 games), sized by bytes
    await daemon.close()


async def test_fresh_games_go_before_a_backlog_in_one_budget_of_rows(
        node_factory: Callable[..., NodeContext], tmp_path: Path,
        receivers: dict[str, GameReceiver]) -> None:
    transport = MemoryTransport()
    transport.receivers.update(receivers)
    ctx = node_factory("selfplay-1", scan_chunk_rows=15)
    backlog, _ = write_games(ctx.settings.games_dir / "big.db", 80)
    daemon = AutoSyncDaemon(ctx, transport, retry_initial=0.0)
    await daemon.sync_once(Trigger.STARTUP)
    assert sample(ctx, "ringsync_source_rows_scanned_total") == 15
    fresh, _ = write_games(ctx.settings.games_dir / "new.db", 2, seed=5)
    await daemon.sync_once(Trigger.BACKLOG)
    got = {g for d in (tmp_path / "train-1" / "synced").glob("*.db") for g in game_ids(d)}
    assert set(fresh) <= got  # not after the 65 rows left of the backlog
    assert sample(ctx, "ringsync_source_rows_scanned_total") == 15 + 2 + 28  # the budget doubled
    assert sample(ctx, "ringsync_source_scan_backlog") == 1
    while await daemon._backlog_waiting():
        await daemon.sync_once(Trigger.BACKLOG)
    got = {g for d in (tmp_path / "train-1" / "synced").glob("*.db") for g in game_ids(d)}
    assert got == set(backlog) | set(fresh)
    await daemon.close()


def test_a_scan_after_new_rows_costs_the_new_rows_not_the_history(tmp_path: Path) -> None:
    """The late-rows check must walk the child tables' new rowids, not their game_id index."""
    db = tmp_path / "sp.db"
    write_games(db, 1500, pattern="long-lived")
    source = GameSource(db)
    try:
        source.scan_all()
        write_games(db, 1, seed=3)
        steps = [0]

        def count() -> int:
            steps[0] += 1
            return 0

        with source._connection() as conn:
            conn.set_progress_handler(count, 1000)
        scan = source.scan_all()
        assert len(scan.completed) == 1
        assert steps[0] < 20  # 0 here; walking the history's move index instead: ~125
    finally:
        source.close()
