"""Models fetched over the SSH tunnel from a data server that listens only on 127.0.0.1 (real sshd)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench._sshd import SshServer, sshd_server
from ringsync.files.client import FileClient
from ringsync.files.fetch import Exclusions, FileFetcher
from ringsync.files.hashing import hash_file
from ringsync.files.kinds import FileKind, part_name
from ringsync.files.layout import file_dirs, manifest_path
from ringsync.files.manifest import FileManifest, Transfer
from ringsync.files.plan import FetchJob, Source
from ringsync.files.scanner import FileScanner
from ringsync.inventory import Host
from ringsync.node import NodeContext
from ringsync.ops.metrics import Metrics
from ringsync.policy.breaker import BreakerConfig, Breakers, BreakerState
from ringsync.transport.files import FileClientChain, SshFileClient
from ringsync.transport.ssh_tunnel import SshOptions, SshTunnels
from tests.conftest import TOKEN

M = FileKind.MODELS
SIZE = 3 * 1024 * 1024 + 17
pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(not Path("/usr/sbin/sshd").exists(),
                                 reason="OpenSSH sshd is not installed (apt-get install openssh-server)")]


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshServer]:
    with sshd_server() as server:
        yield server


@pytest.fixture
async def source(node_factory: Callable[..., NodeContext], served: Callable[..., Any]) -> NodeContext:
    """A training node holding a model; its data server listens on 127.0.0.1 only."""
    ctx = node_factory()
    await serve_models(ctx, served, {"canonical_hex8_2p.pth": os.urandom(SIZE)})
    return ctx


async def serve_models(ctx: NodeContext, served: Callable[..., Any], models: dict[str, bytes]) -> None:
    """Write settled models at ``ctx``, record them in its manifest, and start its data server."""
    for relpath, data in models.items():
        path = ctx.settings.models_dir / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (1, 1))  # settled
    manifest = FileManifest(manifest_path(ctx.settings))
    try:
        FileScanner(file_dirs(ctx.settings), manifest, 5.0).scan()
    finally:
        manifest.close()
    await served(ctx)


@pytest.fixture
async def chain(sshd: SshServer) -> AsyncIterator[FileClientChain]:
    ssh = SshFileClient(FileClient("selfplay-1", TOKEN), SshTunnels(SshOptions(known_hosts=sshd.known_hosts)))
    # One failure opens a breaker here: the fetch after the index goes straight to SSH.
    client = FileClientChain({"http": FileClient("selfplay-1", TOKEN), "ssh": ssh}, ("http", "ssh"),
                             Breakers(BreakerConfig(failure_threshold=1)))
    yield client
    await client.close()


def peer_of(server: SshServer, ctx: NodeContext) -> Host:
    # 127.0.0.2: nothing listens there, so HTTP cannot reach it and SSH must.
    return Host(name="train-1", role="gpu_training_primary", ssh_host=server.host, ssh_port=server.port,
                ssh_user=server.user, ssh_key=str(server.client_key), p2p_host="127.0.0.2",
                p2p_port=ctx.settings.p2p_port)


async def test_a_model_reaches_a_node_whose_data_server_listens_only_on_loopback(
        tmp_path: Path, sshd: SshServer, source: NodeContext, chain: FileClientChain) -> None:
    peer = peer_of(sshd, source)
    (entry,) = await chain.index(peer)
    # HTTP could not reach it (its breaker for train-1 is open); SSH did.
    assert [b.state for b in chain.circuits(peer)] == [BreakerState.OPEN, BreakerState.CLOSED]
    models, metrics = tmp_path / "here" / "models", Metrics()
    manifest = FileManifest(tmp_path / "here" / "files.db")
    try:
        fetcher = FileFetcher({M: models}, manifest, chain, metrics, {peer.name: peer}.get, Exclusions())
        assert await fetcher.fetch(FetchJob(entry, (Source(peer.name, M, entry.relpath),)))
    finally:
        manifest.close()
    held = source.settings.models_dir / entry.relpath
    assert hash_file(models / entry.relpath) == entry.hash == hash_file(held)
    assert metrics.file_bytes_fetched.labels(kind="models")._value.get() == SIZE


async def test_a_download_over_ssh_resumes_with_a_range_request(
        tmp_path: Path, sshd: SshServer, source: NodeContext, chain: FileClientChain) -> None:
    peer = peer_of(sshd, source)
    (entry,) = await chain.index(peer)
    models, metrics = tmp_path / "here" / "models", Metrics()
    models.mkdir(parents=True)
    held = (source.settings.models_dir / entry.relpath).read_bytes()
    done = 2 * 1024 * 1024
    (models / part_name(entry.relpath)).write_bytes(held[:done])  # an earlier run got this far
    manifest = FileManifest(tmp_path / "here" / "files.db")
    try:
        manifest.save_transfer(Transfer(M, entry.relpath, entry.hash, entry.size, entry.mtime_ns, done,
                                        peer.name))
        fetcher = FileFetcher({M: models}, manifest, chain, metrics, {peer.name: peer}.get, Exclusions())
        assert await fetcher.fetch(FetchJob(entry, (Source(peer.name, M, entry.relpath),)))
    finally:
        manifest.close()
    assert (models / entry.relpath).read_bytes() == held
    assert metrics.file_bytes_fetched.labels(kind="models")._value.get() == SIZE - done  # only the rest
