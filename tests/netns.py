"""Hosts in network namespaces on one Linux bridge, for multi-host tests.

Each host is a namespace with loopback up and one address of a private subnet on a veth
whose other end sits on the run's bridge; nothing is addressed outside the namespaces.
Names carry a random suffix so parallel runs never clash, and everything made (processes,
namespaces, veths, the bridge) is removed on exit, also when the test failed. A host can
run a real OpenSSH sshd (host key, client key and known_hosts made per run) and real
`ringsync run` nodes (``lab_cluster``); it can be cut off and healed, and its rate capped
with ``tc tbf``. Every command is bounded in time.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bench._sshd import keygen, sshd_config, stop_process
from ringsync.localcluster import Cluster

IP = shutil.which("ip") or "/usr/sbin/ip"
TC = shutil.which("tc") or "/usr/sbin/tc"
SSHD = "/usr/sbin/sshd"
COMMAND_TIMEOUT = 15.0
READY_TIMEOUT = 15.0
SSH_PORT = 22  # each host has its own network stack: the standard port is free


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be created here (no root, no CAP_NET_ADMIN, a sandbox)."""


@dataclass
class LabHost:
    """One namespace host: its address on the bridge and the processes started in it."""

    name: str
    netns: str
    address: str
    veth: str  # the end on the bridge, in the root namespace
    root: Path  # scratch dir for its sshd
    sshd: subprocess.Popen[bytes] | None = None
    host_key: str = ""  # "ssh-ed25519 AAAA..." once its sshd runs
    cut_how: str | None = None

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return [IP, "netns", "exec", self.netns, *argv]


