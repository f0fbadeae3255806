"""One OpenSSH master per peer, shared by games, files and rsync (real sshd, real data server, real rsync)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench._sshd import SshServer, keygen, sshd_server
from ringsync.daemons.auto_sync import AutoSyncDaemon
from ringsync.daemons.file_sync import FileSyncDaemon
from ringsync.errors import PeerUnreachableError
from ringsync.files.client import FileClient
from ringsync.files.fetch import Exclusions, FileFetcher
from ringsync.files.hashing import hash_file
from ringsync.files.kinds import FileKind
from ringsync.files.manifest import FileManifest
from ringsync.files.plan import FetchJob, IndexEntry, Source
from ringsync.inventory import Host
from ringsync.node import NodeContext
from ringsync.ops.metrics import Metrics
from ringsync.protocol.batch import content_digest
from ringsync.store.gamedb import count_games
from ringsync.transport import ssh_master
from ringsync.transport.files import SshFileClient
from ringsync.transport.rsync import BatchFile, RsyncBatch, RsyncOptions
from ringsync.transport.ssh import SshTransport
from ringsync.transport.ssh_tunnel import SshOptions, SshTunnels
from tests.conftest import TOKEN, make_inventory
from tests.integration.test_files_over_ssh import serve_models
from tests.integration.test_rsync_batch import pytestmark as rsync_marks
from tests.integration.test_ssh_transport import payload_of, ssh_peer

M = FileKind.MODELS
pytestmark = rsync_marks  # bounded; skipped without rsync or sshd


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshServer]:
    with sshd_server(log_level="INFO") as server:  # INFO: one "Accepted publickey" line per login
        yield server


@pytest.fixture
async def source(node_factory: Callable[..., NodeContext], served: Callable[..., Any]) -> NodeContext:
    """A training node (its data server on 127.0.0.1 only) holding one big and six small models."""
    ctx = node_factory()
    models = {f"small/m_{i}.pth": os.urandom(3000 + i) for i in range(6)}
    await serve_models(ctx, served, {"canonical_hex8_2p.pth": os.urandom(2 * 1024 * 1024 + 5), **models})
    return ctx


@dataclass
class Clients:
    """Games, files and rsync, all on one SshTunnels, and the receiving side's files."""

    tunnels: SshTunnels
    games: SshTransport
    files: SshFileClient
    rsync: RsyncBatch
    fetcher: FileFetcher
    manifest: FileManifest
    models: Path

    async def close(self) -> None:
        await self.games.close()
        await self.files.close()
        await self.tunnels.close()
        self.manifest.close()


def make_clients(tmp_path: Path, known_hosts: Path, peer: Host) -> Clients:
    tunnels = SshTunnels(SshOptions(known_hosts=known_hosts, connect_timeout=5.0))
    games = SshTransport("selfplay-1", TOKEN, tunnels)
    files = SshFileClient(FileClient("selfplay-1", TOKEN), tunnels, owned=False)
    models = tmp_path / "here" / "models"
    models.mkdir(parents=True)
    manifest = FileManifest(tmp_path / "here" / "files.db")
    fetcher = FileFetcher({M: models}, manifest, files, Metrics(), {peer.name: peer}.get, Exclusions())
    batch = RsyncBatch(models, RsyncOptions(known_hosts=known_hosts), fetcher.publish_staged,
                       fetcher.reject_copy, tunnels=tunnels)
    return Clients(tunnels, games, files, batch, fetcher, manifest, models)


@pytest.fixture
async def clients(tmp_path: Path, sshd: SshServer, source: NodeContext) -> AsyncIterator[Clients]:
    made = make_clients(tmp_path, sshd.known_hosts, ssh_peer(sshd, source.settings.p2p_port))
    try:
        yield made
    finally:
        await made.close()


