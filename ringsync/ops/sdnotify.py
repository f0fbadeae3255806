"""sd_notify(3) without libsystemd: READY, STATUS, STOPPING and WATCHDOG datagrams to systemd."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
from collections.abc import Mapping

__all__ = ["SystemdNotifier"]

log = logging.getLogger(__name__)

_FIELD_NAME = re.compile(r"[A-Z_][A-Z0-9_]*\Z")


class SystemdNotifier:
    """Tells systemd about this service's state; every method is a no-op outside systemd.

    Sending never raises and never blocks: a fresh non-blocking AF_UNIX datagram socket per
    message (as libsystemd does), so a full or vanished notify socket costs one warning, not a
    stalled event loop.
    """

    def __init__(
        self,
        notify_socket: str | None,
        *,
        watchdog_usec: str | None = None,
        watchdog_pid: str | None = None,
    ) -> None:
        self._address = _socket_address(notify_socket) if notify_socket else None
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._failing = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> SystemdNotifier:
        """Built from NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID, as systemd sets them."""
        return cls(
            environ.get("NOTIFY_SOCKET") or None,
            watchdog_usec=environ.get("WATCHDOG_USEC"),
            watchdog_pid=environ.get("WATCHDOG_PID"),
        )

    @property
    def enabled(self) -> bool:
        return self._address is not None

    # -- the messages --------------------------------------------------------------------------

    def ready(self) -> bool:
        return self.notify(READY=1)

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def stopping(self) -> bool:
        return self.notify(STOPPING=1)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def notify(self, **fields: object) -> bool:
        """Send `KEY=value` lines (names upper-cased); True if systemd got the datagram."""
        if self._address is None:
            return False
        payload = _encode(fields)
        return self._send(payload) if payload else False

    # -- the watchdog --------------------------------------------------------------------------

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of WATCHDOG_USEC), or None when no watchdog is ours."""
        if self._address is None or not self._watchdog_usec:
            return None
        if self._watchdog_pid and self._watchdog_pid.strip() != str(os.getpid()):
            return None  # the watchdog belongs to another process (e.g. our parent before exec)
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            log.warning("ignoring malformed WATCHDOG_USEC=%r", self._watchdog_usec)
            return None
        return usec / 2_000_000 if usec > 0 else None

    async def watchdog_loop(self) -> None:
        """Ping WATCHDOG=1 from the event loop until cancelled: a stuck loop stops the pings."""
        interval = self.watchdog_interval()
        if interval is None:
            return
        log.debug("systemd watchdog: pinging every %.3fs", interval)
        while True:
            self.watchdog()
            await asyncio.sleep(interval)

    # -- internals -----------------------------------------------------------------------------

    def _send(self, payload: bytes) -> bool:
        assert self._address is not None
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:  # CLOEXEC: PEP 446
                sock.setblocking(False)
                sock.sendto(payload, self._address)
        except OSError as exc:
            if not self._failing:
                log.warning("sd_notify to %r failed (%s); further failures are logged at DEBUG",
                            self._address, exc)
            else:
                log.debug("sd_notify to %r failed: %s", self._address, exc)
            self._failing = True
            return False
        if self._failing:
            log.info("sd_notify to %r works again", self._address)
            self._failing = False
        return True


def _socket_address(notify_socket: str) -> str | None:
    """A filesystem path, or an abstract name when it starts with '@'; None if unsupported."""
    if notify_socket.startswith("@"):
        return "\0" + notify_socket[1:]
    if notify_socket.startswith("/"):
        return notify_socket
    # e.g. systemd >= 253's "vsock:CID:PORT" (inside VMs): not needed on a cluster node.
    log.warning("unsupported NOTIFY_SOCKET=%r: systemd notifications disabled", notify_socket)
    return None


def _encode(fields: Mapping[str, object]) -> bytes:
    lines: list[str] = []
    for name, value in fields.items():
        key = name.upper()
        if not _FIELD_NAME.match(key):
            log.warning("dropping sd_notify field with invalid name %r", name)
            continue
        # One assignment per line: a newline inside a value would start a bogus field.
        text = str(value).replace("\r", " ").replace("\n", " ")
        lines.append(f"{key}={text}")
    return "".join(f"{line}\n" for line in lines).encode("utf-8", "replace")
