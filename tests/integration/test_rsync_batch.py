"""RsyncBatch against a real OpenSSH sshd and real rsync on loopback."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench._sshd import SshServer, keygen, sshd_server
from ringsync.errors import PeerUnreachableError
from ringsync.files.client import FileClient
from ringsync.files.fetch import Exclusions, FileFetcher
from ringsync.files.hashing import hash_file
from ringsync.files.kinds import FileKind
from ringsync.files.manifest import FileManifest
from ringsync.files.plan import FetchJob, IndexEntry, Source
from ringsync.inventory import Host
from ringsync.ops.metrics import Metrics
from ringsync.transport.rsync import PARTIAL_DIR, STAGING_DIR, BatchFile, RsyncBatch, RsyncOptions, batches

M = FileKind.MODELS
pytestmark = [pytest.mark.timeout(90),
              pytest.mark.skipif(shutil.which("rsync") is None or not Path("/usr/sbin/sshd").exists(),
                                 reason="rsync or OpenSSH sshd is not installed (apt-get install rsync "
                                        "openssh-server)")]


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshServer]:
    with sshd_server() as server:
        yield server


@dataclass
class Node:
    """The receiving side: its models dir, manifest, fetcher, and the peer's files."""

    models: Path
    remote: Path
    manifest: FileManifest
    fetcher: FileFetcher
    exclusions: Exclusions
    metrics: Metrics


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    models, remote = tmp_path / "models", tmp_path / "peer-models"
    models.mkdir()
    remote.mkdir()
    manifest = FileManifest(tmp_path / "state" / "files.db")
    metrics, exclusions = Metrics(), Exclusions()
    fetcher = FileFetcher({M: models}, manifest, FileClient("me", None), metrics, lambda _: None, exclusions)
    yield Node(models, remote, manifest, fetcher, exclusions, metrics)
    manifest.close()


def peer_of(server: SshServer) -> Host:
    return Host(name="train-1", role="gpu_training_primary", ssh_host=server.host, ssh_port=server.port,
                ssh_user=server.user, ssh_key=str(server.client_key), transport=("ssh",))


def offer(node: Node, relpath: str, data: bytes) -> BatchFile:
    """Write a file at the peer and return the index entry it would publish for it."""
    path = node.remote / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    st = path.stat()
    entry = IndexEntry(M, relpath, st.st_size, st.st_mtime_ns, hash_file(path))
    return BatchFile(entry, Source("train-1", M, relpath))


def batch_for(node: Node, server: SshServer, **opts: object) -> RsyncBatch:
    options = RsyncOptions(known_hosts=server.known_hosts, **opts)  # type: ignore[arg-type]
    return RsyncBatch(node.models, options, node.fetcher.publish_staged, node.fetcher.reject_copy)


def visible(models: Path) -> dict[str, bytes]:
    """Every file a reader of models/ sees (dot-dirs and dot-files are not shipped names)."""
    seen = {}
    for current, dirnames, filenames in os.walk(models):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                path = Path(current, name)
                seen[path.relative_to(models).as_posix()] = path.read_bytes()
    return seen


async def test_a_batch_arrives_verified_and_is_published_atomically(sshd: SshServer, node: Node) -> None:
    files = [offer(node, f"sub{i % 3}/model_{i}.pth", os.urandom(1000 + 37 * i)) for i in range(40)]
    expected = {f.entry.relpath: (node.remote / f.entry.relpath).read_bytes() for f in files}
    partial: list[str] = []
    stop = threading.Event()

    def reader() -> None:  # a reader of models/ must only ever see complete, correct files
        while not stop.is_set():
            for relpath, data in visible(node.models).items():
                if expected.get(relpath) != data:
                    partial.append(relpath)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        result = await batch_for(node, sshd).fetch(peer_of(sshd), str(node.remote), files)
    finally:
        stop.set()
        thread.join()
    assert partial == []
    assert sorted(e.relpath for e in result.published) == sorted(expected)
    assert result.corrupt == []
    assert result.missing == []
    assert visible(node.models) == expected
    for f in files:
        rec = node.manifest.get(M, f.entry.relpath)
        assert rec is not None
        assert rec.hash == f.entry.hash
        assert (node.models / f.entry.relpath).stat().st_mtime_ns == f.entry.mtime_ns
    assert not (node.models / STAGING_DIR).exists()  # nothing left behind after a clean run


async def test_a_wrong_host_key_is_refused_with_the_fix_and_nothing_is_written(
        tmp_path: Path, sshd: SshServer, node: Node) -> None:
    other = keygen(tmp_path / "impostor").split()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n")
    files = [offer(node, f"model_{i}.pth", os.urandom(5000)) for i in range(5)]
    batch = RsyncBatch(node.models, RsyncOptions(known_hosts=known_hosts), node.fetcher.publish_staged,
                       node.fetcher.reject_copy)
    with pytest.raises(PeerUnreachableError) as caught:
        await batch.fetch(peer_of(sshd), str(node.remote), files)
    message = str(caught.value)
    for says in ("host key", "127.0.0.1", str(sshd.port), "ssh-keyscan", str(known_hosts)):
        assert says in message  # names the host and the fix
    assert visible(node.models) == {}
    staged = [p for p in (node.models / STAGING_DIR).rglob("*") if p.is_file()]
    assert staged == []
    assert node.manifest.records() == []


