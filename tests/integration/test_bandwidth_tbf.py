"""Bandwidth limits on real sockets: the HTTP push path on loopback, and between two network
namespaces whose link a real ``tc tbf`` caps.

The namespace tests run this file as a script inside each namespace (``serve`` starts an
aiohttp sink, ``push`` runs a scenario through HttpTransport or the limiter and prints JSON).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from ringsync.daemons.auto_sync import AutoSyncDaemon
from ringsync.inventory import AutoSyncSection, Host, Inventory
from ringsync.node import NodeContext
from ringsync.policy.bandwidth import BandwidthLimiter, BandwidthLimits, Priority
from ringsync.store.gamedb import game_ids
from ringsync.transport.http import GAMES_PATH, HttpTransport

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token-0123456789abcdef"
LIMIT_MBPS = 40.0
MB = 1_000_000
PAYLOAD = 20 * MB
BODIES = web.AppKey("bodies", list)


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes * 8 / seconds / 1e6


# -- the sink: a real aiohttp server that reads each body and acknowledges it ---------------------

async def _receive(request: web.Request) -> web.Response:
    received = 0
    async for chunk in request.content.iter_chunked(256 * 1024):
        received += len(chunk)
    request.app[BODIES].append({
        "received": received, "content_length": request.content_length,
        "chunked": "chunked" in request.headers.get("Transfer-Encoding", "")})
    return web.json_response({"inserted": 0, "duplicates": 0})


async def start_sink(host: str, port: int) -> tuple[web.AppRunner, list[dict[str, Any]]]:
    app = web.Application(client_max_size=1 << 30)
    app[BODIES] = []
    app.router.add_post(GAMES_PATH, _receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner, app[BODIES]


@pytest.fixture
async def sink(unused_tcp_port: int) -> AsyncIterator[tuple[Host, list[dict[str, Any]]]]:
    runner, bodies = await start_sink("127.0.0.1", unused_tcp_port)
    try:
        yield Host(name="train-1", p2p_host="127.0.0.1", p2p_port=unused_tcp_port), bodies
    finally:
        await runner.cleanup()


# -- scenarios, run in the test process or inside a namespace ------------------------------------

async def push_rate(peer: Host, limit_mbps: float | None, size: int) -> dict[str, float]:
    """One game push of ``size`` bytes through HttpTransport and the limiter: achieved Mbit/s."""
    limiter = BandwidthLimiter(BandwidthLimits(total_mbps=limit_mbps))
    transport = HttpTransport("selfplay-1", TOKEN, limiter=limiter)
    payload = os.urandom(size)
    try:
        started = time.perf_counter()
        await transport.push_games(peer, payload, "0" * 32)
        elapsed = time.perf_counter() - started
    finally:
        await transport.close()
    # The first quarter second's worth leaves at once (the burst); the rest at the limit.
    burst = (limit_mbps or 0) * 1e6 / 8 * limiter.limits.burst_seconds
    return {"mbps": mbps(size, elapsed), "steady_mbps": mbps(size - int(burst), elapsed),
            "seconds": elapsed}


async def push_priorities(peer: Host, limit_mbps: float) -> dict[str, float]:
    """A 40 MB low-priority backlog (4 transfers), then a 5 MB high-priority one 1 s later."""
    limiter = BandwidthLimiter(BandwidthLimits(total_mbps=limit_mbps))
    started = time.perf_counter()
    finished: dict[str, float] = {}

    async def send(session: aiohttp.ClientSession, name: str, size: int,
                   priority: Priority) -> None:
        async with limiter.transfer(peer.name, priority), \
                aclosing(limiter.paced(peer.name, os.urandom(size), priority)) as body, \
                session.post(peer.url(GAMES_PATH), data=body,
                             headers={"Content-Length": str(size)}) as resp:
            assert resp.status == 200, await resp.text()
        finished[name] = time.perf_counter() - started

    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(timeout=timeout) as session, asyncio.TaskGroup() as tg:
        for i in range(4):
            tg.create_task(send(session, f"low-{i}", 10 * MB, Priority.LOW))
        await asyncio.sleep(1.0)
        finished["high_started"] = time.perf_counter() - started
        tg.create_task(send(session, "high", 5 * MB, Priority.HIGH))
    return finished


# -- loopback --------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
async def test_http_push_keeps_to_the_configured_rate_on_loopback(
        sink: tuple[Host, list[dict[str, Any]]]) -> None:
    peer, bodies = sink
    result = await push_rate(peer, LIMIT_MBPS, PAYLOAD)
    print(f"loopback, limiter {LIMIT_MBPS}: {result['mbps']:.1f} Mbit/s "
          f"({result['steady_mbps']:.1f} after the first burst)")
    assert abs(result["mbps"] - LIMIT_MBPS) / LIMIT_MBPS < 0.10, result
    assert abs(result["steady_mbps"] - LIMIT_MBPS) / LIMIT_MBPS < 0.04, result
    # Streamed in granted chunks, yet with its length declared (the data server needs it).
    assert bodies == [{"received": PAYLOAD, "content_length": PAYLOAD, "chunked": False}]


@pytest.mark.timeout(60)
async def test_unlimited_push_is_not_slowed(sink: tuple[Host, list[dict[str, Any]]]) -> None:
    peer, bodies = sink
    result = await push_rate(peer, None, PAYLOAD)
    assert result["mbps"] > 4 * LIMIT_MBPS, result
    assert bodies[0]["received"] == PAYLOAD


@pytest.mark.timeout(60)
async def test_auto_sync_paces_real_pushes_to_real_data_servers(
        node_factory: Callable[..., NodeContext], served: Callable[..., Any]) -> None:
    """The node's limiter, built from the inventory, paces AutoSyncDaemon's HTTP pushes."""
    from tests.conftest import make_inventory, write_games

    train1, train2 = node_factory("train-1"), node_factory("train-2")
    hosts = dict(make_inventory().hosts)
    for node in (train1, train2):
        name = node.settings.node_id
        hosts[name] = dataclasses.replace(hosts[name], p2p_port=node.settings.p2p_port)
    per_peer_mbps = 2.0
    inventory = Inventory(hosts=hosts,
                          auto_sync=AutoSyncSection(host_bandwidth_overrides={"train-*": per_peer_mbps}))
    sender = node_factory("selfplay-1", inventory=inventory)
    await served(train1)
    await served(train2)
    done, _ = write_games(sender.settings.games_dir / "sp.db", 60)
    daemon = AutoSyncDaemon(sender)
    started = time.perf_counter()
    await daemon.sync_once()
    elapsed = time.perf_counter() - started
    await daemon.close()
    m = sender.metrics
    for node in (train1, train2):
        assert sorted(game_ids(node.settings.synced_dir / "hex8_2p.db")) == sorted(done)
        name = node.settings.node_id
        sent = m.bytes_sent.labels(peer=name)._value.get()
        assert m.bandwidth_bytes.labels(peer=name, priority="normal")._value.get() == sent
        # Each peer's bytes took at least their time at 2 Mbit/s, less one quarter-second burst.
        floor = sent * 8 / (per_peer_mbps * 1e6) - 0.25
        assert sent > 300_000
        assert elapsed >= 0.9 * floor, (elapsed, sent)
    assert m.bandwidth_wait.labels(priority="normal", reason="rate")._value.get() > 1.0


# -- network namespaces under tc tbf -----------------------------------------------------------------

def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@dataclasses.dataclass(frozen=True)
class NamespacePair:
    client: str
    server: str
    server_address: str


@pytest.fixture(scope="module")
def netns_pair() -> Iterator[NamespacePair]:
    """Two namespaces joined by a veth whose client side is capped by tc tbf at 80 Mbit/s."""
    tag = secrets.token_hex(3)
    client, server = f"rsbw-{tag}-a", f"rsbw-{tag}-b"
    veth_a, veth_b = f"rb{tag}a", f"rb{tag}b"
    subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
    try:
        _ip("netns", "add", client)
    except (subprocess.CalledProcessError, OSError) as exc:
        reason = getattr(exc, "stderr", "") or exc
        pytest.skip(f"network namespaces unavailable: `ip netns add` failed: {reason}")
    try:
        _ip("netns", "add", server)
        _ip("link", "add", veth_a, "netns", client, "type", "veth", "peer", "name", veth_b,
            "netns", server)
        for ns, dev, host in ((client, veth_a, 1), (server, veth_b, 2)):
            _ip("-n", ns, "addr", "add", f"{subnet}.{host}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        subprocess.run(["tc", "-n", client, "qdisc", "add", "dev", veth_a, "root", "tbf",
                        "rate", "80mbit", "burst", "32kbit", "latency", "400ms"],
                       check=True, capture_output=True, timeout=10)
        yield NamespacePair(client, server, f"{subnet}.2")
    finally:
        for ns in (client, server):  # deleting a namespace deletes its end of the veth
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def _in_ns(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, __file__, *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def ns_peer(netns_pair: NamespacePair) -> Iterator[tuple[NamespacePair, Host]]:
    port = 18000 + secrets.randbelow(1000)
    command = _in_ns(netns_pair.server, "serve", netns_pair.server_address, str(port))
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          env=_env()) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready", "the sink did not start"
            yield netns_pair, Host(name="train-ns", p2p_host=netns_pair.server_address,
                                   p2p_port=port)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_in_client(pair: NamespacePair, peer: Host, scenario: str, limit: float | None) -> Any:
    args = [scenario, peer.address, str(peer.p2p_port), str(limit or 0)]
    done = subprocess.run(_in_ns(pair.client, "push", *args), capture_output=True, text=True,
                          timeout=45, env=_env())
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.needs_root
@pytest.mark.timeout(60)
def test_tbf_link_alone_runs_near_its_cap(ns_peer: tuple[NamespacePair, Host]) -> None:
    """Without the limiter the 80 Mbit/s link is what limits: the cap is real and above 40."""
    result = run_in_client(*ns_peer, "rate", None)
    print(f"tbf 80mbit, no limiter: {result['mbps']:.1f} Mbit/s")
    assert 60 < result["mbps"] < 88, result


@pytest.mark.needs_root
@pytest.mark.timeout(60)
def test_limiter_holds_its_rate_under_a_tbf_cap(ns_peer: tuple[NamespacePair, Host]) -> None:
    result = run_in_client(*ns_peer, "rate", LIMIT_MBPS)
    print(f"tbf 80mbit, limiter {LIMIT_MBPS}: {result['mbps']:.1f} Mbit/s "
          f"({result['steady_mbps']:.1f} after the first burst)")
    assert abs(result["mbps"] - LIMIT_MBPS) / LIMIT_MBPS < 0.10, result
    assert abs(result["steady_mbps"] - LIMIT_MBPS) / LIMIT_MBPS < 0.04, result


@pytest.mark.needs_root
@pytest.mark.timeout(60)
def test_high_priority_overtakes_a_low_priority_backlog_under_tbf(
        ns_peer: tuple[NamespacePair, Host]) -> None:
    t = run_in_client(*ns_peer, "priority", LIMIT_MBPS)
    backlog_done = max(t[f"low-{i}"] for i in range(4))
    high_took = t["high"] - t["high_started"]
    print(f"tbf: high 5 MB took {high_took:.2f}s; low backlog done at {backlog_done:.2f}s")
    # 45 MB at 5 MB/s is ~9 s in all; the high transfer alone would take 1 s, and at its weighted
    # share (4 of 5) about 1.25 s. Behind the backlog first come, first served it would end last.
    assert high_took < 2.5, t
    assert t["high"] < backlog_done - 4.0, t


# -- entry point inside a namespace ----------------------------------------------------------------

async def _serve(host: str, port: int) -> None:
    runner, _ = await start_sink(host, port)
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def _push(scenario: str, address: str, port: str, limit: str) -> None:
    peer = Host(name="train-ns", p2p_host=address, p2p_port=int(port))
    if scenario == "rate":
        result: Any = await push_rate(peer, float(limit) or None, PAYLOAD)
    else:
        result = await push_priorities(peer, float(limit))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        asyncio.run(_serve(sys.argv[2], int(sys.argv[3])))
    else:
        asyncio.run(_push(*sys.argv[2:6]))
