"""One SSH connection per peer with a local port forwarded to its data server (asyncssh).

Shared by every client that speaks the peer HTTP protocol (games, files): the far node's
data server is reached on its own loopback address through direct-tcpip channels, so a
node whose data server listens only on 127.0.0.1 is still reachable. The host-key and
address helpers are shared with the rsync path, which runs OpenSSH itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from ringsync.errors import PeerRejectedError, PeerUnreachableError, TransportError
from ringsync.inventory import Host
from ringsync.settings import Settings

with warnings.catch_warnings():
    # asyncssh still imports cryptography's DSA names, which warn on import; DSA keys are never used.
    warnings.simplefilter("ignore", UserWarning)
    import asyncssh

log = logging.getLogger(__name__)

REMOTE_HOST = "127.0.0.1"  # where the far node's data server is reached, seen from that node
_CLOSE_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class SshOptions:
    """How SSH connections to peers are made; the host's own fields come from the inventory."""

    known_hosts: Path
    max_channels: int = 10  # per connection; sshd's MaxSessions defaults to 10
    keepalive_interval: float = 3.0
    keepalive_count_max: int = 3
    connect_timeout: float = 10.0
    # AES-GCM first: asyncssh runs it as one OpenSSL call per packet, while its
    # chacha20-poly1305 (the default it negotiates with OpenSSH) takes three cipher contexts
    # per packet in Python; profiled on a 128 MiB model over SSH, that was most of the CPU.
    encryption_algs: tuple[str, ...] = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                                        "chacha20-poly1305@openssh.com", "aes128-ctr", "aes256-ctr")

    @classmethod
    def from_settings(cls, s: Settings) -> SshOptions:
        return cls(known_hosts=s.ssh_known_hosts, max_channels=s.ssh_max_channels,
                   keepalive_interval=s.ssh_keepalive_interval,
                   keepalive_count_max=s.ssh_keepalive_count_max,
                   connect_timeout=s.ssh_connect_timeout)


class _Watcher(asyncssh.SSHClient):
    """Remembers why the connection ended (a keepalive timeout, a reset...)."""

    def __init__(self) -> None:
        self.lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(f"{type(exc).__name__}: {exc}" if exc else "closed by the peer")


@dataclass(slots=True)
class _Tunnel:
    """One SSH connection to a peer and a local port forwarded to its data server."""

    conn: asyncssh.SSHClientConnection
    watcher: _Watcher
    listener: asyncssh.SSHListener
    local: Host  # the peer as the HTTP client sees it: 127.0.0.1:<forwarded port>
    channels: asyncio.Semaphore

    @property
    def lost(self) -> str | None:
        return self.watcher.lost.result() if self.watcher.lost.done() else None

    async def close(self) -> None:
        self.listener.close()
        self.conn.close()
        with contextlib.suppress(asyncssh.Error, OSError, TimeoutError):
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await self.conn.wait_closed()


