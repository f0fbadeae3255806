"""SSH between hosts in network namespaces: real sshd, real `ringsync run` nodes, cut links.

The training host's data server listens only on its own 127.0.0.1, so the selfplay host
can reach it only through SSH; a second training host is reached over plain HTTP.
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ringsync.localcluster import Cluster, held_game_ids, read_game_ids, wait_until
from tests.integration.test_end_to_end import merged_rows, per_game_rows
from tests.integration.test_ssh_master import ssh_processes
from tests.netns import LabHost, NetnsLab, lab_cluster, netns_lab, writing_games

pytestmark = [pytest.mark.slow, pytest.mark.needs_root, pytest.mark.timeout(90)]

GAMES = 200
SOURCE_DB = "games/hex8_2p.db"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[NetnsLab]:
    with netns_lab(tmp_path / "lab", 3) as made:
        made.start_sshd(made.hosts[1])  # the SSH-only training host
        yield made


def ssh_cluster(lab: NetnsLab, root: Path, **selfplay_env: str) -> Cluster:
    """selfplay-1 on h0 pushes to train-1 (h1, data server on 127.0.0.1 only, over SSH) and
    to train-2 (h2, over HTTP)."""
    h0, h1, h2 = lab.hosts
    cluster = lab_cluster(lab, [("selfplay-1", "gpu_selfplay", h0), ("train-1", "gpu_training_primary", h1),
                                ("train-2", "nn_training_primary", h2)],
                          root=root, host_fields={"train-1": {"transport": "ssh"}}, sync_interval=5.0)
    cluster.nodes["train-1"].extra_env["RINGRIFT_P2P_HOST"] = "127.0.0.1"
    cluster.nodes["selfplay-1"].extra_env.update(selfplay_env)
    return cluster


@pytest.fixture
def started(lab: NetnsLab, tmp_path: Path) -> Iterator[Cluster]:
    cluster = ssh_cluster(lab, tmp_path / "nodes")
    try:
        cluster.start_all()
        yield cluster
    finally:
        cluster.stop_all()


def write_source_games(cluster: Cluster) -> list[str]:
    source = cluster.nodes["selfplay-1"].data_dir / SOURCE_DB
    subprocess.run([sys.executable, "-m", "ringsync.selfplay_sim", str(source), "--games", str(GAMES),
                    "--in-progress", "5", "--seed", "11"], check=True, capture_output=True, timeout=60)
    return read_game_ids(source, "WHERE game_status = 'completed'")


def assert_holds_exactly(cluster: Cluster, trainer: str, completed: list[str]) -> None:
    node = cluster.nodes[trainer]
    held = held_game_ids(node)
    assert len(held) == len(set(held)), f"{trainer} holds duplicates"
    assert set(held) == set(completed), f"{trainer} holds a different set of games"
    source_rows = per_game_rows(cluster.nodes["selfplay-1"].data_dir / SOURCE_DB)
    rows = merged_rows(node.data_dir / "games")
    for table, counts in source_rows.items():
        expected = Counter({g: n for g, n in counts.items() if g in set(completed)})
        assert rows.get(table, Counter()) == expected, f"{trainer}: rows of {table} differ"


def direct_connect(lab: NetnsLab, port: int) -> str:
    """What a plain TCP connect from the selfplay host to train-1's data server port gets."""
    h0, h1, _ = lab.hosts
    code = (f"import socket\ntry:\n socket.create_connection(('{h1.address}', {port}), 3); print('open')\n"
            "except OSError as e: print(type(e).__name__)")
    return lab.run(h0, sys.executable, "-c", code).strip()


