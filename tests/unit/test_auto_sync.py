"""AutoSyncDaemon against the in-memory transport: routing, exactly-once, outages, shared storage."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ringsync.daemons.auto_sync import AutoSyncDaemon
from ringsync.daemons.auto_sync.triggers import Trigger
from ringsync.daemons.base import HealthState
from ringsync.errors import BadInputError, TransportError
from ringsync.inventory import Host
from ringsync.node import NodeContext
from ringsync.protocol.batch import decode_batch
from ringsync.protocol.results import MergeResult
from ringsync.selfplay_sim import SelfplayWriter
from ringsync.store.gamedb import game_ids
from ringsync.store.receiver import GameReceiver
from ringsync.transport.memory import MemoryTransport
from tests.conftest import write_games


@pytest.fixture
def receivers(tmp_path: Path) -> Iterator[dict[str, GameReceiver]]:
    made = {name: GameReceiver(tmp_path / name / "synced") for name in ("train-1", "train-2")}
    made["coordinator"] = GameReceiver(tmp_path / "coordinator" / "synced", refuse_reason="coordinator")
    yield made
    for r in made.values():
        r.close()


@pytest.fixture
def transport(receivers: dict[str, GameReceiver]) -> MemoryTransport:
    t = MemoryTransport()
    t.receivers.update(receivers)
    return t


def held(tmp_path: Path, node: str) -> list[str]:
    out: list[str] = []
    for db in sorted((tmp_path / node / "synced").glob("*.db")):
        out.extend(game_ids(db))
    return out


def daemon_for(ctx: NodeContext, transport: MemoryTransport) -> AutoSyncDaemon:
    return AutoSyncDaemon(ctx, transport, retry_initial=0.0)


async def run_daemon_until(daemon: AutoSyncDaemon, done: Callable[[], bool],
                           progress: asyncio.Event | None = None) -> None:
    """Run the daemon until ``done()``, re-checking when ``progress`` fires (or every 10 ms)."""
    ready = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(daemon.run(ready.set))
        await ready.wait()
        async with asyncio.timeout(10):
            while True:
                if progress is not None:
                    progress.clear()  # before the check, so no wake-up is lost
                if done():
                    break
                await (asyncio.sleep(0.01) if progress is None else progress.wait())
        await daemon.drain()
        task.cancel()


async def test_completed_games_reach_both_trainers_once(
    node_factory: Callable[..., NodeContext], transport: MemoryTransport, tmp_path: Path
) -> None:
    ctx = node_factory("selfplay-1")
    done, open_ = write_games(ctx.settings.games_dir / "sp.db", 30, in_progress=3)
    daemon = daemon_for(ctx, transport)
    await daemon.sync_once()
    await daemon.sync_once()
    for node in ("train-1", "train-2"):
        got = held(tmp_path, node)
        assert sorted(got) == sorted(done)
        assert not set(open_) & set(got)
    assert held(tmp_path, "coordinator") == []
    await daemon.drain()


async def test_outage_keeps_the_backlog_and_delivers_after_recovery(
    node_factory: Callable[..., NodeContext], transport: MemoryTransport, tmp_path: Path
) -> None:
    ctx = node_factory("selfplay-1")
    done, _ = write_games(ctx.settings.games_dir / "sp.db", 12)
    transport.down.add("train-2")
    daemon = daemon_for(ctx, transport)
    await daemon.sync_once()
    assert sorted(held(tmp_path, "train-1")) == sorted(done)
    assert held(tmp_path, "train-2") == []
    assert daemon.health().state is HealthState.DEGRADED
    assert ctx.manifest.outbox_size("train-2") == 12
    transport.down.clear()
    await daemon.sync_once()
    assert sorted(held(tmp_path, "train-2")) == sorted(done)
    assert daemon.health().state is HealthState.HEALTHY
    assert ctx.manifest.outbox_size("train-2") == 0


async def test_game_completed_later_is_shipped_once_after_completion(
    node_factory: Callable[..., NodeContext], transport: MemoryTransport, tmp_path: Path
) -> None:
    from ringsync.selfplay_sim import SelfplayWriter

    ctx = node_factory("selfplay-1")
    db = ctx.settings.games_dir / "sp.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    daemon = daemon_for(ctx, transport)
    with SelfplayWriter(db, seed=3, moves_per_game=10) as writer:
        game = writer.start_game()
        writer.add_moves(game, 5)
        await daemon.sync_once()
        assert held(tmp_path, "train-1") == []
        writer.add_moves(game, 5)
        writer.complete_game(game)
        for _ in range(3):
            await daemon.sync_once()
    assert held(tmp_path, "train-1") == [game]
    assert held(tmp_path, "train-2") == [game]


async def test_restart_resumes_without_resending(
    node_factory: Callable[..., NodeContext], transport: MemoryTransport, tmp_path: Path
) -> None:
    ctx = node_factory("selfplay-1")
    write_games(ctx.settings.games_dir / "sp.db", 10)
    await daemon_for(ctx, transport).sync_once()
    pushes = transport.pushes
    again = daemon_for(ctx, transport)
    await again.sync_once()
    assert transport.pushes == pushes  # nothing owed, nothing sent
    assert len(held(tmp_path, "train-1")) == 10


async def test_received_games_are_not_pushed_on(
    node_factory: Callable[..., NodeContext], transport: MemoryTransport, tmp_path: Path
) -> None:
    ctx = node_factory("train-1")
    write_games(ctx.settings.synced_dir / "hex8_2p.db", 5)  # what a trainer holds after merges
    await daemon_for(ctx, transport).sync_once()
    assert transport.pushes == 0
    assert ctx.manifest.summary()["games"] == 0


async def test_shared_storage_is_decided_per_target(
    node_factory: Callable[..., NodeContext], transport: MemoryTransport, tmp_path: Path
) -> None:
    """train-1 uses our data dir: recorded as held, not sent; train-2 gets every game."""
    ctx = node_factory("selfplay-1")
    done, _ = write_games(ctx.settings.games_dir / "sp.db", 5)
    transport.data_dir_ids.update({"train-1": ctx.shared.own.data_dir_id, "train-2": "b" * 32})
    await daemon_for(ctx, transport).sync_once()
    assert held(tmp_path, "train-1") == []
    assert sorted(held(tmp_path, "train-2")) == sorted(done)
    assert ctx.metrics.shared_storage_skips.labels(peer="train-1")._value.get() == 5
    assert ctx.metrics.shared_storage_skips.labels(peer="train-2")._value.get() == 0
    assert ctx.manifest.summary()["shared"] == {"train-1": 5}
    assert ctx.manifest.holders(done[0]) == ["train-1", "train-2"]  # K copies still counted
    assert ctx.shared.status(0.0)["skipped_games"] == {"train-1": 5}


async def test_an_unknown_marker_never_means_skip(
    node_factory: Callable[..., NodeContext], transport: MemoryTransport, tmp_path: Path
) -> None:
    ctx = node_factory("selfplay-1")
    done, _ = write_games(ctx.settings.games_dir / "sp.db", 4)
    await daemon_for(ctx, transport).sync_once()  # no peer answers a marker
    assert sorted(held(tmp_path, "train-1")) == sorted(done)
    assert sorted(held(tmp_path, "train-2")) == sorted(done)


async def test_a_receiver_with_our_marker_refuses_the_copy_and_we_learn_from_it(
    node_factory: Callable[..., NodeContext], transport: MemoryTransport, tmp_path: Path
) -> None:
    ctx = node_factory("selfplay-1")
    _done, _ = write_games(ctx.settings.games_dir / "sp.db", 3)
    transport.data_dir_ids["train-1"] = ctx.shared.own.data_dir_id
    original = transport.peer_data_dir_id

    async def failing_probe(peer: Host) -> str:
        raise TransportError(peer.name, "status endpoint unreachable")

    transport.peer_data_dir_id = failing_probe  # type: ignore[method-assign]
    daemon = daemon_for(ctx, transport)
    await daemon.sync_once()
    assert held(tmp_path, "train-1") == []  # answered "shared storage" to the push
    assert ctx.manifest.summary()["shared"] == {"train-1": 3}
    assert ctx.shared.status(time.monotonic())["sharing_targets"] == ["train-1"]
    transport.peer_data_dir_id = original  # type: ignore[method-assign]
    write_games(ctx.settings.games_dir / "sp.db", 2, seed=9)
    pushes = transport.pushes
    await daemon.sync_once()
    assert transport.pushes - pushes == 1  # only train-2 is sent the new games
    assert ctx.manifest.summary()["shared"] == {"train-1": 5}


async def test_skip_turned_off_sends_to_a_sharing_target_too(
    node_factory: Callable[..., NodeContext], transport: MemoryTransport, tmp_path: Path
) -> None:
    ctx = node_factory("selfplay-1", skip_nfs_sync=False)
    done, _ = write_games(ctx.settings.games_dir / "sp.db", 4)
    transport.data_dir_ids["train-1"] = ctx.shared.own.data_dir_id
    await daemon_for(ctx, transport).sync_once()
    assert sorted(held(tmp_path, "train-1")) == sorted(done)
    assert transport.probes == 0


async def test_a_node_whose_every_target_shares_warns_once(
    node_factory: Callable[..., NodeContext], transport: MemoryTransport,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ctx = node_factory("selfplay-1")
    write_games(ctx.settings.games_dir / "sp.db", 2)
    transport.data_dir_ids.update({n: ctx.shared.own.data_dir_id for n in ("train-1", "train-2")})
    daemon = daemon_for(ctx, transport)
    await daemon.sync_once()
    await daemon.sync_once(Trigger.INTERVAL)
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "every target" in r.message]
    assert len(warnings) == 1
    assert transport.pushes == 0


async def test_wakes_on_a_commit_without_waiting_for_the_interval(
    node_factory: Callable[..., NodeContext], transport: MemoryTransport, tmp_path: Path
) -> None:
    ctx = node_factory("selfplay-1", sync_interval=3600.0)
    db = ctx.settings.games_dir / "sp.db"
    write_games(db, 1)
    daemon = daemon_for(ctx, transport)
    ready = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(daemon.run(ready.set))
        await ready.wait()
        done, _ = await asyncio.to_thread(write_games, db, 3, seed=7)
        async with asyncio.timeout(10):  # the interval is an hour: only inotify can wake it
            while len(held(tmp_path, "train-1")) < 4:
                transport.delivered.clear()
                await transport.delivered.wait()
        await daemon.drain()
        task.cancel()
    assert set(done) <= set(held(tmp_path, "train-1"))


async def test_database_created_empty_then_filled_is_found_on_the_next_event(
    node_factory: Callable[..., NodeContext], transport: MemoryTransport, tmp_path: Path
) -> None:
    ctx = node_factory("selfplay-1", sync_interval=3600.0)
    daemon = daemon_for(ctx, transport)
    db = ctx.settings.games_dir / "late.db"
    sqlite3.connect(db).close()  # the generator creates the file before its schema
    daemon._on_fs_event(db)
    await daemon.sync_once(Trigger.EVENT)
    assert ctx.manifest.summary()["games"] == 0
    done, _ = write_games(db, 3)  # later commits are plain modifications of the file
    daemon._on_fs_event(db.with_name("late.db-wal"))
    await daemon.sync_once(Trigger.EVENT)
    assert sorted(held(tmp_path, "train-1")) == sorted(done)


async def test_one_cycle_delivers_a_backlog_many_batches_long(
    node_factory: Callable[..., NodeContext], transport: MemoryTransport, tmp_path: Path
) -> None:
    ctx = node_factory("selfplay-1", batch_games=5)
    done, _ = write_games(ctx.settings.games_dir / "sp.db", 53)
    await daemon_for(ctx, transport).sync_once()
    for node in ("train-1", "train-2"):
        assert sorted(held(tmp_path, node)) == sorted(done)
    assert ctx.manifest.summary()["pending"] == {}


async def test_rotated_source_db_loses_no_owed_game(
    node_factory: Callable[..., NodeContext], transport: MemoryTransport, tmp_path: Path
) -> None:
    ctx = node_factory("selfplay-1")
    games = ctx.settings.games_dir
    old, _ = write_games(games / "selfplay.db", 10)
    transport.down.update({"train-1", "train-2"})
    daemon = daemon_for(ctx, transport)
    await daemon.sync_once()  # discovered and owed, not delivered
    (games / "archive").mkdir()
    (games / "selfplay.db").rename(games / "archive" / "selfplay-1.db")  # the generator rotates
    new, _ = write_games(games / "selfplay.db", 3, seed=9)
    transport.down.clear()
    await daemon.sync_once(Trigger.INTERVAL)
    await daemon.sync_once(Trigger.INTERVAL)
    for node in ("train-1", "train-2"):
        assert sorted(held(tmp_path, node)) == sorted(old + new)
    assert ctx.manifest.summary()["pending"] == {}
    await daemon.close()


async def test_unreadable_owed_games_stay_queued_without_spinning(
    node_factory: Callable[..., NodeContext], transport: MemoryTransport, tmp_path: Path
) -> None:
    ctx = node_factory("selfplay-1")
    db = ctx.settings.games_dir / "selfplay.db"
    done, _ = write_games(db, 4)
    transport.down.update({"train-1", "train-2"})
    daemon = daemon_for(ctx, transport)
    await daemon.sync_once()
    db.rename(db.with_name("parked.bin"))  # gone from games/ as a database for now
    transport.down.clear()
    await daemon.sync_once(Trigger.INTERVAL)
    assert ctx.manifest.outbox_size("train-1") == 4  # kept, not dropped
    assert not await daemon._backlog_waiting()  # and no hot loop while they cannot be read
    db.with_name("parked.bin").rename(db)
    await daemon.sync_once(Trigger.INTERVAL)
    assert sorted(held(tmp_path, "train-1")) == sorted(done)
    await daemon.close()


class SizeRecorder(MemoryTransport):
    """Records the size of every pushed payload."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    async def push_games(self, peer: Host, payload: bytes, digest: str, *,
                         data_dir_id: str | None = None) -> MergeResult:
        self.sizes.append(len(payload))
        return await super().push_games(peer, payload, digest, data_dir_id=data_dir_id)