class SshTunnels:
    """One SSH connection per peer, reused for every request to it.

    Requests on one connection are bounded by ``max_channels`` (each in-flight request holds
    one direct-tcpip channel), keepalives notice a dead peer within about
    ``keepalive_interval * (keepalive_count_max + 1)`` seconds, and a connection that was
    lost is replaced on the next request.
    """

    def __init__(self, options: SshOptions) -> None:
        asyncssh_log = logging.getLogger("asyncssh")
        if asyncssh_log.level == logging.NOTSET:
            # asyncssh logs every channel at INFO; our own lines say what an operator needs.
            asyncssh_log.setLevel(logging.WARNING)
        self._options = options
        self.tunnels: dict[str, _Tunnel] = {}
        self._connecting: dict[str, asyncio.Lock] = {}

    async def close(self) -> None:
        tunnels, self.tunnels = list(self.tunnels.values()), {}
        for tunnel in tunnels:
            await tunnel.close()

    @contextlib.asynccontextmanager
    async def channel(self, peer: Host) -> AsyncIterator[Host]:
        """The forwarded endpoint of the peer's data server, holding one channel of its connection.

        A TransportError raised inside is re-typed when the SSH side explains it (the
        connection died, or nothing listens on the far data port)."""
        tunnel = await self._tunnel(peer)
        async with tunnel.channels:
            try:
                yield tunnel.local
            except TransportError as exc:
                explained = await self._explain(peer, tunnel, exc)
                if explained is exc:
                    raise
                raise explained from exc

    async def _explain(self, peer: Host, tunnel: _Tunnel, exc: TransportError) -> TransportError:
        """Say whether the SSH connection died or the far data server is not there."""
        if (lost := tunnel.lost) is not None:
            await self._drop(peer.name, tunnel)
            return PeerUnreachableError(peer.name, f"SSH connection to {ssh_where(peer)} lost ({lost}); "
                                             f"the request was cut off: {exc.reason}")
        if isinstance(exc, PeerRejectedError):
            return exc  # the data server answered (a refusal): nothing to add
        try:
            reader_writer = await tunnel.conn.open_connection(REMOTE_HOST, peer.p2p_port)
        except asyncssh.ChannelOpenError as probe:
            return PeerUnreachableError(peer.name, f"SSH to {ssh_where(peer)} works, but {REMOTE_HOST}:"
                                             f"{peer.p2p_port} on it refused a connection ({probe.reason}); "
                                             f"is its data server running on p2p_port {peer.p2p_port}?")
        except (asyncssh.Error, OSError) as probe:
            await self._drop(peer.name, tunnel)
            return PeerUnreachableError(peer.name, f"SSH connection to {ssh_where(peer)} failed: {probe}")
        reader_writer[1].close()
        return exc

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
        conn, watcher = await self._connect(peer)
        try:
            listener = await conn.forward_local_port("127.0.0.1", 0, REMOTE_HOST, peer.p2p_port)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, asyncssh.Error | OSError):
                raise PeerUnreachableError(peer.name, f"SSH to {ssh_where(peer)}: cannot forward a local "
                                                f"port ({exc})") from exc
            raise
        local = dataclasses.replace(peer, p2p_host="127.0.0.1", tailscale_ip=None, ssh_host=None,
                                    p2p_port=listener.get_port())
        log.info("SSH connection to %s (%s) open; its data server is forwarded to 127.0.0.1:%d",
                 peer.name, ssh_where(peer), local.p2p_port)
        return _Tunnel(conn, watcher, listener, local, asyncio.Semaphore(self._options.max_channels))

    async def _connect(self, peer: Host) -> tuple[asyncssh.SSHClientConnection, _Watcher]:
        host, opts = ssh_address(peer), self._options
        known_hosts = checked_known_hosts(peer, opts.known_hosts)
        watcher = _Watcher()
        try:
            conn, _ = await asyncssh.create_connection(
                lambda: watcher, host, peer.ssh_port, username=peer.ssh_user or (),  # (): the local user
                client_keys=_client_keys(peer), known_hosts=str(known_hosts),
                encryption_algs=list(opts.encryption_algs),
                keepalive_interval=opts.keepalive_interval,
                keepalive_count_max=opts.keepalive_count_max,
                connect_timeout=opts.connect_timeout, login_timeout=opts.connect_timeout,
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            raise PeerUnreachableError(peer.name, _host_key_refused(peer, known_hosts, exc)) from exc
        except asyncssh.PermissionDenied as exc:
            raise PeerUnreachableError(peer.name, f"SSH login to {ssh_where(peer)} refused ({exc.reason}); "
                                            "add this node's public key to that user's "
                                            "authorized_keys, or fix hosts."
                                            f"{peer.name}.ssh_user / ssh_key") from exc
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            raise PeerUnreachableError(peer.name, f"SSH to {ssh_where(peer)} failed: "
                                            f"{type(exc).__name__}: {exc}") from exc
        return conn, watcher


def ssh_where(peer: Host) -> str:
    user = f"{peer.ssh_user}@" if peer.ssh_user else ""
    return f"{user}{ssh_address(peer)}:{peer.ssh_port}"


def ssh_address(peer: Host) -> str:
    host = peer.ssh_host or peer.tailscale_ip or peer.p2p_host
    if host is None:
        raise PeerUnreachableError(peer.name, f"no address to reach it over SSH; set hosts.{peer.name}."
                                        "ssh_host in the inventory")
    return host


def _client_keys(peer: Host) -> list[str] | tuple[()]:
    """The inventory's key; without one, asyncssh's defaults (~/.ssh/id_*, an agent)."""
    key = client_key(peer)
    return () if key is None else [str(key)]


def client_key(peer: Host) -> Path | None:
    """The inventory's ssh_key, checked to be a file here; None when the host names none."""
    if peer.ssh_key is None:
        return None
    key = Path(peer.ssh_key).expanduser()
    if not key.is_file():
        raise PeerUnreachableError(peer.name, f"hosts.{peer.name}.ssh_key = {peer.ssh_key!r} is not a "
                                        "readable file on this node; point it at the private key "
                                        "that logs in to that host")
    return key


def checked_known_hosts(peer: Host, path: Path) -> Path:
    if not path.is_file():
        raise PeerUnreachableError(peer.name, f"no known_hosts file at {path} (RINGRIFT_SSH_KNOWN_HOSTS), "
                                        "so no SSH host key can be checked and nothing is sent; "
                                        + host_key_fix(peer, path))
    return path


def _host_key_refused(peer: Host, path: Path, exc: asyncssh.HostKeyNotVerifiable) -> str:
    return (f"SSH host key of {ssh_address(peer)} port {peer.ssh_port} is unknown or has changed: "
            f"it does not match {path} ({exc.reason}); nothing was sent. "
            + host_key_fix(peer, path))


def host_key_fix(peer: Host, path: Path) -> str:
    host, port = ssh_address(peer), peer.ssh_port
    entry = host if port == 22 else f"[{host}]:{port}"
    return (f"Fix: check the host's key fingerprint on {peer.name} itself "
            "(ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub), compare it with "
            f"`ssh-keyscan -p {port} {host} | ssh-keygen -lf -`, then remove any stale entry "
            f"(ssh-keygen -R '{entry}' -f {path}) and add it: "
            f"ssh-keyscan -p {port} {host} >> {path}")