def test_loopback_only_training_host_gets_every_game_exactly_once_over_ssh(
        lab: NetnsLab, started: Cluster) -> None:
    cluster = started
    assert direct_connect(lab, cluster.nodes["train-1"].port) == "ConnectionRefusedError"
    completed = write_source_games(cluster)
    assert len(completed) == GAMES
    wait_until(lambda: all(len(held_game_ids(cluster.nodes[t])) >= GAMES for t in ("train-1", "train-2")),
               45, "every game at both trainers")
    for trainer in ("train-1", "train-2"):
        assert_holds_exactly(cluster, trainer, completed)
    log = cluster.nodes["selfplay-1"].log_path.read_text()
    assert len(re.findall(r"SSH connection to train-1 \(root@[\d.]+:22\) open", log)) == 1, log[-2000:]
    assert "SSH connection to train-2" not in log  # the HTTP peer is not tunnelled
    # Games and file sync (which polls train-1's file index over SSH) share one connection.
    h0, h1 = lab.hosts[0], lab.hosts[1]
    sshd_log = (h1.root / "sshd.log").read_text(errors="replace")
    assert sshd_log.count(f"Accepted publickey for root from {h0.address} ") == 1, sshd_log[-2000:]
    established = lab.run(h1, "ss", "-Htn", "state", "established", "( sport = :22 )")
    assert sum(f"{h0.address}:" in ln for ln in established.splitlines()) == 1, established
    node = cluster.nodes["selfplay-1"].process
    assert node is not None
    masters = [p for p in ssh_processes(f"{h1.address}") if parent_of(p) == node.pid]
    assert len(masters) == 1  # selfplay-1's one master (train-2 reaches train-1 over SSH too)
    assert cluster.terminate("selfplay-1") == 0, cluster.nodes["selfplay-1"].log_tail()
    wait_until(lambda: not set(masters) & set(ssh_processes(f"{h1.address}")), 10,
               "selfplay-1's ssh master gone with it")


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def test_an_ssh_peer_cut_off_mid_stream_catches_up_exactly_once_while_the_other_keeps_receiving(
        lab: NetnsLab, tmp_path: Path) -> None:
    cluster = ssh_cluster(lab, tmp_path / "nodes", RINGRIFT_SSH_KEEPALIVE_INTERVAL="1",
                          RINGRIFT_SSH_KEEPALIVE_COUNT_MAX="2")
    source = cluster.nodes["selfplay-1"].data_dir / SOURCE_DB
    train1, train2 = cluster.nodes["train-1"], cluster.nodes["train-2"]
    try:
        cluster.start_all()
        with writing_games(source, GAMES, rate=12, seed=13) as writer:
            wait_until(lambda: len(held_game_ids(train1)) >= 20, 30, "the first games at train-1")
            lab.cut(lab.hosts[1])
            at_cut = len(held_game_ids(train2))
            time.sleep(8)
            during = len(held_game_ids(train1))
            assert len(held_game_ids(train2)) > at_cut + 40  # the other trainer kept receiving
            time.sleep(3)
            assert len(held_game_ids(train1)) == during  # nothing reaches a cut-off host
            log = cluster.nodes["selfplay-1"].log_path.read_text()
            assert "delivery to train-1 failing" in log, log[-3000:]
            lab.heal(lab.hosts[1])
            assert writer.wait(60) == 0
        completed = read_game_ids(source, "WHERE game_status = 'completed'")
        assert len(completed) == GAMES
        wait_until(lambda: all(len(held_game_ids(n)) >= GAMES for n in (train1, train2)), 40,
                   "every game at both trainers after the heal")
        for trainer in ("train-1", "train-2"):
            assert_holds_exactly(cluster, trainer, completed)
    finally:
        cluster.stop_all()


