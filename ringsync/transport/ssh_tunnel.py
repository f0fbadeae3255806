"""One OpenSSH connection per peer with a local port forwarded to its data server.

Shared by every client that speaks the peer HTTP protocol (games, files) and by rsync:
the far node's data server is reached on its own loopback address through the master's
forward, so a node whose data server listens only on 127.0.0.1 is still reachable, and
rsync's ssh rides the same connection through the master's control socket. A node builds
one ``SshTunnels`` (``NodeContext.ssh``), so a peer costs one SSH connection whatever
runs over it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import hashlib
import itertools
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from ringsync.errors import PeerRejectedError, PeerUnreachableError, TransportError
from ringsync.inventory import Host
from ringsync.settings import Settings
from ringsync.transport.ssh_login import Login, login_from_settings, ssh_where
from ringsync.transport.ssh_master import REMOTE_HOST, Master

__all__ = ["REMOTE_HOST", "SshOptions", "SshTunnels"]

log = logging.getLogger(__name__)

_PROBE = b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
_DYING = 1.0  # seconds a master whose forward stopped answering gets to exit and say why
# sun_path holds 104 bytes on BSDs, 108 on Linux: under the base go ringsync-ssh-XXXXXXXX/,
# <12 hex>-<n>.sock and the 17-character suffix ssh binds before renaming: about 60.
_SOCKET_BASE_MAX = 40


@dataclass(frozen=True, slots=True)
class SshOptions(Login):
    """How SSH connections to peers are made; the host's own fields come from the inventory."""

    max_channels: int = 10  # requests in flight per connection; sshd's MaxSessions defaults to 10

    @classmethod
    def from_settings(cls, s: Settings, **more: Any) -> Self:
        return login_from_settings(cls, s, max_channels=s.ssh_max_channels, **more)


@dataclass(slots=True, eq=False)
class _Tunnel:
    """One SSH connection to a peer and a local port forwarded to its data server."""

    master: Master
    local: Host  # the peer as the HTTP client sees it: 127.0.0.1:<forwarded port>
    max_channels: int
    # One bound per purpose ("games", "files"): a multi-GB training file streaming over
    # every channel never holds up a games push to the same peer.
    pools: dict[str, asyncio.Semaphore] = field(default_factory=dict, repr=False)

    def slot(self, purpose: str) -> asyncio.Semaphore:
        pool = self.pools.get(purpose)
        if pool is None:
            pool = self.pools[purpose] = asyncio.Semaphore(self.max_channels)
        return pool

    @property
    def lost(self) -> str | None:
        return self.master.lost

    @property
    def control(self) -> Path:
        return self.master.control

    async def close(self) -> None:
        await self.master.stop()