def ssh_processes(marker: str) -> list[int]:
    """Live ssh processes whose command line names ``marker`` (a control socket directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(a.endswith(b"ssh") for a in argv[:5]) and marker.encode() in b" ".join(argv):
            found.append(int(entry.name))
    return found


def established_to(port: int) -> int:
    """TCP connections in ESTABLISHED state whose local port is ``port`` (sshd's side)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                count += 1
    return count


async def use_every_path(c: Clients, peer: Host, source: NodeContext, tmp_path: Path) -> None:
    """A games push, a file download and an rsync batch to ``peer``, all over SSH."""
    payload, _ = payload_of(tmp_path, 5)
    assert (await c.games.push_games(peer, payload, content_digest(payload))).inserted == 5
    index = await c.files.index(peer)
    big = next(e for e in index if e.relpath == "canonical_hex8_2p.pth")
    assert await c.fetcher.fetch(FetchJob(big, (Source(peer.name, M, big.relpath),)))
    small = [BatchFile(e, Source(peer.name, M, e.relpath)) for e in index if e.relpath.startswith("small/")]
    result = await c.rsync.fetch(peer, str(source.settings.models_dir), small)
    assert len(result.published) == 6


def _entries(index: list[IndexEntry]) -> dict[str, str]:
    return {e.relpath: e.hash for e in index}


async def test_games_files_and_rsync_share_one_ssh_connection_per_peer(
        tmp_path: Path, sshd: SshServer, source: NodeContext, clients: Clients) -> None:
    peer = ssh_peer(sshd, source.settings.p2p_port)
    logins = sshd.logins()
    await use_every_path(clients, peer, source, tmp_path)
    payload, _ = payload_of(tmp_path / "again", 5)
    assert (await clients.games.push_games(peer, payload, content_digest(payload))).duplicates == 5
    assert len(await clients.files.index(peer)) == 7
    assert sshd.logins() == logins + 1  # one login served games, files and both rsync runs
    assert established_to(sshd.port) == 1
    (tunnel,) = clients.tunnels.tunnels.values()
    marker = str(tunnel.control.parent)
    assert ssh_processes(marker) == [tunnel.master.proc.pid]  # one master, no other ssh running
    assert tunnel.pools
    assert all(p._value == 10 for p in tunnel.pools.values())
    for e in await clients.files.index(peer):
        assert hash_file(clients.models / e.relpath) == e.hash
    assert count_games(source.settings.synced_dir / "hex8_2p.db") == 5

    await clients.games.close()
    await clients.files.close()
    assert ssh_processes(marker) == [tunnel.master.proc.pid]  # the shared master outlives its users
    await clients.tunnels.close()
    assert ssh_processes(marker) == []  # close() leaves no ssh behind
    assert not Path(marker).exists()


async def test_files_holding_every_channel_never_hold_up_a_games_push(
        tmp_path: Path, sshd: SshServer, source: NodeContext, clients: Clients) -> None:
    """Games and files draw from their own channel pools of one connection: long file
    streams on every files channel (a multi-GB NPZ backlog) leave games their own."""
    peer = ssh_peer(sshd, source.settings.p2p_port)
    limit = clients.tunnels.options.max_channels
    held = asyncio.Event()
    release = asyncio.Event()

    async def a_long_file_stream() -> None:
        async with clients.tunnels.channel(peer, "files"):
            held.set()
            await release.wait()

    streams = [asyncio.create_task(a_long_file_stream()) for _ in range(limit)]
    try:
        await asyncio.wait_for(held.wait(), 30)
        await asyncio.sleep(0.1)  # every stream has its channel
        (tunnel,) = clients.tunnels.tunnels.values()
        assert tunnel.slot("files")._value == 0  # the files pool is exhausted
        async with asyncio.timeout(10):  # a games request still gets through at once
            assert len(await clients.games.peer_data_dir_id(peer)) == 32
    finally:
        release.set()
        await asyncio.gather(*streams)


async def test_a_killed_master_is_replaced_on_the_next_request(
        tmp_path: Path, sshd: SshServer, source: NodeContext, clients: Clients) -> None:
    peer = ssh_peer(sshd, source.settings.p2p_port)
    logins = sshd.logins()
    first = await clients.games.peer_data_dir_id(peer)
    (tunnel,) = clients.tunnels.tunnels.values()
    os.kill(tunnel.master.proc.pid, signal.SIGKILL)
    assert await tunnel.master.exit_soon(5.0)
    assert tunnel.lost is not None
    assert await clients.games.peer_data_dir_id(peer) == first  # a new master, transparently
    (replacement,) = clients.tunnels.tunnels.values()
    assert replacement is not tunnel
    assert replacement.master.proc.returncode is None
    assert replacement.control != tunnel.control  # the dead one's socket path is not reused
    assert sshd.logins() == logins + 2
    assert ssh_processes(str(tunnel.control.parent)) == [replacement.master.proc.pid]
    # A master killed while no one watches: the request that meets it says the connection was
    # lost (or is served by a replacement); the one after is served again.
    os.kill(replacement.master.proc.pid, signal.SIGKILL)
    (met,) = await asyncio.gather(clients.files.index(peer), return_exceptions=True)
    if isinstance(met, BaseException):
        assert isinstance(met, PeerUnreachableError)
        where = f"{sshd.user}@127.0.0.1:{sshd.port}"
        assert f"SSH connection to {where} lost (ssh was killed by SIGKILL)" in str(met)
    assert _entries(await clients.files.index(peer))


async def test_a_wrong_host_key_is_refused_naming_the_host_and_the_fix_and_nothing_moves(
        tmp_path: Path, sshd: SshServer, source: NodeContext) -> None:
    impostor = keygen(tmp_path / "impostor").split()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {impostor[0]} {impostor[1]}\n")
    peer = ssh_peer(sshd, source.settings.p2p_port)
    c = make_clients(tmp_path, known_hosts, peer)
    logins = sshd.logins()
    payload, _ = payload_of(tmp_path, 3)
    entry = IndexEntry(M, "canonical_hex8_2p.pth", 10, 1, "0" * 64)
    try:
        refusals = []
        for attempt in (lambda: c.games.push_games(peer, payload, content_digest(payload)),
                        lambda: c.files.index(peer),
                        lambda: c.rsync.fetch(peer, str(source.settings.models_dir),
                                              [BatchFile(entry, Source(peer.name, M, entry.relpath))])):
            with pytest.raises(PeerUnreachableError) as caught:
                await attempt()
            refusals.append(str(caught.value))
        assert c.tunnels.tunnels == {}
    finally:
        await c.close()
    for message in refusals:
        assert message.startswith("train-1: ")
        assert f"SSH host key of 127.0.0.1 port {sshd.port} is unknown or has changed" in message
        assert f"ssh-keygen -R '[127.0.0.1]:{sshd.port}' -f {known_hosts}" in message
        assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {known_hosts}" in message
        assert TOKEN not in message
    assert sshd.logins() == logins  # refused before any login
    assert not source.settings.synced_dir.exists() or not list(source.settings.synced_dir.glob("*.db"))
    assert [p for p in c.models.rglob("*") if p.is_file()] == []


async def test_a_taken_local_port_is_retried_with_another(
        sshd: SshServer, source: NodeContext, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1]])
        monkeypatch.setattr(ssh_master, "_free_port", lambda: next(ports, None) or _any_port())
        tunnels = SshTunnels(SshOptions(known_hosts=sshd.known_hosts))
        games = SshTransport("selfplay-1", TOKEN, tunnels)
        assert tunnels.tunnels == {}
        try:
            assert len(await games.peer_data_dir_id(ssh_peer(sshd, source.settings.p2p_port))) == 32
            (tunnel,) = tunnels.tunnels.values()
            assert tunnel.local.p2p_port != taken.getsockname()[1]
        finally:
            await games.close()
            await tunnels.close()