@dataclass
class NetnsLab:
    """N hosts on one bridge; use ``netns_lab()`` so that it is always torn down."""

    root: Path
    count: int
    max_sessions: int = 10
    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    hosts: list[LabHost] = field(default_factory=list)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _made_bridge: bool = False

    @property
    def bridge(self) -> str:
        return f"rs{self.suffix}br"  # within the kernel's 15-character interface names

    @property
    def client_key(self) -> Path:
        return self.root / "client_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    # -- building and tearing down ----------------------------------------------------------

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        prefix = f"10.{random.randint(64, 250)}.{random.randint(0, 255)}"
        for i in range(self.count):
            host = LabHost(name=f"h{i}", netns=f"rs{self.suffix}h{i}", address=f"{prefix}.{i + 1}",
                           veth=f"rs{self.suffix}v{i}", root=self.root / f"h{i}")
            made = subprocess.run([IP, "netns", "add", host.netns], capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT)
            if made.returncode != 0:
                raise NetnsUnavailable(f"`ip netns add` failed: {made.stderr.strip()}")
            self.hosts.append(host)
        self._ip("link", "add", self.bridge, "type", "bridge")
        self._made_bridge = True
        self._ip("link", "set", self.bridge, "up")
        for i, host in enumerate(self.hosts):
            peer = f"rs{self.suffix}p{i}"
            self._ip("link", "add", host.veth, "type", "veth", "peer", "name", peer, "netns", host.netns)
            self._ip("link", "set", host.veth, "master", self.bridge, "up")
            self.run(host, IP, "link", "set", peer, "name", "eth0")
            self.run(host, IP, "addr", "add", f"{host.address}/24", "dev", "eth0")
            self.run(host, IP, "link", "set", "eth0", "up")
            self.run(host, IP, "link", "set", "lo", "up")
        keygen(self.client_key)
        self.known_hosts.write_text("")

    def close(self) -> None:
        """Stop what we started, then remove namespaces, veths and the bridge; never raises."""
        for proc in self._procs:
            stop_process(proc)
        for host in self.hosts:
            for pid in self._pids_in(host):  # children our processes left in our own namespace
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self._ip("netns", "del", host.netns, check=False)
            self._ip("link", "del", host.veth, check=False)  # gone with the namespace, normally
        if self._made_bridge:
            self._ip("link", "del", self.bridge, check=False)

    def _pids_in(self, host: LabHost) -> list[int]:
        out = self._ip("netns", "pids", host.netns, check=False)
        return [int(p) for p in out.split() if p.isdigit()]

    # -- commands and processes -------------------------------------------------------------

    def _ip(self, *args: str, check: bool = True) -> str:
        return _run([IP, *args], check=check)

    def run(self, host: LabHost, *argv: str, check: bool = True, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run a command in the host's namespace; its stdout."""
        return _run(host.command(*argv), check=check, timeout=timeout)

    def spawn(self, host: LabHost, argv: list[str], *, log: Path,
              env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """A long-running process in the host's namespace, stopped at teardown."""
        with log.open("ab") as out:
            proc = subprocess.Popen(host.command(*argv), stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                    env=dict(env) if env is not None else None, start_new_session=True)
        self._procs.append(proc)
        return proc

    # -- sshd ---------------------------------------------------------------------------------

    def start_sshd(self, host: LabHost) -> None:
        """A real sshd on the host's address (own host key, MaxSessions set); returns once a
        real login with strict host key checking works. Its key goes into ``known_hosts``."""
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)  # privilege separation
        host.root.mkdir(parents=True, exist_ok=True)
        host.host_key = " ".join(keygen(host.root / "host_ed25519").split()[:2])
        authorized = self.root / "authorized_keys"
        authorized.write_text(self.client_key.with_name(self.client_key.name + ".pub").read_text())
        config = sshd_config(host.root, SSH_PORT, listen=host.address, authorized_keys=authorized,
                             extra=(f"MaxSessions {self.max_sessions}", "AllowTcpForwarding local"),
                             log_level="INFO")  # a line per login: tests count connections
        host.sshd = self.spawn(host, [SSHD, "-D", "-e", "-f", str(config)], log=host.root / "sshd.log")
        with self.known_hosts.open("a") as known:
            known.write(f"{host.address} {host.host_key}\n")
        self._await_login(host)

    def ssh_args(self, known_hosts: Path | None = None) -> list[str]:
        return ["ssh", "-p", str(SSH_PORT), "-i", str(self.client_key), "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={known_hosts or self.known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR"]

    def _await_login(self, host: LabHost) -> None:
        deadline, last = time.monotonic() + READY_TIMEOUT, ""
        while time.monotonic() < deadline:
            assert host.sshd is not None
            if host.sshd.poll() is not None:
                log = (host.root / "sshd.log").read_text(errors="replace")
                raise RuntimeError(f"sshd on {host.name} exited with {host.sshd.returncode}: {log}")
            done = subprocess.run(host.command(*self.ssh_args(), f"root@{host.address}", "true"),
                                  capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=10)
            if done.returncode == 0:
                return
            last = done.stderr.strip()
            time.sleep(0.1)
        raise RuntimeError(f"sshd on {host.name} ({host.address}) not ready within {READY_TIMEOUT}s: {last}")

    # -- faults -------------------------------------------------------------------------------

    def cut(self, host: LabHost, how: str = "link") -> None:
        """Cut the host off: its bridge port down ("link"), or every peer address black-holed
        inside the host ("blackhole"). Nothing is sent or answered until ``heal``."""
        if how == "link":
            self._ip("link", "set", host.veth, "down")
        elif how == "blackhole":
            for other in self.hosts:
                if other is not host:
                    self.run(host, IP, "route", "add", "blackhole", f"{other.address}/32")
        else:
            raise ValueError(f"cut how={how!r}: use 'link' or 'blackhole'")
        host.cut_how = how

    def heal(self, host: LabHost) -> None:
        if host.cut_how == "link":
            self._ip("link", "set", host.veth, "up")
        elif host.cut_how == "blackhole":
            for other in self.hosts:
                if other is not host:
                    self.run(host, IP, "route", "del", "blackhole", f"{other.address}/32", check=False)
        host.cut_how = None

    def cap(self, host: LabHost, mbit: float) -> None:
        """Cap the host's rate both ways with a token bucket filter (tbf) on each veth end."""
        spec = ["tbf", "rate", f"{mbit}mbit", "burst", "32kb", "latency", "200ms"]
        _run([TC, "qdisc", "replace", "dev", host.veth, "root", *spec])
        self.run(host, TC, "qdisc", "replace", "dev", "eth0", "root", *spec)

    def uncap(self, host: LabHost) -> None:
        _run([TC, "qdisc", "del", "dev", host.veth, "root"], check=False)
        self.run(host, TC, "qdisc", "del", "dev", "eth0", "root", check=False)


@contextlib.contextmanager
def netns_lab(root: Path, count: int, *, max_sessions: int = 10) -> Iterator[NetnsLab]:
    """A lab of ``count`` hosts, torn down on exit; the test is skipped only where namespaces
    cannot be created at all."""
    lab = NetnsLab(root, count, max_sessions=max_sessions)
    try:
        try:
            lab.create()
        except NetnsUnavailable as exc:
            pytest.skip(f"network namespaces unavailable here: {exc} (needs root and iproute2)")
        yield lab
    finally:
        lab.close()


def lab_cluster(lab: NetnsLab, nodes: list[tuple[str, str, LabHost]], *, root: Path,
                host_fields: Mapping[str, Mapping[str, object]] | None = None,
                sync_interval: float = 30.0) -> Cluster:
    """Real `ringsync run` nodes, each started in its host's namespace.

    The inventory gives each node its namespace address (p2p_host, ssh_host), root with the
    run's client key as its SSH login, and ``host_fields`` on top; every node checks host
    keys against the run's known_hosts.
    """
    root.mkdir(parents=True, exist_ok=True)
    fields: dict[str, dict[str, object]] = {}
    for name, _, host in nodes:
        fields[name] = {"ssh_host": host.address, "ssh_port": SSH_PORT, "ssh_user": "root",
                        "ssh_key": str(lab.client_key), "p2p_host": host.address,
                        **(host_fields or {}).get(name, {})}
    cluster = Cluster(root, [(name, role) for name, role, _ in nodes], sync_interval=sync_interval,
                      host_fields=fields)
    for name, _, host in nodes:
        node = cluster.nodes[name]
        node.command_prefix = host.command()
        node.extra_env["RINGRIFT_SSH_KNOWN_HOSTS"] = str(lab.known_hosts)
    return cluster


@contextlib.contextmanager
def writing_games(source: Path, games: int, *, rate: float, seed: int,
                  moves: int = 20) -> Iterator[subprocess.Popen[bytes]]:
    """A RingRift-like writer committing ``games`` games at ``rate`` per second into
    ``source`` for the block's length (wait for it inside); killed if still running after."""
    writer = subprocess.Popen([sys.executable, "-m", "ringsync.selfplay_sim", str(source),
                               "--games", str(games), "--rate", str(rate), "--moves", str(moves),
                               "--seed", str(seed)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield writer
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(10)


def _run(argv: list[str], *, check: bool = True, timeout: float = COMMAND_TIMEOUT) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout

