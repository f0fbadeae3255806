"""Aria2Transport: real aria2c against real data servers on loopback (issue 8 §2).

Three source nodes (each a real data server on its own loopback address) hold the same
file; a receiver's FileFetcher fetches it with aria2c from all of them at once.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ringsync.files.client import FileClient
from ringsync.files.fetch import Exclusions, FileFetcher
from ringsync.files.hashing import hash_file
from ringsync.files.kinds import FileKind, part_name
from ringsync.files.layout import file_dirs, manifest_path
from ringsync.files.manifest import FileManifest
from ringsync.files.pieces import PIECE_BYTES
from ringsync.files.plan import FetchJob, IndexEntry, Source
from ringsync.files.scanner import FileScanner
from ringsync.inventory import Host, Inventory
from ringsync.localcluster import free_port
from ringsync.node import NodeContext
from ringsync.transport.aria2 import CONTROL_SUFFIX, Aria2Transport, control_file_done
from tests.conftest import TOKEN

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(shutil.which("aria2c") is None, reason="aria2c is not installed"),
]

MIB = 1024 * 1024
SOURCES = ("src-1", "src-2", "src-3")
NAME = "canonical_hex8_2p.pth"


@dataclass
class Lab:
    sources: dict[str, NodeContext]
    receiver: NodeContext
    manifest: FileManifest
    fetcher: FileFetcher
    aria2: Aria2Transport
    client: FileClient
    exclusions: Exclusions
    entry: IndexEntry
    data: bytes

    def job(self) -> FetchJob:
        return FetchJob(self.entry, tuple(Source(p, FileKind.MODELS, NAME) for p in self.sources))

    def served(self, peer: str) -> float:
        value = self.sources[peer].metrics.registry.get_sample_value(
            "ringsync_file_bytes_served_total", {"peer": "recv"})
        return value or 0.0

    def total_served(self) -> float:
        return sum(self.served(p) for p in self.sources)

    def final(self) -> Path:
        return self.receiver.settings.models_dir / NAME

    def part(self) -> Path:
        return self.receiver.settings.models_dir / part_name(NAME)


def offer(ctx: NodeContext, data: bytes) -> IndexEntry:
    models = ctx.settings.models_dir
    models.mkdir(parents=True, exist_ok=True)
    (models / NAME).write_bytes(data)
    os.utime(models / NAME, ns=(10**18, 10**18))  # settled
    manifest = FileManifest(manifest_path(ctx.settings))
    try:
        FileScanner(file_dirs(ctx.settings), manifest, 5.0).scan()
        rec = manifest.get(FileKind.MODELS, NAME)
        assert rec is not None
        return IndexEntry.of(rec)
    finally:
        manifest.close()


def corrupt_keeping_stat(path: Path, every: int) -> None:
    """Flip bytes in the middle of every ``every``-th piece, keeping size, mtime and inode:
    the node still believes it holds the hashed content and serves it."""
    st = path.stat()
    with path.open("r+b") as f:
        for start in range(PIECE_BYTES // 2, st.st_size, every * PIECE_BYTES):
            f.seek(start)
            f.write(b"\xff" * 1024)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture
async def lab_factory(node_factory: Callable[..., NodeContext],
                      served: Callable[..., Any]) -> Any:
    made: list[Lab] = []

    async def make(size: int, serve_mbps: float = 0.0, **receiver_settings: object) -> Lab:
        ports = {name: free_port() for name in SOURCES}
        hosts = {name: Host(name=name, role="gpu_selfplay", p2p_host=f"127.0.0.{i + 2}",
                            p2p_port=ports[name]) for i, name in enumerate(SOURCES)}
        hosts["recv"] = Host(name="recv", role="gpu_selfplay", p2p_host="127.0.0.1",
                             p2p_port=free_port())
        inventory = Inventory(hosts=hosts)
        data = os.urandom(size)
        sources = {}
        for name in SOURCES:
            ctx = node_factory(name, inventory=inventory, p2p_host=hosts[name].p2p_host,
                               p2p_port=ports[name], bandwidth_limit_mbps=serve_mbps or None)
            entry = offer(ctx, data)
            await served(ctx)
            sources[name] = ctx
        receiver = node_factory("recv", inventory=inventory, **receiver_settings)
        receiver.settings.models_dir.mkdir(parents=True, exist_ok=True)
        manifest = FileManifest(manifest_path(receiver.settings))
        exclusions = Exclusions()
        aria2 = Aria2Transport("recv", TOKEN, inventory.get, receiver.metrics, exclusions,
                               min_bytes=MIB, breakers=receiver.breakers)
        client = FileClient("recv", TOKEN)
        fetcher = FileFetcher(file_dirs(receiver.settings), manifest, client, receiver.metrics,
                              inventory.get, exclusions, aria2)
        lab = Lab(sources, receiver, manifest, fetcher, aria2, client, exclusions, entry, data)
        made.append(lab)
        return lab

    yield make
    for lab in made:
        await lab.aria2.close()
        await lab.client.close()
        lab.manifest.close()


def metric(lab: Lab, name: str, labels: dict[str, str]) -> float:
    return lab.receiver.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_file_held_by_three_peers_is_fetched_from_all_of_them(lab_factory: Any) -> None:
    lab: Lab = await lab_factory(40 * MIB)
    assert lab.aria2.wants(lab.entry, lab.job().sources)
    assert await lab.fetcher.fetch(lab.job())
    assert hash_file(lab.final()) == lab.entry.hash
    assert lab.final().read_bytes() == lab.data
    assert not lab.part().exists()
    assert not lab.part().with_name(lab.part().name + CONTROL_SUFFIX).exists()
    for peer in SOURCES:  # every source served a share, none the whole file
        assert 0 < lab.served(peer) < lab.entry.size, (peer, lab.served(peer))
    rec = lab.manifest.get(FileKind.MODELS, NAME)
    assert rec is not None
    assert rec.hash == lab.entry.hash
    assert lab.manifest.transfer(FileKind.MODELS, NAME) is None
    assert metric(lab, "ringsync_file_multi_source_fetches_total", {"outcome": "published"}) == 1
    assert not lab.exclusions.by_hash


async def test_a_source_serving_corrupt_bytes_is_excluded_and_the_file_still_published(
        lab_factory: Any) -> None:
    lab: Lab = await lab_factory(40 * MIB)
    corrupt_keeping_stat(lab.sources["src-2"].settings.models_dir / NAME, every=1)
    assert await lab.fetcher.fetch(lab.job())
    assert lab.final().read_bytes() == lab.data
    assert lab.exclusions.by_hash == {lab.entry.hash: {"src-2"}}
    assert metric(lab, "ringsync_file_source_exclusions_total", {"peer": "src-2"}) == 1
    assert metric(lab, "ringsync_file_multi_source_fetches_total", {"outcome": "repaired"}) == 1
    assert metric(lab, "ringsync_file_hash_mismatches_total", {"kind": "models"}) == 1
    # Only the bad pieces were fetched again, from the good sources.
    repaired = sum(metric(lab, "ringsync_file_source_bytes_total",
                          {"peer": p, "transport": "http-range"}) for p in ("src-1", "src-3"))
    assert 0 < repaired <= lab.served("src-2") + PIECE_BYTES
    # Excluded: src-2 is no longer a source for this content.
    assert [m.peer for m in lab.aria2.mirrors(lab.entry, lab.job().sources)] == ["src-1", "src-3"]


async def test_a_source_aria2c_cannot_connect_to_opens_its_aria2_breaker_and_is_left_out(
        lab_factory: Any) -> None:
    lab: Lab = await lab_factory(40 * MIB, circuit_failure_threshold=1, circuit_recovery=60.0,
                                 circuit_recovery_max=60.0)
    # A fourth holder on its own address whose data server is down: connections are refused.
    lab.receiver.settings.inventory.hosts["src-gone"] = Host(
        name="src-gone", role="gpu_selfplay", p2p_host="127.0.0.9", p2p_port=free_port())
    job = FetchJob(lab.entry, (*lab.job().sources, Source("src-gone", FileKind.MODELS, NAME)))
    assert [m.peer for m in lab.aria2.mirrors(lab.entry, job.sources)] == [*SOURCES, "src-gone"]
    assert await lab.fetcher.fetch(job)
    assert lab.final().read_bytes() == lab.data

    def circuit(peer: str) -> float | None:
        return lab.receiver.metrics.registry.get_sample_value(
            "ringsync_circuit_state", {"peer": peer, "transport": "aria2"})

    assert circuit("src-gone") == 2  # open: aria2c said it could not connect to that host
    assert [circuit(p) for p in SOURCES] == [0, 0, 0]  # they served
    assert [m.peer for m in lab.aria2.mirrors(lab.entry, job.sources)] == list(SOURCES)
    assert not lab.exclusions.by_hash  # unreachable is not wrong bytes: no exclusion


async def test_a_killed_aria2c_resumes_without_fetching_the_file_again(lab_factory: Any) -> None:
    size = 48 * MIB
    lab: Lab = await lab_factory(size, serve_mbps=40.0)  # 3 x 5 MB/s: about 10 s in all
    control = lab.part().with_name(lab.part().name + CONTROL_SUFFIX)
    first = asyncio.create_task(lab.fetcher.fetch(lab.job()))
    for _ in range(300):  # until aria2 has saved a third of the file as done
        if control.exists() and control_file_done(control) >= size // 3:
            break
        await asyncio.sleep(0.1)
    proc = lab.aria2.running[lab.entry.hash]
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    assert b"--input-file=" in cmdline
    assert TOKEN.encode() not in cmdline
    os.kill(proc.pid, signal.SIGKILL)
    assert await first is False  # not published: resumed next time
    assert not lab.final().exists()
    held = control_file_done(control)
    before = lab.total_served()
    assert size // 3 <= held < size
    assert before < size
    assert await lab.fetcher.fetch(lab.job())
    assert lab.final().read_bytes() == lab.data
    refetched = lab.total_served() - held
    assert refetched < size - held + 8 * MIB, (refetched, held)
    assert lab.total_served() < 1.3 * size


async def test_a_source_serves_a_bounded_range_as_aria2_asks(lab_factory: Any) -> None:
    import aiohttp
    lab: Lab = await lab_factory(2 * MIB)
    host = lab.receiver.settings.inventory.hosts["src-1"]
    url = f"http://{host.p2p_host}:{host.p2p_port}/v1/files/models/{NAME}"
    headers = {"Authorization": f"Bearer {TOKEN}", "Range": "bytes=1000-1999"}
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        assert r.status == 206
        assert r.headers["Content-Range"] == f"bytes 1000-1999/{2 * MIB}"
        assert await r.read() == lab.data[1000:2000]
    headers["Range"] = "bytes=2000-1000"
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        assert r.status == 416
