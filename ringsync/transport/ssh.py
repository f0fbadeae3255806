"""SSH transport: the peer protocol carried through one SSH connection per peer (OpenSSH).

The far node's data server is reached on its own loopback address through a direct-tcpip
channel (the master's local port forward, ``ssh_tunnel``), so one protocol and one client serve HTTP
and SSH alike, and a node whose data server listens only on 127.0.0.1 is still reachable.
"""

from __future__ import annotations

import logging

from ringsync.inventory import Host
from ringsync.policy.bandwidth import BandwidthLimiter
from ringsync.protocol.results import MergeResult
from ringsync.transport.http import HttpTransport
from ringsync.transport.ssh_tunnel import REMOTE_HOST, SshOptions, SshTunnels, _Tunnel

__all__ = ["REMOTE_HOST", "SshOptions", "SshTransport"]

log = logging.getLogger(__name__)


class SshTransport:
    """GameTransport over SSH: pushes go through the peer's SshTunnels channel."""

    name = "ssh"

    def __init__(self, node_id: str, token: str | None, ssh: SshOptions | SshTunnels, *,
                 read_timeout: float = 120.0, limiter: BandwidthLimiter | None = None) -> None:
        # ``ssh``: the node's shared tunnels (files and rsync use the same connections, and the
        # node closes them), or the options of tunnels of our own, closed with us.
        self._owned = isinstance(ssh, SshOptions)
        self._ssh = SshTunnels(ssh) if isinstance(ssh, SshOptions) else ssh
        self._http = HttpTransport(node_id, token, read_timeout=read_timeout, limiter=limiter)

    @property
    def _tunnels(self) -> dict[str, _Tunnel]:
        return self._ssh.tunnels

    async def push_games(self, peer: Host, payload: bytes, digest: str, *,
                         data_dir_id: str | None = None) -> MergeResult:
        async with self._ssh.channel(peer) as local:
            return await self._http.push_games(local, payload, digest, data_dir_id=data_dir_id)

    async def peer_data_dir_id(self, peer: Host) -> str:
        async with self._ssh.channel(peer) as local:
            return await self._http.peer_data_dir_id(local)

    async def close(self) -> None:
        if self._owned:
            await self._ssh.close()
        await self._http.close()
