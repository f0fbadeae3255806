"""SshTransport against a real OpenSSH sshd and a real data server on loopback."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench._sshd import SshServer, sshd_server
from ringsync.errors import PeerRejectedError, TransportError
from ringsync.inventory import Host
from ringsync.localcluster import free_port
from ringsync.node import NodeContext
from ringsync.policy.breaker import BreakerConfig, Breakers, BreakerState
from ringsync.protocol.batch import content_digest, encode_batch
from ringsync.store.gamedb import count_games
from ringsync.transport.http import HttpTransport
from ringsync.transport.select import TransportChain
from ringsync.transport.ssh import SshOptions, SshTransport
from tests.conftest import TOKEN, extract_batches, write_games

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(shutil.which("sshd") is None and not Path("/usr/sbin/sshd").exists(),
                                 reason="OpenSSH sshd is not installed (apt-get install openssh-server)")]


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshServer]:
    with sshd_server() as server:
        yield server


def ssh_peer(server: SshServer, data_port: int, **fields: Any) -> Host:
    """The data server listens on 127.0.0.1 only: its p2p address here is not reachable directly."""
    fields.setdefault("p2p_host", "127.0.0.2")
    return Host(name="train-1", role="gpu_training_primary", ssh_host=server.host, ssh_port=server.port,
                ssh_user=server.user, ssh_key=str(server.client_key), p2p_port=data_port, **fields)


@pytest.fixture
async def receiver(node_factory: Callable[..., NodeContext], served: Callable[..., Any]) -> NodeContext:
    """A training node's real data server on 127.0.0.1."""
    ctx = node_factory()
    await served(ctx)
    return ctx


def payload_of(tmp_path: Path, n: int) -> tuple[bytes, int]:
    write_games(tmp_path / "src" / "selfplay.db", n)
    (batch,) = extract_batches(tmp_path / "src" / "selfplay.db")
    return encode_batch(batch), n


async def test_push_over_ssh_merges_each_game_once_through_one_connection(
        tmp_path: Path, sshd: SshServer, receiver: NodeContext) -> None:
    ctx = receiver
    payload, n = payload_of(tmp_path, 8)
    transport = SshTransport("selfplay-1", TOKEN, SshOptions(known_hosts=sshd.known_hosts, max_channels=3))
    counted = transport._http = _Concurrency(transport._http)  # type: ignore[assignment]
    peer = ssh_peer(sshd, ctx.settings.p2p_port)
    try:
        results = await asyncio.gather(*(transport.push_games(peer, payload, content_digest(payload))
                                         for _ in range(6)))
        assert sum(r.inserted for r in results) == n
        assert sum(r.duplicates for r in results) == 5 * n
        assert len(await transport.peer_data_dir_id(peer)) == 32
        assert len(transport._tunnels) == 1  # one SSH connection served every request
        assert counted.peak == 3  # never more requests on the connection than channels allowed
        assert transport._tunnels["train-1"].slot("games")._value == 3  # every channel given back
    finally:
        await transport.close()
    assert count_games(ctx.settings.synced_dir / "hex8_2p.db") == n


async def test_an_unknown_host_key_is_refused_with_the_fix_and_nothing_is_sent(
        tmp_path: Path, sshd: SshServer, receiver: NodeContext) -> None:
    ctx = receiver
    payload, _ = payload_of(tmp_path, 3)
    other = tmp_path / "known_hosts"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    key = (tmp_path / "k.pub").read_text().split()[:2]
    other.write_text(f"[{sshd.host}]:{sshd.port} {' '.join(key)}\n")  # someone else's key
    for known_hosts in (other, tmp_path / "missing_known_hosts"):
        transport = SshTransport("selfplay-1", TOKEN, SshOptions(known_hosts=known_hosts))
        try:
            with pytest.raises(TransportError) as err:
                await transport.push_games(ssh_peer(sshd, ctx.settings.p2p_port), payload,
                                           content_digest(payload))
        finally:
            await transport.close()
        message = str(err.value)
        assert message.startswith("train-1: ")
        assert f"ssh-keyscan -p {sshd.port} {sshd.host} >> {known_hosts}" in message
        assert TOKEN not in message
    assert not ctx.settings.synced_dir.exists() or not list(ctx.settings.synced_dir.glob("*.db"))


async def test_a_data_server_that_is_not_there_is_named(tmp_path: Path, sshd: SshServer) -> None:
    payload, _ = payload_of(tmp_path, 1)
    transport = SshTransport("selfplay-1", TOKEN, SshOptions(known_hosts=sshd.known_hosts))
    try:
        with pytest.raises(TransportError, match=r"SSH to .* works, but 127\.0\.0\.1:\d+ on it refused"):
            await transport.push_games(ssh_peer(sshd, free_port()), payload, content_digest(payload))
    finally:
        await transport.close()


async def test_chain_falls_back_to_ssh_and_keeps_using_it(
        tmp_path: Path, sshd: SshServer, receiver: NodeContext) -> None:
    ctx = receiver
    payload, n = payload_of(tmp_path, 4)
    # HTTP is pointed at a port nobody listens on; SSH reaches the data server on loopback.
    peer = ssh_peer(sshd, ctx.settings.p2p_port, p2p_host="127.0.0.1", transport=("http", "ssh"))
    http = HttpTransport("selfplay-1", TOKEN)
    wrong = Host(name="train-1", p2p_host="127.0.0.1", p2p_port=free_port())
    chain = TransportChain({"http": _Redirect(http, wrong),
                            "ssh": SshTransport("selfplay-1", TOKEN, SshOptions(sshd.known_hosts))},
                           ("http",), Breakers(BreakerConfig(failure_threshold=1)))
    try:
        first = await chain.push_games(peer, payload, content_digest(payload))
        assert first.inserted == n
        # HTTP's breaker for the peer opened on its failure: the next push skips it.
        assert [b.state for b in chain.circuits(peer)] == [BreakerState.OPEN, BreakerState.CLOSED]
        bad = b"x" * 100
        with pytest.raises(PeerRejectedError):  # the peer answered: no fallback to HTTP
            await chain.push_games(peer, bad, content_digest(bad))
    finally:
        await chain.close()


class _Redirect:
    """HTTP to a fixed (dead) endpoint, whatever the peer says."""

    name = "http"

    def __init__(self, http: Any, target: Host) -> None:
        self._http, self._target = http, target

    async def push_games(self, peer: Host, payload: bytes, digest: str, **kw: Any) -> Any:
        return await self._http.push_games(self._target, payload, digest, **kw)

    async def peer_data_dir_id(self, peer: Host) -> str:
        return str(await self._http.peer_data_dir_id(self._target))

    async def close(self) -> None:
        await self._http.close()


class _Concurrency:
    """Counts the requests in flight through the wrapped HTTP client."""

    def __init__(self, http: HttpTransport) -> None:
        self._http, self.now, self.peak = http, 0, 0

    async def push_games(self, peer: Host, payload: bytes, digest: str, **kw: Any) -> Any:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await asyncio.sleep(0.05)  # let every waiting request try to get in
            return await self._http.push_games(peer, payload, digest, **kw)
        finally:
            self.now -= 1

    async def peer_data_dir_id(self, peer: Host) -> str:
        return await self._http.peer_data_dir_id(peer)

    async def close(self) -> None:
        await self._http.close()