def _any_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_HOLDER = """
import asyncio, json, sys
from pathlib import Path
from ringsync.inventory import Host
from ringsync.transport.ssh_tunnel import SshOptions, SshTunnels

async def main(spec):
    tunnels = SshTunnels(SshOptions(known_hosts=Path(spec["known_hosts"])))
    async with tunnels.channel(Host(**spec["peer"])):
        (tunnel,) = tunnels.tunnels.values()
        print(json.dumps({"dir": str(tunnel.control.parent), "pid": tunnel.master.proc.pid}), flush=True)
        if spec["how"] == "killed":
            await asyncio.sleep(60)
    # "exits": the process ends without close()

asyncio.run(main(json.loads(sys.argv[1])))
"""


@pytest.mark.parametrize("how", ["killed", "exits"])
def test_no_master_outlives_the_process_that_opened_it(tmp_path: Path, sshd: SshServer, how: str) -> None:
    spec = {"how": how, "known_hosts": str(sshd.known_hosts),
            "peer": {"name": "train-1", "ssh_host": sshd.host, "ssh_port": sshd.port, "ssh_user": sshd.user,
                     "ssh_key": str(sshd.client_key), "p2p_port": _any_port()}}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    with subprocess.Popen([sys.executable, "-c", _HOLDER, json.dumps(spec)], stdout=subprocess.PIPE,
                          text=True, env=env) as proc:
        try:
            assert proc.stdout is not None
            opened = json.loads(proc.stdout.readline())
            if how == "killed":
                assert ssh_processes(opened["dir"]) == [opened["pid"]]
                proc.kill()  # kill -9: no atexit, no close()
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    deadline = time.monotonic() + 10
    while ssh_processes(opened["dir"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ssh_processes(opened["dir"]) == []


async def test_the_node_builds_one_ssh_tunnels_for_games_files_and_rsync(
        node_factory: Callable[..., NodeContext]) -> None:
    inventory = make_inventory()
    inventory.hosts["train-1"] = dataclasses.replace(inventory.hosts["train-1"], transport=("ssh",))
    ctx = node_factory("selfplay-1", inventory=inventory)
    games, files = AutoSyncDaemon(ctx), FileSyncDaemon(ctx)
    assert games._transport._transports["ssh"]._ssh is ctx.ssh()  # type: ignore[attr-defined]
    assert files._client._clients["ssh"].tunnels is ctx.ssh()  # type: ignore[attr-defined]


@pytest.mark.parametrize("failure", ["key not authorized", "nothing listens"])
async def test_a_failed_login_says_why_and_leaves_no_ssh_behind(
        tmp_path: Path, sshd: SshServer, failure: str) -> None:
    if failure == "key not authorized":
        keygen(tmp_path / "stranger")
        peer = Host(name="train-1", ssh_host=sshd.host, ssh_port=sshd.port, ssh_user=sshd.user,
                    ssh_key=str(tmp_path / "stranger"), p2p_port=_any_port())
        says = f"SSH login to {sshd.user}@127.0.0.1:{sshd.port} refused"
    else:
        peer = Host(name="train-1", ssh_host="127.0.0.1", ssh_port=_any_port(), ssh_user=sshd.user,
                    ssh_key=str(sshd.client_key), p2p_port=_any_port())
        says = f"port {peer.ssh_port}: Connection refused"
    tunnels = SshTunnels(SshOptions(known_hosts=sshd.known_hosts))
    try:
        with pytest.raises(PeerUnreachableError) as caught:
            async with tunnels.channel(peer):
                pytest.fail("a channel was given without a login")
        assert tunnels.tunnels == {}
        assert ssh_processes(str(tunnels._dir)) == []  # the failed master is gone
    finally:
        await tunnels.close()
    assert says in str(caught.value)

