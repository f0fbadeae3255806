"""A training host whose HTTP port cannot be reached but whose SSH works (real OpenSSH sshd,
real aiohttp data servers on loopback): its games arrive exactly once over SSH, the breaker
of (train-1, http) is open in the sender's /metrics and (train-1, ssh) closed, later pushes
do not try HTTP, and the other target keeps receiving over HTTP."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bench._sshd import SshServer, sshd_server
from ringsync.daemons.auto_sync import AutoSyncDaemon
from ringsync.daemons.base import HealthState
from ringsync.inventory import Host, Inventory
from ringsync.node import NodeContext
from ringsync.store.gamedb import game_ids
from tests.conftest import TOKEN, write_games

pytestmark = [pytest.mark.timeout(90),
              pytest.mark.skipif(shutil.which("sshd") is None and not Path("/usr/sbin/sshd").exists(),
                                 reason="OpenSSH sshd is not installed (apt-get install openssh-server)")]

THRESHOLD = 2
ROUNDS = 4


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshServer]:
    with sshd_server() as server:
        yield server


def inventory(server: SshServer, train1: NodeContext, train2: NodeContext) -> Inventory:
    """train-1's p2p address is 127.0.0.2, where nothing listens (its data server is on
    127.0.0.1): HTTP is refused, while SSH reaches that data server on its own loopback."""
    hosts = {
        "selfplay-1": Host(name="selfplay-1", role="gpu_selfplay", p2p_host="127.0.0.1"),
        "train-1": Host(name="train-1", role="gpu_training_primary", p2p_host="127.0.0.2",
                        p2p_port=train1.settings.p2p_port, ssh_host=server.host,
                        ssh_port=server.port, ssh_user=server.user, ssh_key=str(server.client_key),
                        transport=("http", "ssh")),
        "train-2": Host(name="train-2", role="nn_training_primary", p2p_host="127.0.0.1",
                        p2p_port=train2.settings.p2p_port),
    }
    return Inventory(hosts=hosts)


def held(ctx: NodeContext) -> list[str]:
    return [g for db in sorted(ctx.settings.synced_dir.glob("*.db")) for g in game_ids(db)]


async def get(ctx: NodeContext, path: str) -> aiohttp.ClientResponse:
    """GET ``path`` from the node's own data server (read, then released)."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as session, session.get(
            ctx.settings.inventory.hosts["selfplay-1"].url(path)) as resp:
        assert resp.status == 200
        await resp.read()
        return resp


async def scrape(ctx: NodeContext) -> dict[str, float]:
    """The node's /metrics over HTTP, as {'name{labels}': value}."""
    text = await (await get(ctx, "/metrics")).text()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


async def test_http_down_ssh_up_games_arrive_once_and_only_the_http_breaker_is_open(
        sshd: SshServer, node_factory: Callable[..., NodeContext], served: Callable[..., Any],
) -> None:
    train1, train2 = node_factory("train-1"), node_factory("train-2")
    await served(train1)
    await served(train2)
    sender = node_factory("selfplay-1", inventory=inventory(sshd, train1, train2),
                          ssh_known_hosts=sshd.known_hosts, circuit_failure_threshold=THRESHOLD,
                          circuit_recovery=60.0, circuit_recovery_max=60.0, batch_games=5)
    hosts = sender.settings.inventory.hosts
    hosts["selfplay-1"] = Host(name="selfplay-1", role="gpu_selfplay", p2p_host="127.0.0.1",
                               p2p_port=sender.settings.p2p_port)
    await served(sender)  # its /metrics
    daemon = AutoSyncDaemon(sender)
    db = sender.settings.games_dir / "sp.db"
    written: list[str] = []
    try:
        for seed in range(1, ROUNDS + 1):
            written += write_games(db, 12, seed=seed)[0]
            await daemon.sync_once()
        health = daemon.health()
    finally:
        await daemon.drain()
        await daemon.close()

    for trainer in (train1, train2):  # every game, exactly once, at both targets
        got = held(trainer)
        assert sorted(got) == sorted(written), trainer.settings.node_id
        assert len(got) == len(set(got))
    m = await scrape(sender)
    assert m['ringsync_circuit_state{peer="train-1",transport="http"}'] == 2
    assert m['ringsync_circuit_state{peer="train-1",transport="ssh"}'] == 0
    assert m['ringsync_circuit_state{peer="train-2",transport="http"}'] == 0
    assert 'ringsync_circuit_state{peer="train-1",transport="chain"}' not in m
    # HTTP to train-1 was tried until its breaker opened, then skipped; SSH carried the rest.
    attempts = 'ringsync_transport_attempts_total{data_type="games",outcome="%s",transport="%s"}'
    assert m[attempts % ("next", "http")] == THRESHOLD
    assert m[attempts % ("breaker_open", "http")] >= ROUNDS * 12 // 5 - THRESHOLD
    assert m[attempts % ("ok", "ssh")] >= ROUNDS * 12 // 5
    assert m['ringsync_games_already_present_total{peer="train-1"}'] == 0
    # The operator sees which peer and transport is open, and since when.
    assert health.state is HealthState.DEGRADED
    assert re.search(r"train-1: circuit open over http since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC "
                     r"\(\d+s\)", health.detail), health.detail
    assert "over ssh" not in health.detail
    (circuit,) = (await (await get(sender, "/v1/status")).json())["circuits"]
    assert (circuit["peer"], circuit["transport"], circuit["state"]) == ("train-1", "http", "open")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", circuit["since"])
