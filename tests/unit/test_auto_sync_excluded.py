"""auto_sync.exclude_hosts and auto_sync.enabled: false stop a node's own pushes, visibly."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from ringsync.daemons.auto_sync import AutoSyncDaemon
from ringsync.daemons.base import HealthState
from ringsync.inventory import AutoSyncSection
from ringsync.node import NodeContext
from ringsync.store.receiver import GameReceiver
from ringsync.transport.memory import MemoryTransport
from tests.conftest import make_inventory, write_games
from tests.unit.test_auto_sync import run_daemon_until


@pytest.mark.parametrize("section", [
    AutoSyncSection(exclude_hosts=frozenset({"selfplay-1"})),
    AutoSyncSection(enabled=False),
])
async def test_excluded_node_pushes_nothing_and_says_why(
    node_factory: Callable[..., NodeContext], tmp_path: Path, section: AutoSyncSection
) -> None:
    inventory = dataclasses.replace(make_inventory(), auto_sync=section)
    ctx = node_factory("selfplay-1", inventory=inventory, sync_interval=0.01)
    write_games(ctx.settings.games_dir / "sp.db", 5)
    transport = MemoryTransport()
    receiver = GameReceiver(tmp_path / "train-1" / "synced")
    transport.receivers["train-1"] = receiver
    daemon = AutoSyncDaemon(ctx, transport, retry_initial=0.0)
    skips = ctx.metrics.sync_cycles.labels(trigger="excluded_skip")
    seen_health = []

    def done() -> bool:
        seen_health.append(daemon.health())
        return bool(skips._value.get() >= 3)

    try:
        await run_daemon_until(daemon, done)
    finally:
        receiver.close()
    assert transport.pushes == 0
    assert seen_health[0].state is HealthState.HEALTHY
    assert seen_health[0].detail.startswith("skipping: ")
    assert "auto_sync" in str(ctx.router.get_sync_status()["auto_sync_skipped"])


async def test_another_node_in_exclude_hosts_does_not_stop_this_one(
    node_factory: Callable[..., NodeContext], tmp_path: Path
) -> None:
    section = AutoSyncSection(exclude_hosts=frozenset({"selfplay-2"}))
    inventory = dataclasses.replace(make_inventory(), auto_sync=section)
    ctx = node_factory("selfplay-1", inventory=inventory, sync_interval=0.01)
    write_games(ctx.settings.games_dir / "sp.db", 3)
    transport = MemoryTransport()
    receivers = {n: GameReceiver(tmp_path / n / "synced") for n in ("train-1", "train-2")}
    transport.receivers.update(receivers)
    daemon = AutoSyncDaemon(ctx, transport, retry_initial=0.0)
    try:
        await run_daemon_until(daemon, lambda: transport.pushes >= 2, transport.delivered)
    finally:
        for r in receivers.values():
            r.close()
    assert ctx.router.auto_sync_excluded() is None
