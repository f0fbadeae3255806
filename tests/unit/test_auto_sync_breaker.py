"""A target that keeps failing: its breaker opens, the other target keeps flowing, and
after healing it half-opens, closes and catches up, every game exactly once."""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from ringsync.daemons.auto_sync import AutoSyncDaemon
from ringsync.daemons.base import HealthState
from ringsync.inventory import Host
from ringsync.node import NodeContext, circuit_breakers
from ringsync.policy.breaker import BreakerConfig, BreakerState
from ringsync.protocol.results import MergeResult
from ringsync.store.receiver import GameReceiver
from ringsync.transport.base import GameTransport
from ringsync.transport.memory import MemoryTransport
from ringsync.transport.select import TransportChain
from tests.conftest import write_games
from tests.unit.clock import FakeClock
from tests.unit.test_auto_sync import held

BREAKER = BreakerConfig(failure_threshold=3, recovery_s=30.0, recovery_max_s=120.0, jitter=0.0)


class CountingTransport(MemoryTransport):
    """The in-memory transport, counting the requests (pushes, data dir probes) tried per peer."""

    def __init__(self) -> None:
        super().__init__()
        self.tried: Counter[str] = Counter()

    async def push_games(self, peer: Host, payload: bytes, digest: str, *,
                         data_dir_id: str | None = None) -> MergeResult:
        self.tried[peer.name] += 1
        return await super().push_games(peer, payload, digest, data_dir_id=data_dir_id)

    async def peer_data_dir_id(self, peer: Host) -> str:
        self.tried[peer.name] += 1
        return await super().peer_data_dir_id(peer)


def circuit(ctx: NodeContext, peer: str) -> float | None:
    return ctx.metrics.registry.get_sample_value(
        "ringsync_circuit_state", {"peer": peer, "transport": "memory"})


def duplicates_at(ctx: NodeContext, peer: str) -> float | None:
    return ctx.metrics.registry.get_sample_value(
        "ringsync_games_already_present_total", {"peer": peer})


