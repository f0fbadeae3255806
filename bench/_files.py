"""Shared by the file benches: a real `ringsync run` node offering one big model, and timed fetches."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from _common import running

from ringsync.files.client import FileClient, PeerFiles
from ringsync.files.fetch import Exclusions, FileFetcher
from ringsync.files.hashing import hash_file
from ringsync.files.kinds import FileKind
from ringsync.files.manifest import FileManifest
from ringsync.files.plan import FetchJob, IndexEntry, Source
from ringsync.inventory import Host, load_inventory
from ringsync.localcluster import Cluster, wait_until
from ringsync.ops.metrics import Metrics

MIB = 1024 * 1024
MODEL = "canonical_bench.pth"
SOURCE = "train-1"


def write_random(path: Path, size: int) -> None:
    """Incompressible bytes (no transport gains from compression), written once per run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(8 * MIB)
    with path.open("wb") as f:
        for i in range(0, size, len(block)):
            # vary each block so no dedup below us (and no rsync block match) helps
            f.write(i.to_bytes(8, "little") + block[8:min(len(block), size - i)])


@contextmanager
def source_node(root: Path, size: int, host_fields: dict[str, object] | None = None,
                env: dict[str, str] | None = None) -> Iterator[tuple[Cluster, Path]]:
    """A training node (`ringsync run`) whose data server offers one ``size``-byte model."""
    root.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(root, [(SOURCE, "gpu_training_primary"), ("selfplay-1", "gpu_selfplay")],
                      sync_interval=60.0, host_fields={SOURCE: host_fields or {}})
    model = cluster.nodes[SOURCE].data_dir / "models" / MODEL
    write_random(model, size)
    old = time.time() - 60
    os.utime(model, (old, old))  # settled
    cluster.nodes[SOURCE].extra_env.update({"RINGRIFT_FILE_SETTLE_TIME": "0.5",
                                            "RINGRIFT_LOG_LEVEL": "WARNING", **(env or {})})
    with running(cluster):
        cluster.start(SOURCE)
        yield cluster, model


def inventory_host(cluster: Cluster, name: str) -> Host:
    """The host as the inventory file describes it (ssh_* fields included)."""
    return load_inventory(cluster.inventory).hosts[name]


def offered(make_client: Callable[[], PeerFiles], host: Host, timeout: float = 120.0) -> IndexEntry:
    """The model's index entry once the source has hashed and offered it."""
    found: list[IndexEntry] = []

    def ready() -> bool:
        entries = asyncio.run(_index(make_client(), host))
        found[:] = [e for e in entries if e.relpath == MODEL]
        return bool(found)

    try:
        wait_until(ready, timeout, f"{MODEL} in {host.name}'s file index")
    except AssertionError as exc:
        raise RuntimeError(f"{exc} (last error: {last_error})") from None
    return found[0]


last_error: list[str] = []


async def _index(client: PeerFiles, host: Host) -> list[IndexEntry]:
    try:
        return await client.index(host)
    except Exception as exc:  # not up yet: polled again
        last_error[:] = [f"{type(exc).__name__}: {exc}"]
        return []
    finally:
        await client.close()


def fetch_once(make_client: Callable[[], PeerFiles], host: Host, entry: IndexEntry, dest: Path) -> float:
    """One fetch through ringsync's FileFetcher (stream, hash, fsync, atomic publish): seconds."""
    return asyncio.run(_fetch(make_client(), host, entry, dest))


async def _fetch(client: PeerFiles, host: Host, entry: IndexEntry, dest: Path) -> float:
    manifest = FileManifest(dest / "files.db")
    try:
        fetcher = FileFetcher({FileKind.MODELS: dest / "models"}, manifest, client, Metrics(),
                              {host.name: host}.get, Exclusions())
        started = time.perf_counter()
        ok = await fetcher.fetch(FetchJob(entry, (Source(host.name, FileKind.MODELS, entry.relpath),)))
        elapsed = time.perf_counter() - started
    finally:
        await client.close()
        manifest.close()
    if not ok or hash_file(dest / "models" / entry.relpath) != entry.hash:
        raise RuntimeError("ringsync's fetch did not publish a verified copy")
    return elapsed


def fresh_step(scratch: Path, size: int) -> None:
    """Start a timed step the same way for every tool: no dirty pages, and ``size`` bytes of
    page cache just freed, as on a node that keeps writing.

    In this VM (Firecracker), memory the guest has not touched lately costs ≈ 0.75 s per GiB
    on first touch (the host maps it); freed page cache stays warm for a moment. Without
    this, a tool's speed depended on whether the step before it had just freed 1 GiB of
    pages: 1 GiB written to a file took 0.2 s or 1.0 s from run to run.
    """
    os.sync()
    block = bytes(MIB)
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for offset in range(0, size, MIB):
            os.pwrite(fd, block, offset)
    finally:
        os.close(fd)
    scratch.unlink()  # never written back: its dirty pages are dropped


def fsync_file(path: Path) -> float:
    """fsync a reference tool's output (ringsync fsyncs what it publishes): seconds it took."""
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    return statistics.median(values)


def http_client(token: str) -> FileClient:
    return FileClient("bench", token, read_timeout=60.0)
