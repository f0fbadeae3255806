"""FileFetcher's streaming: the socket is read while the disk works, checkpoints are what a
restart resumes from, and a failed write stops the download with nothing published.

A fake peer (an in-process body of chunks) stands in for the HTTP client; the real
end-to-end paths are tests/integration/test_file_sync.py and test_netns_acceptance.py.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from blake3 import blake3

import ringsync.files.fetch as fetch
from ringsync.errors import TransportError
from ringsync.files.fetch import Exclusions, FileFetcher
from ringsync.files.kinds import FileKind, part_name
from ringsync.files.manifest import FileManifest
from ringsync.files.plan import FetchJob, IndexEntry, Source
from ringsync.inventory import Host
from ringsync.ops.metrics import Metrics

MIB = 1024 * 1024
M = FileKind.MODELS
PEER = Host("train-1", p2p_host="127.0.0.1", p2p_port=9)


@dataclass
class FakeBody:
    start: int
    hash: str
    source: Callable[[], AsyncIterator[bytes]]

    def chunks(self) -> AsyncIterator[bytes]:
        return self.source()


class FakePeer:
    """Serves ``content`` in ``chunk``-byte pieces; ``cut_at``: the stream breaks there."""

    def __init__(self, content: bytes, chunk: int, cut_at: int | None = None,
                 on_chunk: Callable[[int], None] | None = None) -> None:
        self.content, self.chunk, self.cut_at, self.on_chunk = content, chunk, cut_at, on_chunk
        self.served_from: list[int] = []

    async def index(self, peer: Host) -> list[IndexEntry]:
        raise NotImplementedError

    @asynccontextmanager
    async def open(self, peer: Host, source: Source, start: int) -> AsyncIterator[FakeBody]:
        self.served_from.append(start)

        async def chunks() -> AsyncIterator[bytes]:
            for offset in range(start, len(self.content), self.chunk):
                if self.cut_at is not None and offset >= self.cut_at:
                    raise TransportError(peer.name, "connection reset (test)")
                if self.on_chunk is not None:
                    self.on_chunk(offset)
                await asyncio.sleep(0)
                yield self.content[offset:offset + self.chunk]

        yield FakeBody(start, blake3(self.content).hexdigest(), chunks)

    async def close(self) -> None:
        pass


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Path, FileManifest]]:
    manifest = FileManifest(tmp_path / "files.db")
    try:
        yield tmp_path / "models", manifest
    finally:
        manifest.close()


def entry_for(content: bytes) -> IndexEntry:
    return IndexEntry(M, "canonical_sq8_2p.pth", len(content), 1_700_000_000_000_000_000,
                      blake3(content).hexdigest())


def fetch_with(peer: FakePeer, models: Path, manifest: FileManifest, e: IndexEntry) -> bool:
    fetcher = FileFetcher({M: models}, manifest, peer, Metrics(), {PEER.name: PEER}.get,  # type: ignore[arg-type]
                          Exclusions())
    return asyncio.run(fetcher.fetch(FetchJob(e, (Source(PEER.name, M, e.relpath),))))


def test_the_body_is_read_on_while_a_write_runs(node: tuple[Path, FileManifest],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The first write (the first MiB) blocks until the peer has been read to 3 MiB: a
    fetcher that waited for each write before reading on would never get there (and fail
    on the timeout)."""
    models, manifest = node
    content = os.urandom(8 * MIB)
    read_on = threading.Event()

    def on_chunk(offset: int) -> None:
        if offset >= 3 * MIB:
            read_on.set()

    real_append = fetch._append
    writes: list[int] = []

    def slow_append(part: fetch._Part, data: bytearray, *then: Callable[[], None] | None) -> None:
        if not writes:
            assert read_on.wait(10), "nothing was read while the first write ran"
        writes.append(len(data))
        real_append(part, data, *then)

    monkeypatch.setattr(fetch, "_append", slow_append)
    e = entry_for(content)
    assert fetch_with(FakePeer(content, 64 * 1024, on_chunk=on_chunk), models, manifest, e)
    assert writes[0] == fetch.WRITE_BYTES
    assert (models / e.relpath).read_bytes() == content


def test_a_cut_stream_keeps_what_arrived_and_resumes_after_it(
        node: tuple[Path, FileManifest], monkeypatch: pytest.MonkeyPatch) -> None:
    models, manifest = node
    content = os.urandom(12 * MIB)
    e = entry_for(content)
    assert not fetch_with(FakePeer(content, 256 * 1024, cut_at=7 * MIB), models, manifest, e)
    journal = manifest.transfer(M, e.relpath)
    assert journal is not None
    part = models / part_name(e.relpath)
    # everything that arrived before the cut was written, fsynced and journalled
    assert journal.done == part.stat().st_size == 7 * MIB
    assert part.read_bytes()[:journal.done] == content[:journal.done]

    peer = FakePeer(content, 256 * 1024)
    assert fetch_with(peer, models, manifest, e)
    assert peer.served_from == [journal.done]
    assert (models / e.relpath).read_bytes() == content
    assert manifest.transfer(M, e.relpath) is None


def test_the_journal_advances_during_a_download_never_past_the_synced_bytes(
        node: tuple[Path, FileManifest], monkeypatch: pytest.MonkeyPatch) -> None:
    models, manifest = node
    monkeypatch.setattr(fetch, "CHECKPOINT_BYTES", 2 * MIB)
    content = os.urandom(40 * MIB)  # writes are up to MAX_PENDING (8 MiB) each
    e = entry_for(content)
    seen: list[tuple[int, int]] = []  # (journal's bytes, bytes on disk) at each checkpoint
    real = FileFetcher._checkpoint

    def checkpoint(self: FileFetcher, e: IndexEntry, part: fetch._Part, peer: str) -> None:
        real(self, e, part, peer)
        journal = manifest.transfer(M, e.relpath)
        assert journal is not None
        seen.append((journal.done, os.fstat(part.fd).st_size))

    monkeypatch.setattr(FileFetcher, "_checkpoint", checkpoint)
    assert fetch_with(FakePeer(content, 256 * 1024), models, manifest, e)
    assert len(seen) >= 3, seen  # at writes 2 MiB or more apart, not only at the end
    assert all(done <= on_disk for done, on_disk in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert 0 < seen[0][0] < len(content)


def test_a_full_disk_stops_the_download_with_nothing_published(
        node: tuple[Path, FileManifest], monkeypatch: pytest.MonkeyPatch) -> None:
    models, manifest = node
    content = os.urandom(6 * MIB)
    e = entry_for(content)
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        if offset + len(data) > 3 * MIB:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(fetch.os, "pwrite", pwrite)
    with pytest.raises(OSError, match="No space left"):
        fetch_with(FakePeer(content, 256 * 1024), models, manifest, e)
    assert not (models / e.relpath).exists()
    journal = manifest.transfer(M, e.relpath)
    assert journal is None or journal.done <= 3 * MIB
