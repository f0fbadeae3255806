"""SystemdNotifier against real AF_UNIX datagram sockets, as systemd listens on them."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ringsync.ops.sdnotify import SystemdNotifier


def _bind(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify")
    if len(os.fsencode(path)) >= 108:  # sun_path limit; pytest's tmp_path is normally far shorter
        pytest.skip(f"tmp_path too long for an AF_UNIX address: {path}")
    sock = _bind(path)
    try:
        yield path, sock
    finally:
        sock.close()


def _recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_messages_arrive(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready()
    assert _recv(sock) == "READY=1\n"
    assert notifier.status("syncing 12 games\nto train-1")
    assert _recv(sock) == "STATUS=syncing 12 games to train-1\n"
    assert notifier.stopping()
    assert _recv(sock) == "STOPPING=1\n"
    assert notifier.watchdog()
    assert _recv(sock) == "WATCHDOG=1\n"
    assert notifier.notify(status="x", errno=5)
    assert _recv(sock) == "STATUS=x\nERRNO=5\n"


def test_abstract_socket() -> None:
    name = f"ringsync-test-{uuid.uuid4().hex}"
    with _bind("\0" + name) as sock:
        notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert _recv(sock) == "READY=1\n"


async def test_watchdog_loop_pings_until_cancelled(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    sock.setblocking(False)
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000", "WATCHDOG_PID": str(os.getpid())}
    notifier = SystemdNotifier.from_env(env)
    assert notifier.watchdog_interval() == pytest.approx(0.01)
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(notifier.watchdog_loop())
    try:
        async with asyncio.timeout(5):
            for _ in range(3):
                assert (await loop.sock_recv(sock, 4096)) == b"WATCHDOG=1\n"
    finally:
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_watchdog_pid_mismatch_disables_watchdog(listener: tuple[str, socket.socket]) -> None:
    path, _ = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    notifier = SystemdNotifier.from_env(env)
    assert notifier.watchdog_interval() is None
    async with asyncio.timeout(1):
        await notifier.watchdog_loop()  # returns at once


def test_watchdog_interval_without_pid_is_half_of_usec(listener: tuple[str, socket.socket]) -> None:
    path, _ = listener
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"})
    assert notifier.watchdog_interval() == 15.0
    for bad in ("", "0", "-5", "soon"):
        assert SystemdNotifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": bad}) \
            .watchdog_interval() is None


async def test_no_notify_socket_is_a_noop() -> None:
    notifier = SystemdNotifier.from_env({"WATCHDOG_USEC": "30000000"})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.status("x")
    assert not notifier.stopping()
    assert not notifier.watchdog()
    assert notifier.watchdog_interval() is None
    async with asyncio.timeout(1):
        await notifier.watchdog_loop()


def test_missing_socket_never_raises_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with caplog.at_level(logging.DEBUG, logger="ringsync.ops.sdnotify"):
        assert not notifier.ready()
        assert not notifier.status("still here")
        assert not notifier.watchdog()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1


def test_full_socket_does_not_block(listener: tuple[str, socket.socket]) -> None:
    path, _ = listener  # nobody reads: the receive queue fills and sendto would block
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": path})
    results = [notifier.status("x" * 1000) for _ in range(5000)]
    assert results[0]
    assert not all(results)


def test_unsupported_address_disables() -> None:
    assert not SystemdNotifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled
