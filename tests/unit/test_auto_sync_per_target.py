"""Per-target delivery: a stalled target holds only its own games; discovery and the
other targets go on; after the stall every game arrives exactly once at both."""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, closing
from pathlib import Path

import pytest

from ringsync.daemons.auto_sync import AutoSyncDaemon
from ringsync.daemons.auto_sync._batches import BatchBuilder, LateChanges, Prepared
from ringsync.daemons.auto_sync.triggers import Trigger
from ringsync.inventory import Host
from ringsync.node import NodeContext, circuit_breakers
from ringsync.policy.breaker import BreakerConfig, BreakerState
from ringsync.protocol.results import MergeResult
from ringsync.selfplay_sim import SelfplayWriter
from ringsync.store.receiver import GameReceiver
from ringsync.transport.memory import MemoryTransport
from tests.conftest import write_games
from tests.unit.test_auto_sync import held

pytestmark = pytest.mark.timeout(60)


class StallingTransport(MemoryTransport):
    """The in-memory transport, where a push to a peer in ``stalled`` hangs until ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.stalled: set[str] = set()
        self.stuck = asyncio.Event()  # a push is hanging
        self.tried: Counter[str] = Counter()  # requests per peer (pushes, data dir probes)
        self.attempted = asyncio.Event()  # set at every attempt
        self._gate = asyncio.Event()

    def release(self) -> None:
        self.stalled.clear()
        self._gate.set()

    async def push_games(self, peer: Host, payload: bytes, digest: str, *,
                         data_dir_id: str | None = None) -> MergeResult:
        self.tried[peer.name] += 1
        self.attempted.set()
        if peer.name in self.stalled:
            self.stuck.set()
            await self._gate.wait()
        return await super().push_games(peer, payload, digest, data_dir_id=data_dir_id)

    async def peer_data_dir_id(self, peer: Host) -> str:
        self.tried[peer.name] += 1
        self.attempted.set()
        return await super().peer_data_dir_id(peer)


@pytest.fixture
async def transport(tmp_path: Path) -> AsyncIterator[StallingTransport]:
    t = StallingTransport()
    t.receivers.update({n: GameReceiver(tmp_path / n / "synced") for n in ("train-1", "train-2")})
    yield t
    t.release()
    for r in t.receivers.values():
        r.close()


@asynccontextmanager
async def running(daemon: AutoSyncDaemon) -> AsyncIterator[None]:
    ready = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(daemon.run(ready.set))
        await ready.wait()
        try:
            yield
        finally:
            await daemon.drain()
            task.cancel()


async def until(done: Callable[[], bool], progress: asyncio.Event, seconds: float) -> float:
    """Seconds until ``done()``, checked whenever ``progress`` fires (TimeoutError past ``seconds``)."""
    started = time.monotonic()
    async with asyncio.timeout(seconds):
        while True:
            progress.clear()  # before the check, so no wake-up is lost
            if done():
                return time.monotonic() - started
            await progress.wait()


async def arrive(transport: MemoryTransport, tmp_path: Path, node: str, games: list[str],
                 seconds: float) -> float:
    """Seconds until ``node`` holds every one of ``games``."""
    return await until(lambda: set(games) <= set(held(tmp_path, node)), transport.delivered, seconds)


async def test_a_stalled_target_holds_only_its_own_games(
        node_factory: Callable[..., NodeContext], transport: StallingTransport,
        tmp_path: Path) -> None:
    ctx = node_factory("selfplay-1", sync_interval=3600.0)  # only commits (inotify) wake it
    db = ctx.settings.games_dir / "sp.db"
    first, _ = write_games(db, 5)
    transport.stalled.add("train-2")
    daemon = AutoSyncDaemon(ctx, transport, retry_initial=0.0)
    async with running(daemon):
        await arrive(transport, tmp_path, "train-1", first, 10)
        await asyncio.wait_for(transport.stuck.wait(), 10)  # train-2's first push hangs
        later: list[str] = []
        for seed in range(3):  # fresh games keep reaching train-1 with normal latency
            fresh, _ = await asyncio.to_thread(write_games, db, 4, seed=20 + seed)
            assert await arrive(transport, tmp_path, "train-1", fresh, 3.0) < 3.0
            later += fresh
        assert held(tmp_path, "train-2") == []
        assert ctx.manifest.outbox_size("train-2") == len(first + later)
        transport.release()  # the stall ends: train-2 catches up
        await arrive(transport, tmp_path, "train-2", first + later, 10)
    for node in ("train-1", "train-2"):  # drained: every push in flight was acknowledged
        got = held(tmp_path, node)
        assert sorted(got) == sorted(first + later)  # each game exactly once
        assert ctx.manifest.outbox_size(node) == 0
        assert not ctx.metrics.games_already_present.labels(peer=node)._value.get()
    passes = ctx.metrics.registry.get_sample_value(
        "ringsync_delivery_pass_duration_seconds_count", {"peer": "train-1"})
    assert passes is not None
    assert passes >= 4  # one pass per commit at least


async def test_sync_once_is_still_a_full_pass_that_waits_for_every_target(
        node_factory: Callable[..., NodeContext], transport: StallingTransport,
        tmp_path: Path) -> None:
    ctx = node_factory("selfplay-1")
    done, _ = write_games(ctx.settings.games_dir / "sp.db", 6)
    transport.stalled.add("train-2")
    daemon = AutoSyncDaemon(ctx, transport, retry_initial=0.0)
    once = asyncio.create_task(daemon.sync_once())
    await asyncio.wait_for(transport.stuck.wait(), 10)
    await asyncio.sleep(0.2)
    assert not once.done()  # it waits for the stalled target too
    assert sorted(held(tmp_path, "train-1")) == sorted(done)
    transport.release()
    await asyncio.wait_for(once, 10)
    assert sorted(held(tmp_path, "train-2")) == sorted(done)
    assert ctx.metrics.sync_cycles.labels(trigger=Trigger.MANUAL)._value.get() == 1
    await daemon.drain()
    await daemon.close()


def nnue_rows(tmp_path: Path, node: str, game_id: str) -> int:
    total = 0
    for db in (tmp_path / node / "synced").glob("*.db"):
        with closing(sqlite3.connect(db)) as conn:
            total += conn.execute("SELECT count(*) FROM game_nnue_features WHERE game_id = ?",
                                  (game_id,)).fetchone()[0]
    return total


async def test_rows_added_while_a_batch_is_in_flight_reach_that_target_too(
        node_factory: Callable[..., NodeContext], transport: StallingTransport,
        tmp_path: Path) -> None:
    """The batch to train-2 was read before the game gained rows and is acknowledged after
    discovery queued the game again for its holders (train-1 only, then): train-2 must be
    sent the game again, or it would keep the old rows for good."""
    ctx = node_factory("selfplay-1", sync_interval=3600.0)
    db = ctx.settings.games_dir / "sp.db"
    (game,), _ = write_games(db, 1)
    transport.stalled.add("train-2")
    daemon = AutoSyncDaemon(ctx, transport, retry_initial=0.0)
    async with running(daemon):
        await arrive(transport, tmp_path, "train-1", [game], 10)
        await asyncio.wait_for(transport.stuck.wait(), 10)
        with SelfplayWriter(db, moves_per_game=20, seed=8) as w:
            await asyncio.to_thread(w.change_later, game)
        # train-1 holds it: it is sent the new rows.
        await until(lambda: nnue_rows(tmp_path, "train-1", game) > 0, transport.delivered, 10)
        transport.release()  # train-2 acknowledges the old copy, then gets the new rows
        await until(lambda: nnue_rows(tmp_path, "train-2", game) == nnue_rows(tmp_path, "train-1", game),
                    transport.delivered, 10)
    assert held(tmp_path, "train-2") == [game]
    assert ctx.manifest.outbox_size("train-2") == 0


def test_late_changes_name_the_games_changed_after_a_batch_was_read() -> None:
    changes = LateChanges(keep=3)
    read = changes.epoch
    changes.note(["a"])
    assert changes.since(read, ["a", "b"]) == ["a"]
    assert changes.since(changes.epoch, ["a", "b"]) == []  # read after the change
    later = changes.epoch
    changes.note(["b", "c", "d"])  # "a" is forgotten now
    assert changes.since(later, ["a", "b", "x"]) == ["b"]
    assert changes.since(read, ["a", "x"]) == ["a", "x"]  # older than what is remembered: all


async def test_a_dead_target_comes_back_on_its_own_timer(
        node_factory: Callable[..., NodeContext], transport: StallingTransport,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No commit and no interval wakes the daemon after train-2 heals: only its own retry
    and breaker timers bring its backlog over."""
    ctx = node_factory("selfplay-1", sync_interval=3600.0)
    db = ctx.settings.games_dir / "sp.db"
    transport.down.add("train-2")
    breaker = BreakerConfig(failure_threshold=2, recovery_s=0.3, recovery_max_s=1.0, jitter=0.0)
    caplog.set_level(logging.INFO, logger="ringsync.node")
    ctx.breakers = circuit_breakers(ctx.metrics, breaker)
    daemon = AutoSyncDaemon(ctx, transport, retry_initial=0.05)
    async with running(daemon):
        done, _ = await asyncio.to_thread(write_games, db, 6)
        await arrive(transport, tmp_path, "train-1", done, 10)
        # The second attempt fails whatever happens next (the check follows the count at once):
        # two failures open the breaker.
        await until(lambda: transport.tried["train-2"] >= 2, transport.attempted, 10)
        assert held(tmp_path, "train-2") == []
        transport.down.clear()
        await arrive(transport, tmp_path, "train-2", done, 10)
    assert sorted(held(tmp_path, "train-2")) == sorted(done)
    assert ctx.manifest.outbox_size("train-2") == 0
    assert ctx.breakers.get("train-2", "memory").state is BreakerState.CLOSED
    changes = [re.sub(r" for \d+s", "", r.getMessage().split(": ", 1)[1].split(" (")[0])
               for r in caplog.records if "circuit to train-2" in r.getMessage()]
    assert changes == ["closed -> open", "open -> half_open", "half_open -> closed"]


