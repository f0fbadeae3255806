"""Atomic publication and ContentDeduplicator (ringsync.files.publish, fetch)."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ringsync.files.client import FileClient
from ringsync.files.fetch import Exclusions, FileFetcher
from ringsync.files.hashing import hash_file
from ringsync.files.kinds import FileKind, part_name
from ringsync.files.manifest import FileManifest, FileRecord
from ringsync.files.plan import FetchJob, IndexEntry, Source
from ringsync.files.publish import publish_file
from ringsync.ops.metrics import Metrics

M = FileKind.MODELS


def test_a_reader_sees_the_old_file_or_the_new_one_never_a_part(tmp_path: Path) -> None:
    final = tmp_path / "canonical_x.pth"
    versions = [bytes([i]) * 2_000_000 for i in range(8)]
    final.write_bytes(versions[0])
    seen: list[int] = []
    bad: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            data = final.read_bytes()
            if data not in versions:
                bad.append(f"{len(data)} bytes")
            seen.append(len(data))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i, data in enumerate(versions[1:], start=1):
            part = final.with_name(part_name(final.name))
            with part.open("wb") as f:  # written in pieces, as a download is
                for k in range(0, len(data), 100_000):
                    f.write(data[k:k + 100_000])
            st = publish_file(part, final, mtime_ns=i * 1_000_000_000)
            assert not part.exists()
            assert st.st_mtime_ns == i * 1_000_000_000
    finally:
        stop.set()
        thread.join()
    assert bad == []
    assert len(seen) > 10
    assert final.read_bytes() == versions[-1]


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[FileFetcher, FileManifest, dict[FileKind, Path], Metrics]]:
    dirs = {M: tmp_path / "models", FileKind.TRAINING_DATA: tmp_path / "training"}
    dirs[M].mkdir()
    manifest = FileManifest(tmp_path / "state" / "files.db")
    metrics = Metrics()
    fetcher = FileFetcher(dirs, manifest, FileClient("me", None), metrics, lambda name: None,
                          Exclusions())
    yield fetcher, manifest, dirs, metrics
    manifest.close()


def held(dirs: dict[FileKind, Path], manifest: FileManifest, relpath: str, data: bytes) -> str:
    path = dirs[M] / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    st = os.lstat(path)
    digest = hash_file(path)
    manifest.record(FileRecord(M, relpath, st.st_size, st.st_mtime_ns, st.st_ino, digest))
    return digest


def job_for(relpath: str, digest: str, size: int) -> FetchJob:
    # The only source is unknown to us: had the content been downloaded, fetch() would fail.
    return FetchJob(IndexEntry(M, relpath, size, 5_000_000_000, digest), (Source("gone", M, "x.pth"),))


async def test_content_held_under_another_name_is_hard_linked_not_downloaded(setup) -> None:
    fetcher, manifest, dirs, metrics = setup
    digest = held(dirs, manifest, "production/hex8_2p/model_1.pth", b"weights" * 1000)
    assert await fetcher.fetch(job_for("candidate_hex8_2p.pth", digest, 7000))
    new, old = dirs[M] / "candidate_hex8_2p.pth", dirs[M] / "production/hex8_2p/model_1.pth"
    assert os.stat(new).st_ino == os.stat(old).st_ino
    assert manifest.get(M, "candidate_hex8_2p.pth").hash == digest  # type: ignore[union-attr]
    assert metrics.files_published.labels(kind="models", how="linked")._value.get() == 1
    assert not await fetcher.fetch(job_for("other.pth", "f" * 64, 10))  # not held: needs a peer


async def test_where_linking_fails_the_content_is_copied_and_verified(
        setup, monkeypatch: pytest.MonkeyPatch) -> None:
    fetcher, manifest, dirs, metrics = setup
    digest = held(dirs, manifest, "a.pth", b"abc" * 1000)

    def cross_device(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    assert await fetcher.fetch(job_for("b.pth", digest, 3000))
    assert os.stat(dirs[M] / "b.pth").st_ino != os.stat(dirs[M] / "a.pth").st_ino
    assert hash_file(dirs[M] / "b.pth") == digest
    assert os.stat(dirs[M] / "b.pth").st_mtime_ns == 5_000_000_000  # the source's version
    assert metrics.files_published.labels(kind="models", how="copied")._value.get() == 1


async def test_a_changed_holder_is_not_reused(setup) -> None:
    fetcher, manifest, dirs, _ = setup
    digest = held(dirs, manifest, "a.pth", b"abc" * 1000)
    (dirs[M] / "a.pth").write_bytes(b"rewritten in place")
    assert not await fetcher.fetch(job_for("b.pth", digest, 3000))
    assert not (dirs[M] / "b.pth").exists()


async def test_a_name_rewritten_in_place_is_copied_not_linked(setup) -> None:
    # auto_promote copies onto canonical_*.pth in place: a hard link would change its twin too.
    fetcher, manifest, dirs, metrics = setup
    digest = held(dirs, manifest, "production/sq8_2p/m_1.pth", b"w" * 5000)
    assert await fetcher.fetch(job_for("canonical_sq8_2p.pth", digest, 5000))
    canonical, twin = dirs[M] / "canonical_sq8_2p.pth", dirs[M] / "production/sq8_2p/m_1.pth"
    assert os.stat(canonical).st_ino != os.stat(twin).st_ino
    with canonical.open("r+b") as f:
        f.write(b"promoted")
    assert twin.read_bytes() == b"w" * 5000
    assert metrics.files_published.labels(kind="models", how="copied")._value.get() == 1
