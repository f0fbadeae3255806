"""One long-lived OpenSSH connection to a peer: ``ssh -N`` as a ControlMaster with a local port
forwarded to the peer's data server.

OpenSSH moves the bytes (in C, as fast as rsync's own ssh), and its control socket lets
rsync's ssh ride the same connection. The master lives in its own process: it is told to
die with this one (``setpriv --pdeathsig``, where util-linux has it), and ``stop`` or
``kill_now`` end it otherwise.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import shutil
import signal
import socket
import time
from pathlib import Path

from ringsync.errors import PeerUnreachableError
from ringsync.inventory import Host
from ringsync.ops.logsafe import child_env
from ringsync.transport.ssh_login import (
    Login,
    connection_lost,
    login_refusal,
    ssh_address,
    ssh_args,
    ssh_where,
)

log = logging.getLogger(__name__)

REMOTE_HOST = "127.0.0.1"  # where the far node's data server is reached, seen from that node
_STOP_TIMEOUT = 5.0
_POLL = 0.02
_STDERR_LINES = 40  # the last lines ssh printed, for the error that explains its exit
_PORT_TAKEN = ("address already in use", "cannot listen to port", "could not request local forwarding")


class PortTaken(Exception):
    """The local port picked for the forward was taken before ssh could bind it."""


class Master:
    """A running ``ssh -N`` control master and what it printed."""

    def __init__(self, proc: asyncio.subprocess.Process, control: Path, local_port: int,
                 login: Login) -> None:
        self.proc = proc
        self.control = control
        self.local_port = local_port
        self._login = login
        self._stderr: collections.deque[str] = collections.deque(maxlen=_STDERR_LINES)
        self.lines_read = 0  # every stderr line so far: a mark that later lines are newer than
        self._reader = asyncio.create_task(self._read_stderr())
        self._exited = asyncio.create_task(proc.wait())

    @classmethod
    async def start(cls, peer: Host, login: Login, control: Path) -> Master:
        """A master that has logged in and listens on its forward; PeerUnreachableError, with
        the reason ssh gave, when it could not."""
        # INFO: ssh says why a connection ended ("Timeout, server ... not responding") only there.
        args = ssh_args(peer, login, log_level="INFO")  # checks known_hosts and the key first
        for attempt in range(3):
            port = _free_port()
            cmd = [*_die_with_parent(), *args, "-N", "-o", "ControlMaster=yes",
                   "-o", f"ControlPath={control}", "-o", "ControlPersist=no",
                   "-o", "ExitOnForwardFailure=yes",
                   "-L", f"127.0.0.1:{port}:{REMOTE_HOST}:{peer.p2p_port}", ssh_address(peer)]
            try:
                proc = await asyncio.create_subprocess_exec(
                    *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE, env=child_env(LC_ALL="C"))
            except FileNotFoundError as exc:
                raise PeerUnreachableError(peer.name, "ssh is not installed on this node "
                                                      "(apt-get install openssh-client)") from exc
            master = cls(proc, control, port, login)
            try:
                await master._wait_ready(peer)
            except PortTaken:
                log.debug("local port %d was taken before ssh bound it (attempt %d)", port, attempt + 1)
                continue
            except BaseException:
                await asyncio.shield(master.stop())  # a second cancel leaves no ssh behind
                raise
            return master
        raise PeerUnreachableError(peer.name, "SSH: no free local port could be bound for the forward")

    @property
    def lost(self) -> str | None:
        """Why the connection ended, or None while it is up."""
        code = self.proc.returncode
        if code is None:
            return None
        if code < 0 and not self._stderr:
            return f"ssh was killed by {signal.Signals(-code).name}"
        return connection_lost("\n".join(self._stderr), self._login) or f"ssh exited with {code}"

    def said(self) -> str:
        return "\n".join(self._stderr)

    async def exit_soon(self, within: float) -> bool:
        """Whether the master exits within ``within`` seconds (it may be dying already); once
        it has, its last words are read too."""
        await asyncio.wait([self._exited], timeout=within)
        if self._exited.done():
            await asyncio.wait([self._reader], timeout=_STOP_TIMEOUT)
        return self.proc.returncode is not None

    async def _wait_ready(self, peer: Host) -> None:
        """The control socket appears after login, once the forward listens (ssh binds the
        forward first and exits on failure: ExitOnForwardFailure)."""
        limit = 2 * self._login.connect_timeout + 5.0  # connect, then log in
        deadline = time.monotonic() + limit
        while not self.control.exists():
            if await self.exit_soon(_POLL):
                said = self.said()
                if any(p in said.lower() for p in _PORT_TAKEN):
                    raise PortTaken(said)
                raise login_refusal(peer, said, self._login)
            if time.monotonic() > deadline:
                raise PeerUnreachableError(peer.name, f"SSH to {ssh_where(peer)} did not finish logging in "
                                                      f"within {limit:.0f}s; is sshd there answering?")

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self._stderr.append(line)
                self.lines_read += 1
                log.debug("ssh master %s: %s", self.control.name, line)

    def last_open_failure(self, since: int = 0) -> str | None:
        """The reason of the newest refused channel ("open failed: connect failed: ..."),
        among the lines read after the mark ``since`` (a ``lines_read``): an older refusal
        does not explain a new failure."""
        newer = self.lines_read - since
        for line in reversed(list(self._stderr)[-newer:] if newer > 0 else []):
            if "open failed" in line:
                return line.split("open failed:", 1)[-1].strip()
        return None

    def kill_now(self) -> None:
        """SIGTERM without waiting (process exit; an event loop may no longer run)."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    async def stop(self) -> None:
        """SIGTERM (ssh closes the connection and removes its socket), SIGKILL if it lingers."""
        self.kill_now()
        if not await self.exit_soon(_STOP_TIMEOUT):
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.exit_soon(_STOP_TIMEOUT)
        self._reader.cancel()
        await asyncio.wait([self._reader], timeout=_STOP_TIMEOUT)
        with contextlib.suppress(FileNotFoundError):
            self.control.unlink()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> list[str]:
    """A master outlives nothing: the kernel sends it SIGTERM when this process dies (even kill -9)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []
