"""Shared fixtures: settings for a node, real selfplay DBs, a running data server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ringsync.daemons.data_server import DataServerDaemon
from ringsync.inventory import Host, Inventory
from ringsync.localcluster import free_port
from ringsync.node import NodeContext, build_context
from ringsync.protocol.batch import GameBatch
from ringsync.selfplay_sim import SelfplayWriter
from ringsync.settings import Settings
from ringsync.store.gamedb import GameSource

TOKEN = "test-token-0123456789abcdef"


def make_inventory(port: int = 8770) -> Inventory:
    hosts = {
        "selfplay-1": Host(name="selfplay-1", role="gpu_selfplay", p2p_host="127.0.0.1", p2p_port=port),
        "train-1": Host(name="train-1", role="gpu_training_primary", p2p_host="127.0.0.1", p2p_port=port),
        "train-2": Host(name="train-2", role="nn_training_primary", p2p_host="127.0.0.1", p2p_port=port),
        "coordinator": Host(name="coordinator", role="coordinator", p2p_host="127.0.0.1", p2p_port=port),
    }
    return Inventory(hosts=hosts)


def make_settings(tmp_path: Path, node_id: str = "train-1", **overrides: object) -> Settings:
    values: dict[str, object] = {
        "node_id": node_id, "data_dir": tmp_path / node_id, "inventory": make_inventory(),
        "p2p_host": "127.0.0.1", "p2p_port": free_port(), "auth_token": TOKEN,
        "sync_interval": 60.0, "max_batch_bytes": 1024 * 1024,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def write_games(db: Path, n: int, *, in_progress: int = 0, seed: int = 1,
                **writer_options: Any) -> tuple[list[str], list[str]]:
    """Completed and in-progress game ids, written the way RingRift's selfplay writes them.

    Connection per operation by default; ``writer_options`` go to SelfplayWriter
    (``pattern="long-lived"``, ``mode="incremental"``, ``fresh_schema=False``...).
    """
    db.parent.mkdir(parents=True, exist_ok=True)
    with SelfplayWriter(db, seed=seed, moves_per_game=20, **writer_options) as writer:
        done = [writer.write_game() for _ in range(n)]
        open_ = [writer.start_game() for _ in range(in_progress)]
    return done, open_


def extract_batches(db: Path, source_node: str = "selfplay-1") -> list[GameBatch]:
    source = GameSource(db)
    try:
        ids = [g.game_id for g in source.scan()]
        return source.extract(ids, source_node=source_node)
    finally:
        source.close()


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., NodeContext]]:
    made: list[NodeContext] = []

    def make(node_id: str = "train-1", **overrides: object) -> NodeContext:
        ctx = build_context(make_settings(tmp_path, node_id, **overrides))
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        ctx.close()


@pytest.fixture
async def served(node_factory: Callable[..., NodeContext]) -> AsyncIterator[Callable[..., object]]:
    """Start a real data server for a node context; stopped at teardown."""
    tasks: list[asyncio.Task[None]] = []

    async def serve(ctx: NodeContext) -> DataServerDaemon:
        daemon = DataServerDaemon(ctx)
        ready = asyncio.Event()
        tasks.append(asyncio.create_task(daemon.run(ready.set)))
        async with asyncio.timeout(10):
            await ready.wait()
        return daemon

    yield serve
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
