"""A throwaway OpenSSH sshd on 127.0.0.1 (fresh keys, strict host key checking) for reference runs."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

__all__ = ["SshServer", "keygen", "sshd_config", "sshd_server", "stop_process"]


@dataclass(frozen=True)
class SshServer:
    """Where the server listens and what a client needs to log in to it with host key checking on."""

    port: int
    client_key: Path
    known_hosts: Path
    user: str
    host: str = "127.0.0.1"
    log: Path | None = None  # sshd's own log (-e), at the level sshd_server was given

    def logins(self) -> int:
        """Connections that logged in so far (needs log_level INFO or more verbose)."""
        if self.log is None:
            raise ValueError("this server was started without a log")
        return self.log.read_text(errors="replace").count("Accepted publickey")

    def ssh_args(self) -> list[str]:
        """`ssh` with every option needed (no agent, no password prompts, strict host keys)."""
        return [
            "ssh", "-p", str(self.port), "-i", str(self.client_key),
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5",
            "-o", "LogLevel=ERROR",
        ]

    def rsync_rsh(self) -> str:
        """The value for `rsync -e` (paths here never contain spaces: they come from mkdtemp)."""
        return " ".join(self.ssh_args())

    @property
    def login(self) -> str:
        return f"{self.user}@{self.host}"

    def target(self, path: Path | str) -> str:
        """An rsync remote path such as root@127.0.0.1:/tmp/x/."""
        return f"{self.login}:{path}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keygen(path: Path) -> str:
    """A fresh passphrase-less ed25519 key pair at ``path``; returns the public key line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ringsync-bench", "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=30)
    return path.with_name(path.name + ".pub").read_text().strip()


def sshd_config(tmp: Path, port: int, *, listen: str = "127.0.0.1", authorized_keys: Path | None = None,
                extra: tuple[str, ...] = (), log_level: str = "ERROR") -> Path:
    """An sshd_config for a throwaway server whose files all live in ``tmp``."""
    config = tmp / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}",
        f"ListenAddress {listen}",
        f"HostKey {tmp / 'host_ed25519'}",
        f"PidFile {tmp / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized_keys or tmp / 'authorized_keys'}",
        "UsePAM no",
        "StrictModes no",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "AllowAgentForwarding no",
        "X11Forwarding no",
        "PrintMotd no",
        f"LogLevel {log_level}",
        "Subsystem sftp internal-sftp",
        *extra,
        "",
    ]))
    return config


def _wait_ready(server: SshServer, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Bounded: a real login (`ssh ... true`) must succeed, which also proves the host key."""
    deadline = time.monotonic() + READY_TIMEOUT
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {log.read_text(errors='replace')}")
        try:
            done = subprocess.run([*server.ssh_args(), server.login, "true"],
                                  capture_output=True, stdin=subprocess.DEVNULL, timeout=10)
        except subprocess.TimeoutExpired:
            last = "ssh login timed out"
        else:
            if done.returncode == 0:
                return
            last = done.stderr.decode(errors="replace").strip()
        time.sleep(0.1)
    raise RuntimeError(f"sshd on port {server.port} not ready within {READY_TIMEOUT}s: {last}")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)


@contextmanager
def sshd_server(log_level: str = "ERROR", extra: tuple[str, ...] = ()) -> Iterator[SshServer]:
    """Start `sshd -D -e -f CONFIG` as the current user on a free loopback port; stop it on exit.
    ``log_level`` INFO logs each login (SshServer.logins counts them); ``extra``: more
    sshd_config lines (a ForceCommand, say)."""
    Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)  # privilege separation dir
    tmp = Path(tempfile.mkdtemp(prefix="ringsync-bench-sshd-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        host_pub = keygen(tmp / "host_ed25519")
        client_pub = keygen(tmp / "client_ed25519")
        (tmp / "authorized_keys").write_text(client_pub + "\n")
        port = _free_port()
        key_type, key_b64 = host_pub.split()[:2]
        known_hosts = tmp / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{port} {key_type} {key_b64}\n")
        log = tmp / "sshd.log"
        server = SshServer(port=port, client_key=tmp / "client_ed25519", known_hosts=known_hosts,
                           user=getpass.getuser(), log=log)
        with log.open("wb") as out:
            config = sshd_config(tmp, port, log_level=log_level, extra=extra)
            proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)],
                                    stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env={**os.environ, "LC_ALL": "C"})
        _wait_ready(server, proc, log)
        yield server
    finally:
        if proc is not None:
            stop_process(proc)
        shutil.rmtree(tmp, ignore_errors=True)
