"""A cluster of real `ringsync run` processes on loopback: the demo, the tests and the benchmarks."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ringsync.inventory import Host, Inventory
from ringsync.settings import Settings

READY_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Node:
    name: str
    role: str
    root: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    command_prefix: list[str] = field(default_factory=list)  # e.g. `ip netns exec NS` in tests

    @property
    def data_dir(self) -> Path:
        return self.root / self.name / "data"

    @property
    def log_path(self) -> Path:
        return self.root / f"{self.name}.log"

    @property
    def notify_path(self) -> Path:
        return self.root / f"{self.name}.notify"

    def log_tail(self, n: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


class Cluster:
    """Nodes described by one inventory; each runs as its own `ringsync run` process."""

    def __init__(self, root: Path, nodes: list[tuple[str, str]], *, sync_interval: float = 5.0,
                 log_level: str = "INFO",
                 host_fields: Mapping[str, Mapping[str, object]] | None = None) -> None:
        self.root = root
        self.host_fields = host_fields or {}  # per host, inventory fields over the loopback defaults
        self.token = secrets.token_hex(24)
        self.log_level = log_level
        self.nodes = {name: Node(name, role, root) for name, role in nodes}
        self.sync_interval = sync_interval
        self.inventory = root / "distributed_hosts.yaml"
        self._write_inventory()

    def _write_inventory(self) -> None:
        hosts = {
            n.name: {
                "ssh_host": "127.0.0.1", "ssh_port": 22, "role": n.role, "status": "ready",
                "p2p_host": "127.0.0.1", "p2p_port": n.port, "gpu": "none",
                "selfplay_enabled": "selfplay" in n.role, "training_enabled": "training" in n.role,
                **self.host_fields.get(n.name, {}),
            }
            for n in self.nodes.values()
        }
        doc = {"hosts": hosts, "sync_routing": {"replication_target": 2}, "auto_sync": {"enabled": True}}
        self.inventory.write_text(yaml.safe_dump(doc, sort_keys=False))

    def env(self, node: Node) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RINGRIFT_")}
        env.update({
            "RINGRIFT_NODE_ID": node.name, "RINGRIFT_DATA_DIR": str(node.data_dir),
            "RINGRIFT_CLUSTER_CONFIG": str(self.inventory), "RINGRIFT_CLUSTER_AUTH_TOKEN": self.token,
            "RINGRIFT_SYNC_INTERVAL": str(self.sync_interval), "RINGRIFT_ENV_FILE": os.devnull,
            "RINGRIFT_LOG_LEVEL": self.log_level, "NOTIFY_SOCKET": str(node.notify_path),
            "MALLOC_ARENA_MAX": "1",  # as systemd/ringsync@.service and the Dockerfile set it
        })
        env.update(node.extra_env)
        return env

    def start(self, name: str, *args: str) -> Node:
        """Start the node and return once it told us READY=1 over sd_notify."""
        node = self.nodes[name]
        node.data_dir.mkdir(parents=True, exist_ok=True)
        node.notify_path.unlink(missing_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(node.notify_path))
            with node.log_path.open("ab") as log:
                node.process = subprocess.Popen(
                    [*node.command_prefix, sys.executable, "-m", "ringsync", "run", *args],
                    env=self.env(node),
                    stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                    start_new_session=True,  # a terminal's Ctrl-C reaches only the harness
                )
            self._await_ready(node, sock)
        return node

    def _await_ready(self, node: Node, sock: socket.socket) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, min(0.5, deadline - time.monotonic())))
            try:
                if b"READY=1" in sock.recv(4096).split(b"\n"):
                    return
            except TimeoutError:
                pass
            assert node.process is not None
            if node.process.poll() is not None:
                raise RuntimeError(f"{node.name} exited with {node.process.returncode}:\n{node.log_tail()}")
        raise RuntimeError(f"{node.name} not ready within {READY_TIMEOUT}s:\n{node.log_tail()}")

    def start_all(self) -> None:
        for name in self.nodes:
            self.start(name)

    def host(self, name: str) -> Host:
        node = self.nodes[name]
        return Host(name=name, role=node.role, p2p_host="127.0.0.1", p2p_port=node.port)

    def client_settings(self) -> Settings:
        """Settings for a client (status, benchmarks) that talks to every node."""
        first = next(iter(self.nodes.values()))
        hosts = {name: self.host(name) for name in self.nodes}
        return Settings(node_id=first.name, data_dir=first.data_dir,
                        inventory=Inventory(hosts=hosts), auth_token=self.token)

    def kill(self, name: str) -> None:
        proc = self.nodes[name].process
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    def terminate(self, name: str, timeout: float = 30.0) -> int:
        proc = self.nodes[name].process
        assert proc is not None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout)

    def stop_all(self) -> None:
        for node in self.nodes.values():
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        for node in self.nodes.values():
            if node.process is not None:
                try:
                    node.process.wait(30)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait(10)


def read_game_ids(db: Path, where: str = "") -> list[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [r[0] for r in conn.execute(f"SELECT game_id FROM games {where}")]
    finally:
        conn.close()


def held_game_ids(node: Node) -> list[str]:
    """Every game id in every DB under the node's games/ dir (duplicates kept)."""
    ids: list[str] = []
    for db in sorted((node.data_dir / "games").rglob("*.db")):
        ids.extend(read_game_ids(db))
    return ids


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Bounded wait for an external process to reach a state."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)