async def test_targets_woken_together_share_each_encoded_batch(
        node_factory: Callable[..., NodeContext], transport: StallingTransport,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = node_factory("selfplay-1", sync_interval=3600.0, batch_games=5)
    done, _ = write_games(ctx.settings.games_dir / "sp.db", 40)
    extracted: list[int] = []
    original = BatchBuilder._extract

    def counting(self: BatchBuilder, source: str, ids: Sequence[str]) -> Prepared:
        extracted.append(len(ids))
        return original(self, source, ids)

    monkeypatch.setattr(BatchBuilder, "_extract", counting)
    daemon = AutoSyncDaemon(ctx, transport, retry_initial=0.0)
    async with running(daemon):
        for node in ("train-1", "train-2"):
            await arrive(transport, tmp_path, node, done, 10)
    assert sum(extracted) == len(done)  # each game read and encoded once for both targets
    assert transport.pushes == 2 * len(extracted)


async def test_a_large_first_scan_goes_on_at_the_pace_of_the_deliveries(
        node_factory: Callable[..., NodeContext], transport: StallingTransport,
        tmp_path: Path) -> None:
    ctx = node_factory("selfplay-1", sync_interval=3600.0, scan_chunk_rows=10)
    done, _ = write_games(ctx.settings.games_dir / "sp.db", 70)
    transport.stalled.add("train-2")  # one stalled target does not hold the scan either
    daemon = AutoSyncDaemon(ctx, transport, retry_initial=0.0)
    async with running(daemon):
        await arrive(transport, tmp_path, "train-1", done, 10)
        transport.release()
        await arrive(transport, tmp_path, "train-2", done, 10)
    assert ctx.metrics.sync_cycles.labels(trigger=Trigger.BACKLOG)._value.get() >= 2
    for node in ("train-1", "train-2"):
        assert sorted(held(tmp_path, node)) == sorted(done)


async def test_a_target_the_router_drops_and_brings_back_is_owed_what_it_missed(
        node_factory: Callable[..., NodeContext], transport: StallingTransport,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = node_factory("selfplay-1", sync_interval=3600.0)
    db = ctx.settings.games_dir / "sp.db"
    routed = ctx.router.game_targets
    daemon = AutoSyncDaemon(ctx, transport, retry_initial=0.0)
    async with running(daemon):
        first, _ = await asyncio.to_thread(write_games, db, 3)
        for node in ("train-1", "train-2"):
            await arrive(transport, tmp_path, node, first, 10)
        monkeypatch.setattr(ctx.router, "game_targets",
                            lambda: [h for h in routed() if h.name != "train-2"])
        gone, _ = await asyncio.to_thread(write_games, db, 3, seed=4)
        await arrive(transport, tmp_path, "train-1", gone, 10)
        assert not set(gone) & set(held(tmp_path, "train-2"))
        monkeypatch.setattr(ctx.router, "game_targets", routed)
        back, _ = await asyncio.to_thread(write_games, db, 2, seed=5)  # the next cycle sees it
        await arrive(transport, tmp_path, "train-2", gone + back, 10)
    for node in ("train-1", "train-2"):
        assert sorted(held(tmp_path, node)) == sorted(first + gone + back)


async def test_a_target_that_owes_nothing_is_not_retried_for_nothing(
        node_factory: Callable[..., NodeContext], transport: StallingTransport,
        tmp_path: Path) -> None:
    """A receiver still starting when the sender starts: the failed first pass is retried
    with the first games, not by the timer alone (which would fail again and double the
    backoff that the first games then wait for)."""
    ctx = node_factory("selfplay-1", sync_interval=3600.0)
    transport.down.add("train-2")
    daemon = AutoSyncDaemon(ctx, transport, retry_initial=0.1)
    async with running(daemon):
        await until(lambda: transport.tried["train-2"] >= 1, transport.attempted, 10)
        await asyncio.sleep(0.5)  # five retry times: none is spent on an empty outbox
        assert transport.tried["train-2"] == 1
        transport.down.clear()
        done, _ = await asyncio.to_thread(write_games, ctx.settings.games_dir / "sp.db", 3)
        assert await arrive(transport, tmp_path, "train-2", done, 10) < 2.0
    assert not ctx.metrics.registry.get_sample_value(
        "ringsync_circuit_state", {"peer": "train-2", "transport": "memory"})


async def test_a_backoff_begun_outside_its_loop_is_retried_on_time(
        node_factory: Callable[..., NodeContext], transport: StallingTransport) -> None:
    """sync_once (the CLI's pass) failed train-2 and set its backoff: the loop's own pass,
    finding it backing off, is told to come back when the backoff ends, not when woken next
    (with a long interval and no new commits, that could be an hour)."""
    ctx = node_factory("selfplay-1", sync_interval=3600.0)
    write_games(ctx.settings.games_dir / "sp.db", 3)
    transport.down.add("train-2")
    daemon = AutoSyncDaemon(ctx, transport, retry_initial=4.0)
    await daemon.sync_once()
    assert ctx.manifest.outbox_size("train-2") == 3
    wait = await daemon._own_pass("train-2")
    assert wait is not None
    assert 0.0 < wait <= 4.0 * 1.25  # its backoff's end (jittered), however it was begun
    assert await daemon._own_pass("train-1") is None  # delivered: nothing to come back for