async def test_batches_over_the_byte_limit_are_split_not_refused_forever(
    node_factory: Callable[..., NodeContext], receivers: dict[str, GameReceiver], tmp_path: Path
) -> None:
    limit = 256 * 1024
    ctx = node_factory("selfplay-1", max_batch_bytes=limit)
    db = ctx.settings.games_dir / "sp.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    with SelfplayWriter(db, seed=4, moves_per_game=80) as writer:  # ~26 KB per game
        done = [writer.write_game() for _ in range(40)]
    transport = SizeRecorder()
    transport.receivers.update(receivers)
    await daemon_for(ctx, transport).sync_once()
    assert sorted(held(tmp_path, "train-1")) == sorted(done)
    assert len(transport.sizes) > 2
    assert max(transport.sizes) <= limit


class _PoisonReceiver(GameReceiver):
    """Refuses any batch holding one particular game, as a receiver would a bad batch."""

    def __init__(self, synced: Path, poison: str) -> None:
        super().__init__(synced)
        self.poison = poison

    def receive(self, payload: bytes, digest: str) -> MergeResult:
        if self.poison in decode_batch(payload).game_ids:
            raise BadInputError("this batch is refused")
        return super().receive(payload, digest)


async def test_a_refused_batch_stays_queued_and_does_not_block_the_rest(
    node_factory: Callable[..., NodeContext], transport: MemoryTransport, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ctx = node_factory("selfplay-1", batch_games=1)
    done, _ = write_games(ctx.settings.games_dir / "sp.db", 8)
    poison = sorted(done)[0]  # first in outbox order: it used to block everything behind it
    transport.receivers["train-1"].close()
    transport.receivers["train-1"] = _PoisonReceiver(tmp_path / "train-1" / "synced", poison)
    daemon = daemon_for(ctx, transport)
    await daemon.sync_once()
    await daemon.sync_once()
    assert sorted(held(tmp_path, "train-1")) == sorted(set(done) - {poison})
    assert [p.game_id for p in ctx.manifest.pending("train-1", 10)] == [poison]
    assert sorted(held(tmp_path, "train-2")) == sorted(done)
    assert daemon.health().state is HealthState.DEGRADED
    assert sum("rejected a batch" in r.message for r in caplog.records) == 1  # a transition, not spam


async def test_two_targets_on_one_data_dir_get_each_game_once_between_them(
    node_factory: Callable[..., NodeContext], transport: MemoryTransport, tmp_path: Path
) -> None:
    """train-1 and train-2 use one data dir (not ours): one copy there, held by both."""
    ctx = node_factory("selfplay-1")
    done, _ = write_games(ctx.settings.games_dir / "sp.db", 5)
    transport.data_dir_ids.update({"train-1": "c" * 32, "train-2": "c" * 32})
    daemon = daemon_for(ctx, transport)
    await daemon.sync_once()
    await daemon.sync_once()  # train-2 counts what train-1 acknowledged during the first
    assert sorted(held(tmp_path, "train-1")) == sorted(done)
    assert held(tmp_path, "train-2") == []
    assert ctx.manifest.outbox_size("train-2") == 0
    assert ctx.manifest.holders(done[0]) == ["train-1", "train-2"]
    assert ctx.metrics.shared_storage_skips.labels(peer="train-2")._value.get() == 5
    # train-1 goes away: train-2 is sent the new games; back, train-1 counts them as held.
    transport.down.add("train-1")
    more, _ = write_games(ctx.settings.games_dir / "sp2.db", 3, seed=7)
    await daemon.sync_once()
    await daemon.sync_once()
    assert set(more) <= set(held(tmp_path, "train-2"))
    transport.down.discard("train-1")
    await daemon.sync_once()
    await daemon.sync_once()
    assert not set(more) & set(held(tmp_path, "train-1"))
    assert ctx.manifest.outbox_size("train-1") == 0
    assert sorted(held(tmp_path, "train-1") + held(tmp_path, "train-2")) == sorted(done + more)


async def test_a_commit_the_stat_check_misses_is_found_through_its_file_event(
    node_factory: Callable[..., NodeContext], transport: MemoryTransport, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reset WAL rewritten within one mtime tick keeps its stat; the inotify event still counts."""
    ctx = node_factory("selfplay-1")
    db = ctx.settings.games_dir / "sp.db"
    first, _ = write_games(db, 2)
    daemon = daemon_for(ctx, transport)
    await daemon.sync_once()
    from ringsync.store.gamesource import GameSource
    monkeypatch.setattr(GameSource, "changed", lambda self: False)
    more, _ = write_games(db, 3, seed=5)
    await daemon.sync_once(Trigger.EVENT)  # no file event: the (blinded) stat check decides
    assert set(more).isdisjoint(held(tmp_path, "train-1"))
    daemon._on_fs_event(db)  # what the watcher reports for a write to sp.db-wal
    await daemon.sync_once(Trigger.EVENT)
    assert sorted(held(tmp_path, "train-1")) == sorted(first + more)
    await daemon.close()


async def test_games_the_targets_triggers_refuse_are_settled_not_retried_forever(
    node_factory: Callable[..., NodeContext], transport: MemoryTransport, tmp_path: Path
) -> None:
    """A migrated source (no insert trigger) holds a completed game with 3 move rows; the
    receivers' v18 DBs refuse it. The batch it rides in must still be acknowledged."""
    ctx = node_factory("selfplay-1")
    db = ctx.settings.games_dir / "sp.db"
    done, _ = write_games(db, 4, fresh_schema=False)
    with sqlite3.connect(db) as conn:  # a legacy 'finished' row with too few moves
        conn.execute("INSERT INTO games (game_id, board_type, num_players, created_at, "
                     "game_status, total_moves, total_turns, schema_version) "
                     "VALUES ('short', 'hex8', 2, '2026-01-01', 'finished', 3, 2, 18)")
        conn.executemany("INSERT INTO game_moves (game_id, move_number, turn_number, player, "
                         "phase, move_type, move_json) VALUES ('short', ?, 0, 1, 'm', 't', '{}')",
                         [(i,) for i in range(3)])
    conn.close()
    more, _ = write_games(db, 2, seed=3, fresh_schema=False)
    daemon = daemon_for(ctx, transport)
    await daemon.sync_once()
    for peer in ("train-1", "train-2"):
        assert sorted(held(tmp_path, peer)) == sorted(done + more)
        assert ctx.manifest.outbox_size(peer) == 0
        assert ctx.metrics.games_refused_by_peer.labels(peer=peer)._value.get() == 1
    assert daemon.health().state is not HealthState.DEGRADED  # no peer is failing
    await daemon.sync_once()
    assert ctx.metrics.games_refused_by_peer.labels(peer="train-1")._value.get() == 1


async def test_any_failure_of_one_source_is_that_source_s_problem(
    node_factory: Callable[..., NodeContext], transport: MemoryTransport, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unexpected error in one source is counted and logged; the others still ship."""
    from ringsync.store.gamesource import GameSource
    ctx = node_factory("selfplay-1")
    good, _ = write_games(ctx.settings.games_dir / "good.db", 3)
    write_games(ctx.settings.games_dir / "bad.db", 2, seed=4)
    original = GameSource.scan_all

    def scan_all(self: GameSource, max_rows: int | None = None) -> object:
        if self.path.name == "bad.db":
            raise RecursionError("maximum recursion depth exceeded")
        return original(self, max_rows)

    monkeypatch.setattr(GameSource, "scan_all", scan_all)
    daemon = daemon_for(ctx, transport)
    await daemon.sync_once()
    await daemon.sync_once()
    assert sorted(held(tmp_path, "train-1")) == sorted(good)
    assert ctx.metrics.source_read_errors.labels(kind="RecursionError")._value.get() == 2
    assert ctx.metrics.sources_unreadable._value.get() == 1
    await daemon.close()
