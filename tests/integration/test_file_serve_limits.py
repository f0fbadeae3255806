"""The data server's file responses under the node's one bandwidth limiter, on loopback: many
requests at once are served a few at a time (transfer slots), at the configured rate, in
bounded memory."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from ringsync.localcluster import Cluster, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

MB = 1_000_000
REQUESTS = 40
SIZE = 3 * MB
LIMIT_MBPS = 100.0  # 12.5 MB/s: 120 MB in ~10 s


@pytest.fixture
def source(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path, [("train-1", "gpu_training_primary"), ("selfplay-1", "gpu_selfplay")],
                      sync_interval=30.0)
    model = cluster.nodes["train-1"].data_dir / "models" / "epoch_3.pth"
    model.parent.mkdir(parents=True)
    model.write_bytes(os.urandom(SIZE))
    os.utime(model, (time.time() - 3600, time.time() - 3600))
    cluster.nodes["train-1"].extra_env.update({
        "RINGRIFT_BANDWIDTH_LIMIT_MBPS": str(LIMIT_MBPS), "RINGRIFT_MAX_TRANSFERS_PER_PEER": "4",
        "RINGRIFT_FILE_SETTLE_TIME": "0.5",
        # every request streams from here (no relays in this test): the limiter's slots decide
        "RINGRIFT_FILE_UPLOAD_SLOTS": "64"})
    cluster.start("train-1")
    try:
        yield cluster
    finally:
        cluster.stop_all()


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def fetch_all(cluster: Cluster) -> tuple[float, int]:
    """Every request at once, as selfplay-1: the most responses streaming at one time, and
    the seconds the whole lot took."""
    node = cluster.nodes["train-1"]
    url = f"http://127.0.0.1:{node.port}/v1/files/models/epoch_3.pth"
    headers = {"Authorization": f"Bearer {cluster.token}", "X-Ringsync-Node": "selfplay-1"}
    streaming = most = 0

    async def one(session: aiohttp.ClientSession) -> int:
        nonlocal streaming, most
        async with session.get(url, headers=headers) as resp:
            assert resp.status == 200
            streaming += 1
            most = max(most, streaming)
            got = 0
            async for chunk in resp.content.iter_chunked(256 * 1024):
                got += len(chunk)
            streaming -= 1
            return got

    timeout = aiohttp.ClientTimeout(total=50)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:
        started = time.monotonic()
        sizes = await asyncio.gather(*(one(s) for _ in range(REQUESTS)))
        took = time.monotonic() - started
    assert sizes == [SIZE] * REQUESTS
    return took, most


def test_many_requests_are_served_a_few_at_a_time_at_the_limit_in_bounded_memory(
        source: Cluster) -> None:
    node = source.nodes["train-1"]
    assert node.process is not None
    wait_until(lambda: "offering models/epoch_3.pth" in node.log_path.read_text(), 20, "the model offered")
    before = peak_rss_mib(node.process.pid)
    took, most = asyncio.run(fetch_all(source))
    rate = REQUESTS * SIZE * 8 / took / 1e6
    grew = peak_rss_mib(node.process.pid) - before
    print(f"{REQUESTS} x {SIZE // MB} MB at {rate:.1f} Mbit/s (limit {LIMIT_MBPS}); at most {most} "
          f"streaming at once; peak RSS grew {grew:.1f} MiB")
    assert most <= 4  # RINGRIFT_MAX_TRANSFERS_PER_PEER: the others wait, holding no buffer
    assert abs(rate - LIMIT_MBPS) <= 0.1 * LIMIT_MBPS
    assert grew < 40  # a 1 MiB read per streaming response, not a file per request
