"""How this node logs in to a peer with OpenSSH, and what ssh's complaints mean.

One command line for every ssh this node runs (the per-peer master and rsync's ssh):
only the inventory's host, port, user and key, host keys checked strictly against
RINGRIFT_SSH_KNOWN_HOSTS, and no user ssh config (``-F /dev/null``) that could change
any of it. ssh says why it failed only in prose on stderr; ``login_refusal`` turns that
prose into the error an operator can act on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

from ringsync.errors import PeerUnreachableError
from ringsync.inventory import Host
from ringsync.ops.logsafe import bounded
from ringsync.settings import Settings

# AES-GCM first: with AES-NI it is the cheapest cipher OpenSSH has, cheaper than its default
# chacha20-poly1305 (the whole file goes through it on a large transfer).
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
           "aes128-ctr", "aes256-ctr")

_HOST_KEY = re.compile(r"host.key|host identification", re.IGNORECASE)
_KEEPALIVE = re.compile(r"timeout, server .* not responding", re.IGNORECASE)

_L = TypeVar("_L", bound="Login")


@dataclass(frozen=True, slots=True)
class Login:
    """The node-wide SSH settings (RINGRIFT_SSH_KNOWN_HOSTS, RINGRIFT_SSH_CONNECT_TIMEOUT,
    RINGRIFT_SSH_KEEPALIVE_INTERVAL, RINGRIFT_SSH_KEEPALIVE_COUNT_MAX); each host's own fields
    come from the inventory."""

    known_hosts: Path
    connect_timeout: float = 10.0
    keepalive_interval: float = 3.0
    keepalive_count_max: int = 3

    @classmethod
    def from_settings(cls, s: Settings, **more: Any) -> Self:
        """The node's SSH settings, and ``more`` fields of a subclass (SshOptions, RsyncOptions)."""
        return login_from_settings(cls, s, **more)


def login_from_settings(cls: type[_L], s: Settings, **more: Any) -> _L:
    """``cls`` (Login or a subclass) from the node's SSH settings; a subclass's own
    ``from_settings`` adds its fields here (zero-argument super() fails in slotted dataclasses)."""
    return cls(known_hosts=s.ssh_known_hosts, connect_timeout=s.ssh_connect_timeout,
               keepalive_interval=s.ssh_keepalive_interval,
               keepalive_count_max=s.ssh_keepalive_count_max, **more)


def ssh_args(peer: Host, login: Login, *, log_level: str = "ERROR") -> list[str]:
    """``ssh`` and its options for ``peer``, without the destination (``ssh_address``).
    ``log_level`` INFO adds the lines that say why a connection ended (a keepalive timeout)."""
    known_hosts = checked_known_hosts(peer, login.known_hosts)
    cmd = ["ssh", "-p", str(peer.ssh_port)]
    key = client_key(peer)
    if key is not None:
        cmd += ["-i", str(key), "-o", "IdentitiesOnly=yes"]
    cmd += ["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "CheckHostIP=no", "-o", "UpdateHostKeys=no",
            "-o", f"ConnectTimeout={_seconds(login.connect_timeout)}",
            "-o", f"ServerAliveInterval={_seconds(login.keepalive_interval)}",
            "-o", f"ServerAliveCountMax={login.keepalive_count_max}",
            "-o", f"Ciphers={','.join(CIPHERS)}", "-o", "Compression=no",
            "-o", "ForwardAgent=no", "-o", "ForwardX11=no", "-o", f"LogLevel={log_level}"]
    if peer.ssh_user:
        cmd += ["-l", peer.ssh_user]
    return cmd


def _seconds(value: float) -> int:
    return max(1, round(value))  # ssh takes whole seconds


def ssh_refused(said: str) -> bool:
    """Whether ssh's own words say it refused the host key or was refused the login."""
    return bool(_HOST_KEY.search(said)) or "permission denied (" in said.lower()


def login_refusal(peer: Host, said: str, login: Login, *, prefix: str = "",
                  nothing: str = "nothing was sent") -> PeerUnreachableError:
    """The error for an ssh that could not log in, from what it printed (``said``)."""
    text = bounded(" ".join(said.split()), 400) or "nothing on stderr"
    if _HOST_KEY.search(said):
        return PeerUnreachableError(peer.name, f"{prefix}SSH host key of {ssh_address(peer)} port "
                                               f"{peer.ssh_port} is unknown or has changed: it does not "
                                               f"match {login.known_hosts} ({text}); {nothing}. "
                                               + host_key_fix(peer, login.known_hosts))
    if "permission denied" in said.lower():
        return PeerUnreachableError(peer.name, f"{prefix}SSH login to {ssh_where(peer)} refused ({text}); "
                                               "add this node's public key to that user's "
                                               f"authorized_keys, or fix hosts.{peer.name}.ssh_user / "
                                               "ssh_key")
    return PeerUnreachableError(peer.name, f"{prefix}SSH to {ssh_where(peer)} failed ({text}); check "
                                           f"hosts.{peer.name}.ssh_host / ssh_port and that sshd runs there")


def connection_lost(said: str, login: Login) -> str:
    """Why an established connection ended, from ssh's last words ("" when it said none)."""
    lines = [ln.strip() for ln in said.splitlines() if ln.strip()]
    if match := next((ln for ln in lines if _KEEPALIVE.search(ln)), None):
        return (f"no answer to {login.keepalive_count_max} keepalives "
                f"{_seconds(login.keepalive_interval)}s apart: {bounded(match, 200)}")
    return bounded(" ".join(lines[-3:]), 300)


def ssh_where(peer: Host) -> str:
    user = f"{peer.ssh_user}@" if peer.ssh_user else ""
    return f"{user}{ssh_address(peer)}:{peer.ssh_port}"


def ssh_address(peer: Host) -> str:
    host = peer.ssh_host or peer.tailscale_ip or peer.p2p_host
    if host is None:
        raise PeerUnreachableError(peer.name, f"no address to reach it over SSH; set hosts.{peer.name}."
                                        "ssh_host in the inventory")
    return host


def client_key(peer: Host) -> Path | None:
    """The inventory's ssh_key, checked to be a file here; None when the host names none
    (ssh then tries its defaults, ~/.ssh/id_*, and an agent)."""
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


def host_key_fix(peer: Host, path: Path) -> str:
    host, port = ssh_address(peer), peer.ssh_port
    entry = host if port == 22 else f"[{host}]:{port}"
    return (f"Fix: check the host's key fingerprint on {peer.name} itself "
            "(ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub), compare it with "
            f"`ssh-keyscan -p {port} {host} | ssh-keygen -lf -`, then remove any stale entry "
            f"(ssh-keygen -R '{entry}' -f {path}) and add it: "
            f"ssh-keyscan -p {port} {host} >> {path}")
