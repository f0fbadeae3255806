"""The namespace lab itself: hosts reach each other, cuts and caps bite, nothing outlives it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import IP, NetnsLab, netns_lab

pytestmark = [pytest.mark.needs_root, pytest.mark.timeout(60)]

_CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), 2).close()
    print("open")
except OSError as e:
    print(type(e).__name__)
"""

_SINK = """
import json, socket, sys, time
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
conn, _ = srv.accept()
first = total = 0
while chunk := conn.recv(1 << 16):
    first = first or time.monotonic()
    total += len(chunk)
print(json.dumps({"bytes": total, "seconds": time.monotonic() - first}), flush=True)
"""


def reach(lab: NetnsLab, src: int, dst: int, port: int = 22) -> str:
    target = lab.hosts[dst].address
    return lab.run(lab.hosts[src], sys.executable, "-c", _CONNECT, target, str(port)).strip()


def leftovers(lab: NetnsLab) -> list[str]:
    names = subprocess.run([IP, "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    links = subprocess.run([IP, "-o", "link", "show"], capture_output=True, text=True, timeout=10).stdout
    return [line for line in (names + links).splitlines() if f"rs{lab.suffix}" in line]


def test_hosts_reach_each_other_until_cut_and_again_when_healed(tmp_path: Path) -> None:
    with netns_lab(tmp_path, 2) as lab:
        lab.start_sshd(lab.hosts[1])
        assert reach(lab, 0, 1) == "open"
        assert reach(lab, 0, 1, port=2222) == "ConnectionRefusedError"  # a real host answers
        for how in ("link", "blackhole"):
            lab.cut(lab.hosts[1], how)
            assert reach(lab, 0, 1) in ("TimeoutError", "OSError"), how
            lab.heal(lab.hosts[1])
            assert reach(lab, 0, 1) == "open", how
        # Only the lab's hosts carry its subnet: the root namespace has no address on it.
        root_addrs = subprocess.run([IP, "-o", "addr"], capture_output=True, text=True, timeout=10).stdout
        assert lab.hosts[0].address not in root_addrs
    assert leftovers(lab) == []


def _two_labs_then_fail(tmp_path: Path, seen: list[NetnsLab]) -> None:
    with netns_lab(tmp_path / "a", 2) as a:
        seen.append(a)
        with netns_lab(tmp_path / "b", 2) as b:
            assert a.bridge != b.bridge
            assert {h.netns for h in a.hosts}.isdisjoint(h.netns for h in b.hosts)
            b.start_sshd(b.hosts[0])
            assert reach(b, 1, 0) == "open"
            sshd = b.hosts[0].sshd
        assert sshd is not None
        assert sshd.poll() is not None  # stopped with its lab
        assert leftovers(b) == []
        assert leftovers(a) != []
        raise RuntimeError("boom")


def test_everything_is_removed_when_the_test_fails_and_parallel_labs_do_not_clash(tmp_path: Path) -> None:
    seen: list[NetnsLab] = []
    with pytest.raises(RuntimeError, match="boom"):
        _two_labs_then_fail(tmp_path, seen)
    assert leftovers(seen[0]) == []


def test_a_tbf_cap_limits_the_rate(tmp_path: Path) -> None:
    with netns_lab(tmp_path, 2) as lab:
        sender, receiver = lab.hosts
        lab.cap(receiver, 16)  # 16 Mbit/s = 2 MB/s
        sink = lab.spawn(receiver, [sys.executable, "-c", _SINK, receiver.address, "5001"],
                         log=tmp_path / "sink.log")
        send = (f"import socket, time\nfor _ in range(50):\n try:\n  s = socket.create_connection("
                f"('{receiver.address}', 5001), 2); break\n except OSError: time.sleep(0.1)\n"
                "s.sendall(b'x' * (4 << 20)); s.close()")
        lab.run(sender, sys.executable, "-c", send, timeout=30)
        sink.wait(30)
        measured = json.loads((tmp_path / "sink.log").read_text())
        rate_mbit = measured["bytes"] * 8 / measured["seconds"] / 1e6
        assert measured["bytes"] == 4 << 20
        print(f"measured {rate_mbit:.1f} Mbit/s under a 16 Mbit/s cap")
        assert 12 < rate_mbit < 18, rate_mbit
        lab.uncap(receiver)
        assert "tbf" not in lab.run(receiver, "tc", "qdisc", "show", "dev", "eth0")