@pytest.fixture
def wrong_key(lab: NetnsLab, tmp_path: Path) -> Path:
    """A known_hosts that holds another key for train-1's address (a rebuilt or spoofed host)."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")],
                   check=True, timeout=30)
    known = tmp_path / "wrong_known_hosts"
    key = " ".join((tmp_path / "other.pub").read_text().split()[:2])
    known.write_text(f"{lab.hosts[1].address} {key}\n")
    return known


def test_a_wrong_host_key_is_refused_naming_the_host_and_the_fix_and_nothing_is_sent(
        lab: NetnsLab, wrong_key: Path, tmp_path: Path) -> None:
    cluster = ssh_cluster(lab, tmp_path / "nodes", RINGRIFT_SSH_KNOWN_HOSTS=str(wrong_key))
    h0, h1, _ = lab.hosts
    try:
        cluster.start_all()
        completed = write_source_games(cluster)
        selfplay = cluster.nodes["selfplay-1"]
        fix = f"ssh-keyscan -p 22 {h1.address} >> {wrong_key}"
        wait_until(lambda: fix in selfplay.log_path.read_text(), 30, "the host key refusal in the log")
        wait_until(lambda: len(held_game_ids(cluster.nodes["train-2"])) >= GAMES, 30, "games at train-2")
        line = next(ln for ln in selfplay.log_path.read_text().splitlines() if fix in ln)
        assert "delivery to train-1 failing" in line
        assert f"SSH host key of {h1.address} port 22 is unknown or has changed" in line
        assert f"ssh-keygen -R '{h1.address}' -f {wrong_key}" in line
        assert cluster.token not in selfplay.log_path.read_text()
        assert held_game_ids(cluster.nodes["train-1"]) == []  # nothing was transferred
        assert_holds_exactly(cluster, "train-2", completed)  # the other peer kept flowing

        # The operator applies the fix the message gives (after checking the fingerprint):
        lab.run(h0, "sh", "-c", f"ssh-keygen -R '{h1.address}' -f {wrong_key} && {fix}")
        wait_until(lambda: len(held_game_ids(cluster.nodes["train-1"])) >= GAMES, 40, "games at train-1")
        assert_holds_exactly(cluster, "train-1", completed)
    finally:
        cluster.stop_all()


def test_a_cut_link_fails_the_push_within_seconds_and_the_next_push_reconnects(
        lab: NetnsLab, tmp_path: Path) -> None:
    h0, h1, _ = lab.hosts
    cluster = lab_cluster(lab, [("selfplay-1", "gpu_selfplay", h0), ("train-1", "gpu_training_primary", h1)],
                          root=tmp_path / "nodes")
    cluster.nodes["train-1"].extra_env["RINGRIFT_P2P_HOST"] = "127.0.0.1"
    batch_db = tmp_path / "batch.db"
    subprocess.run([sys.executable, "-m", "ringsync.selfplay_sim", str(batch_db), "--games", "20",
                    "--seed", "5"], check=True, capture_output=True, timeout=60)
    try:
        cluster.start("train-1")
        lab.cap(h1, 8)  # 8 Mbit/s: the 24 MB push below takes ~25 s, so the cut lands mid-push
        spec = {"peer": {"name": "train-1", "ssh_host": h1.address, "ssh_user": "root",
                         "ssh_key": str(lab.client_key), "p2p_port": cluster.nodes["train-1"].port},
                "known_hosts": str(lab.known_hosts), "token": cluster.token,
                "keepalive_interval": 1.0, "keepalive_count_max": 2,
                "steps": [{"push_random": 24 * 1024 * 1024}, "wait", {"push_db": str(batch_db)}]}
        with _Driver(h0, spec) as driver:
            driver.expect("connected")
            pushing = driver.expect("pushing")
            time.sleep(max(0.0, pushing["t"] + 2.0 - time.time()))
            cut_at = time.time()
            lab.cut(h1)
            failed = driver.expect("failed", timeout=30)
            lab.heal(h1)
            lab.uncap(h1)
            driver.resume()
            driver.expect("resumed")
            driver.expect("pushing")
            pushed = driver.expect("pushed", timeout=30)
    finally:
        cluster.stop_all()
    # 1 s keepalives, 2 unanswered allowed: the dead peer is noticed in about 3 s.
    print(f"push failed {failed['t'] - cut_at:.1f}s after the cut: {failed['message']}")
    assert failed["t"] - cut_at < 8.0, failed
    assert failed["error"] == "PeerUnreachableError"
    assert "SSH connection to root@" in failed["message"]
    assert "keepalive" in failed["message"]
    assert pushed["inserted"] == 20  # a fresh connection after the heal; the cut batch merged nothing
    assert sorted(held_game_ids(cluster.nodes["train-1"])) == sorted(read_game_ids(batch_db))


class _Driver:
    """tests.netns_push run in a lab host; its JSON lines, each awaited with a bound."""

    def __init__(self, host: LabHost, spec: dict[str, Any]) -> None:
        argv = host.command(sys.executable, "-m", "tests.netns_push", json.dumps(spec))
        self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def __enter__(self) -> _Driver:
        return self

    def __exit__(self, *exc: object) -> None:
        self._proc.kill()
        self._proc.wait(10)
        self._reader.join(10)  # it sees end of file once the process is gone
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                pipe.close()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line)
        self._lines.put("")

    def resume(self) -> None:
        """Let the driver past a "wait" step."""
        assert self._proc.stdin is not None
        self._proc.stdin.write("\n")
        self._proc.stdin.flush()

    def expect(self, event: str, timeout: float = 20.0) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no {event!r} from the driver within {timeout}s") from None
        assert line, f"the driver exited ({self._proc.poll()}) before {event!r}"
        got: dict[str, Any] = json.loads(line)
        assert got["event"] == event, got
        return got