async def test_an_open_breaker_holds_one_targets_games_while_the_other_flows(
    node_factory: Callable[..., NodeContext], tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ringsync.node")
    transport = CountingTransport()
    for name in ("train-1", "train-2"):
        transport.receivers[name] = GameReceiver(tmp_path / name / "synced")
    transport.receivers["coordinator"] = GameReceiver(tmp_path / "coordinator" / "synced",
                                                      refuse_reason="coordinator")
    clock = FakeClock()
    ctx = node_factory("selfplay-1")
    db = ctx.settings.games_dir / "sp.db"
    first, _ = write_games(db, 30)
    transport.down.add("train-2")
    ctx.breakers = circuit_breakers(ctx.metrics, BREAKER, clock=clock)
    daemon = AutoSyncDaemon(ctx, transport, retry_initial=0.0, clock=clock)
    try:
        for _ in range(3):  # three transient failures in a row open train-2's breaker
            await daemon.sync_once()
        assert sorted(held(tmp_path, "train-1")) == sorted(first)
        assert circuit(ctx, "train-2") == BreakerState.OPEN.gauge
        assert circuit(ctx, "train-1") == BreakerState.CLOSED.gauge
        assert daemon.health().state is HealthState.DEGRADED
        assert "train-2: circuit open over memory" in daemon.health().detail
        tried = transport.tried["train-2"]

        # While it is open: train-2 is not tried, its games wait, train-1 keeps receiving.
        more = write_games(db, 20, seed=2)[0]
        await daemon.sync_once()
        clock.advance(29.0)
        await daemon.sync_once()
        assert transport.tried["train-2"] == tried
        assert sorted(held(tmp_path, "train-1")) == sorted(first + more)
        assert held(tmp_path, "train-2") == []
        assert ctx.manifest.outbox_size("train-2") == 50

        # Healed: after the recovery time one probe goes, succeeds, the breaker closes and
        # the backlog follows, nothing twice.
        transport.down.clear()
        clock.advance(1.0)
        await daemon.sync_once()
        assert circuit(ctx, "train-2") == BreakerState.CLOSED.gauge
        got = held(tmp_path, "train-2")
        assert sorted(got) == sorted(first + more)
        assert len(got) == len(set(got))
        assert not duplicates_at(ctx, "train-2")
        assert not duplicates_at(ctx, "train-1")
        assert ctx.manifest.outbox_size("train-2") == 0
        assert daemon.health().state is HealthState.HEALTHY
    finally:
        await daemon.drain()
        for receiver in transport.receivers.values():
            receiver.close()
    changes = [r.getMessage() for r in caplog.records if "circuit to train-2 over memory" in r.getMessage()]
    assert [re.sub(r" for \d+s", "", c.split(": ", 1)[1].split(" (")[0]) for c in changes] == [
        "closed -> open", "open -> half_open", "half_open -> closed"]
    assert "open for 30s -> half_open" in changes[1]  # how long it was open
    assert all(re.search(r"since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$", c) for c in changes)


async def test_a_probe_that_fails_reopens_the_breaker_for_longer(
    node_factory: Callable[..., NodeContext], tmp_path: Path,
) -> None:
    transport = CountingTransport()
    transport.receivers["train-1"] = GameReceiver(tmp_path / "train-1" / "synced")
    clock = FakeClock()
    ctx = node_factory("selfplay-1")
    write_games(ctx.settings.games_dir / "sp.db", 5)
    transport.down.add("train-2")
    ctx.breakers = circuit_breakers(ctx.metrics, BREAKER, clock=clock)
    daemon = AutoSyncDaemon(ctx, transport, retry_initial=0.0, clock=clock)
    try:
        for _ in range(3):
            await daemon.sync_once()
        tried = transport.tried["train-2"]
        clock.advance(30.0)
        await daemon.sync_once()  # the probe: one push, which fails
        assert transport.tried["train-2"] == tried + 1
        assert circuit(ctx, "train-2") == BreakerState.OPEN.gauge
        clock.advance(59.0)  # the recovery doubled to 60 s
        await daemon.sync_once()
        assert transport.tried["train-2"] == tried + 1
    finally:
        await daemon.drain()
        transport.receivers["train-1"].close()


async def test_with_two_transports_a_target_waits_only_once_both_breakers_are_open(
    node_factory: Callable[..., NodeContext], tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    http, ssh = CountingTransport(), CountingTransport()
    for name in ("train-1", "train-2"):
        receiver = GameReceiver(tmp_path / name / "synced")
        http.receivers[name] = ssh.receivers[name] = receiver
    clock = FakeClock()
    ctx = node_factory("selfplay-1")
    ctx.breakers = circuit_breakers(ctx.metrics, BREAKER, clock=clock)
    transports: dict[str, GameTransport] = {"http": http, "ssh": ssh}
    chain = TransportChain(transports, ("http", "ssh"), ctx.breakers)
    db = ctx.settings.games_dir / "sp.db"
    written = write_games(db, 10)[0]
    http.down.add("train-2")
    daemon = AutoSyncDaemon(ctx, chain, retry_initial=0.0, clock=clock)

    def gauge(transport: str) -> float | None:
        return ctx.metrics.registry.get_sample_value(
            "ringsync_circuit_state", {"peer": "train-2", "transport": transport})

    try:
        for seed in range(2, 5):  # HTTP's breaker opens; SSH carries every game meanwhile
            await daemon.sync_once()
            written += write_games(db, 10, seed=seed)[0]
        await daemon.sync_once()
        assert (gauge("http"), gauge("ssh")) == (BreakerState.OPEN.gauge, BreakerState.CLOSED.gauge)
        assert sorted(held(tmp_path, "train-2")) == sorted(written)
        assert "train-2: circuit open over http since" in daemon.health().detail
        tried_http = http.tried["train-2"]
        await daemon.sync_once()
        assert http.tried["train-2"] == tried_http  # HTTP skipped, SSH used

        ssh.down.add("train-2")  # now every transport is down: the target waits
        for _ in range(4):
            written += write_games(db, 5, seed=len(written))[0]
            await daemon.sync_once()
        assert (gauge("http"), gauge("ssh")) == (BreakerState.OPEN.gauge,) * 2
        tried = (http.tried["train-2"], ssh.tried["train-2"])
        for _ in range(3):
            written += write_games(db, 5, seed=len(written))[0]
            await daemon.sync_once()
            assert not await daemon._backlog_waiting()  # no spinning on a waiting target
        assert (http.tried["train-2"], ssh.tried["train-2"]) == tried  # nothing tried
        assert sorted(held(tmp_path, "train-1")) == sorted(written)  # the other flows
        assert ctx.manifest.outbox_size("train-2") > 0
        got = held(tmp_path, "train-2")
        assert len(got) == len(set(got))
    finally:
        await daemon.drain()
        for receiver in http.receivers.values():
            receiver.close()
    lines = [r.getMessage() for r in caplog.records if "train-2" in r.getMessage()]
    assert len([m for m in lines if "circuit to train-2 over http" in m]) == 1  # closed -> open
    assert len([m for m in lines if "circuit to train-2 over ssh" in m]) == 1
    assert len([m for m in lines if "delivery to train-2 failing" in m]) == 1  # not per failure