async def test_a_missing_known_hosts_file_is_refused_before_any_connection(
        tmp_path: Path, sshd: SshServer, node: Node) -> None:
    files = [offer(node, "model_0.pth", b"x" * 100)]
    batch = RsyncBatch(node.models, RsyncOptions(known_hosts=tmp_path / "absent"),
                       node.fetcher.publish_staged, node.fetcher.reject_copy)
    with pytest.raises(PeerUnreachableError, match="RINGRIFT_SSH_KNOWN_HOSTS"):
        await batch.fetch(peer_of(sshd), str(node.remote), files)
    assert visible(node.models) == {}


async def test_a_file_corrupted_at_the_source_is_detected_and_not_published(
        sshd: SshServer, node: Node) -> None:
    files = [offer(node, f"model_{i}.pth", os.urandom(4096)) for i in range(6)]
    bad = files[2].entry
    (node.remote / bad.relpath).write_bytes(os.urandom(bad.size))  # same size, other bytes
    result = await batch_for(node, sshd).fetch(peer_of(sshd), str(node.remote), files)
    assert result.corrupt == [bad]
    assert len(result.published) == 5
    assert bad.relpath not in visible(node.models)
    assert node.manifest.get(M, bad.relpath) is None
    assert node.exclusions.by_hash[bad.hash] == {"train-1"}  # not asked for this content again
    assert node.metrics.file_hash_mismatches.labels(kind="models")._value.get() == 1
    assert not list((node.models / STAGING_DIR).rglob(Path(bad.relpath).name))  # discarded


async def test_a_file_removed_at_the_peer_is_missing_and_the_rest_is_published(
        sshd: SshServer, node: Node) -> None:
    files = [offer(node, f"model_{i}.pth", os.urandom(3000)) for i in range(4)]
    (node.remote / "model_1.pth").unlink()  # gone since the index was read
    result = await batch_for(node, sshd).fetch(peer_of(sshd), str(node.remote), files)
    assert [e.relpath for e in result.missing] == ["model_1.pth"]
    assert sorted(e.relpath for e in result.published) == ["model_0.pth", "model_2.pth", "model_3.pth"]
    assert result.corrupt == []


async def test_an_interrupted_rsync_resumes_from_its_partial_file(sshd: SshServer, node: Node) -> None:
    size = 48 * 1024 * 1024
    files = [offer(node, "big.pth", os.urandom(size)), offer(node, "small.pth", os.urandom(1000))]
    batch = batch_for(node, sshd, extra_args=("--bwlimit=12m",))  # ~4 s: time to interrupt it
    staging = batch.staging("train-1")
    task = asyncio.create_task(batch.fetch(peer_of(sshd), str(node.remote), files))
    await _until(lambda: _temp_bytes(staging) > 8 * 1024 * 1024, 30)
    task.cancel()  # what a daemon's shutdown does: rsync is stopped and keeps its partial file
    with pytest.raises(asyncio.CancelledError):
        await task
    kept = staging / PARTIAL_DIR / "big.pth"
    assert kept.is_file()
    assert kept.stat().st_size > 8 * 1024 * 1024
    assert "big.pth" not in visible(node.models)
    result = await batch_for(node, sshd).fetch(peer_of(sshd), str(node.remote), files)
    assert sorted(e.relpath for e in result.published) == ["big.pth", "small.pth"]
    assert visible(node.models)["big.pth"] == (node.remote / "big.pth").read_bytes()
    # The resumed run fetched only what the partial file lacked (plus rsync's checksums).
    assert result.bytes_received < size - 4 * 1024 * 1024


def test_batches_group_many_files_owed_by_one_ssh_peer_and_leave_the_rest() -> None:
    def job(relpath: str, *peers: str) -> FetchJob:
        e = IndexEntry(M, relpath, 10, 1, (relpath.encode().hex() * 64)[:64])
        return FetchJob(e, tuple(Source(p, M, relpath) for p in peers))

    jobs = [job(f"a{i}.pth", "http-only", "ssh-1") for i in range(5)] + [job("b.pth", "ssh-2")]
    hosts = {"ssh-1": Host("ssh-1", transport=("ssh",)), "ssh-2": Host("ssh-2", transport=("ssh",))}
    groups = batches(jobs, hosts.get, {}, min_files=3)
    assert list(groups) == [("ssh-1", M)]
    assert len(groups["ssh-1", M]) == 5
    excluded = {jobs[0].entry.hash: {"ssh-1"}}
    assert len(batches(jobs, hosts.get, excluded, min_files=3)["ssh-1", M]) == 4
    assert batches(jobs, hosts.get, {}, min_files=0) == {}


def _temp_bytes(staging: Path) -> int:
    if not staging.exists():
        return 0
    return sum(p.stat().st_size for p in staging.rglob(".big.pth.*") if p.is_file())


async def _until(condition: Callable[[], bool], within: float) -> None:
    """rsync's temp file has no event to await: poll it, bounded."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