class SshTunnels:
    """One SSH connection (an OpenSSH control master) per peer, reused for every request to it.

    Requests on one connection are bounded by ``max_channels`` per purpose (games; files and
    rsync runs), each in-flight request holding one, keepalives notice a dead peer within about
    ``keepalive_interval * (keepalive_count_max + 1)`` seconds, and a connection that was
    lost is replaced on the next request.
    """

    def __init__(self, options: SshOptions) -> None:
        self._options = options
        self.tunnels: dict[str, _Tunnel] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self._dir: Path | None = None  # private (0700) home of the control sockets
        self._generation = itertools.count(1)

    @property
    def options(self) -> SshOptions:
        return self._options

    async def close(self) -> None:
        """Stop every master (none is left running) and remove their socket directory."""
        tunnels, self.tunnels = list(self.tunnels.values()), {}
        for tunnel in tunnels:
            await tunnel.close()
        if self._dir is not None:
            atexit.unregister(self.kill_now)
            self._remove_dir()

    def kill_now(self) -> None:
        """Stop every master without waiting: for process exit, when no event loop may run
        (registered with atexit while a master may be running)."""
        atexit.unregister(self.kill_now)
        for tunnel in self.tunnels.values():
            tunnel.master.kill_now()
        self._remove_dir()

    @contextlib.asynccontextmanager
    async def channel(self, peer: Host, purpose: str = "games") -> AsyncIterator[Host]:
        """The forwarded endpoint of the peer's data server, holding one channel of its
        connection from ``purpose``'s pool.

        A TransportError raised inside is re-typed when the SSH side explains it (the
        connection died, or nothing listens on the far data port)."""
        tunnel = await self._tunnel(peer)
        async with tunnel.slot(purpose):
            mark = tunnel.master.lines_read  # what ssh says from here on is about this request
            try:
                yield tunnel.local
            except TransportError as exc:
                explained = await self._explain(peer, tunnel, exc, mark)
                if explained is exc:
                    raise
                raise explained from exc

    @contextlib.asynccontextmanager
    async def control_path(self, peer: Host) -> AsyncIterator[Path]:
        """The peer's master's control socket, for an ssh (rsync's) to run over the same
        connection (``ssh -S``); one channel of the connection is held meanwhile."""
        tunnel = await self._tunnel(peer)
        async with tunnel.slot("files"):
            yield tunnel.control

    async def _explain(self, peer: Host, tunnel: _Tunnel, exc: TransportError,
                       mark: int) -> TransportError:
        """Say whether the SSH connection died or the far data server is not there (from what
        ssh said after ``mark``)."""
        if isinstance(exc, PeerRejectedError) and tunnel.lost is None:
            return exc  # the data server answered (a refusal): nothing to add
        answered = None if tunnel.lost is not None else await self._probe(tunnel)
        if answered:
            return exc  # the data server is there: the error is its own
        if answered is None or tunnel.master.last_open_failure(mark) is None:
            await tunnel.master.exit_soon(_DYING)  # a dying master gets a moment to say why
        if (lost := tunnel.lost) is not None:
            await self._drop(peer.name, tunnel)
            return PeerUnreachableError(peer.name, f"SSH connection to {ssh_where(peer)} lost ({lost}); "
                                                   f"the request was cut off: {exc.reason}")
        if answered is False:
            why = tunnel.master.last_open_failure(mark) or "the channel was closed"
            return PeerUnreachableError(peer.name, f"SSH to {ssh_where(peer)} works, but {REMOTE_HOST}:"
                                                   f"{peer.p2p_port} on it refused a connection ({why}); "
                                                   f"is its data server running on p2p_port {peer.p2p_port}?")
        return exc

    async def _probe(self, tunnel: _Tunnel) -> bool | None:
        """Whether the far data server answers through the forward (True), the forward's
        channel was refused (False), or neither could be told (None: the forward itself is gone,
        or no answer in time)."""
        try:
            async with asyncio.timeout(self._options.connect_timeout):
                reader, writer = await asyncio.open_connection("127.0.0.1", tunnel.local.p2p_port)
                try:
                    writer.write(_PROBE)
                    await writer.drain()
                    return bool(await reader.read(1))
                except ConnectionError:
                    return False  # ssh accepted, then dropped it: the far end refused the channel
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            return None

    async def _tunnel(self, peer: Host) -> _Tunnel:
        lock = self._connecting.setdefault(peer.name, asyncio.Lock())
        async with lock:  # concurrent requests share one new connection
            tunnel = self.tunnels.get(peer.name)
            if tunnel is not None and tunnel.lost is not None:
                log.info("SSH connection to %s (%s) was lost (%s); reconnecting",
                         peer.name, ssh_where(peer), tunnel.lost)
                await self._drop(peer.name, tunnel)
                tunnel = None
            if tunnel is None:
                tunnel = await self._open(peer)
                self.tunnels[peer.name] = tunnel
            return tunnel

    async def _drop(self, name: str, tunnel: _Tunnel) -> None:
        if self.tunnels.get(name) is tunnel:
            del self.tunnels[name]
        await tunnel.close()

    async def _open(self, peer: Host) -> _Tunnel:
        master = await Master.start(peer, self._options, self._control(peer))
        local = dataclasses.replace(peer, p2p_host="127.0.0.1", tailscale_ip=None, ssh_host=None,
                                    p2p_port=master.local_port)
        log.info("SSH connection to %s (%s) open; its data server is forwarded to 127.0.0.1:%d",
                 peer.name, ssh_where(peer), local.p2p_port)
        return _Tunnel(master, local, self._options.max_channels)

    def _control(self, peer: Host) -> Path:
        """A fresh socket path per master: a dying master removes its own path on exit, so its
        successor must not share it."""
        if self._dir is None:
            base = tempfile.gettempdir()
            self._dir = Path(tempfile.mkdtemp(prefix="ringsync-ssh-",
                                              dir=base if len(base) <= _SOCKET_BASE_MAX else "/tmp"))
            atexit.register(self.kill_now)
        name = hashlib.blake2s(f"{peer.name}|{ssh_where(peer)}".encode(), digest_size=6).hexdigest()
        return self._dir / f"{name}-{next(self._generation)}.sock"

    def _remove_dir(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
