"""A real network filesystem (sshfs against a throwaway sshd on loopback) under real `ringsync run` nodes.

Shared storage is decided per (source, target) pair: a trainer that uses the selfplay
node's data dir is not sent copies; a trainer on its own disk gets every game.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench._sshd import SshServer, sshd_server
from ringsync.localcluster import Cluster, Node, read_game_ids, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("sshfs") is None or not Path("/dev/fuse").exists(),
                       reason="needs sshfs and /dev/fuse (.ci/run installs sshfs)"),
]

GAMES = 30


def _unmount(mount: Path) -> None:
    for args in (["fusermount", "-u"], ["fusermount", "-uz"]):  # lazy if still busy
        if subprocess.run([*args, str(mount)], capture_output=True, timeout=30).returncode == 0:
            return


@pytest.fixture
def sshfs_mount(tmp_path: Path) -> Iterator[Path]:
    """A directory of this machine, mounted back over SSH: fuse.sshfs, like a remote share."""
    export, mount = tmp_path / "export", tmp_path / "mnt"
    export.mkdir()
    mount.mkdir()
    with sshd_server() as server:
        _sshfs(server, export, mount)
        try:
            yield mount
        finally:
            _unmount(mount)


def _sshfs(server: SshServer, export: Path, mount: Path) -> None:
    options = ",".join([
        f"IdentityFile={server.client_key}", "IdentitiesOnly=yes", "BatchMode=yes",
        "StrictHostKeyChecking=yes", f"UserKnownHostsFile={server.known_hosts}",
        "GlobalKnownHostsFile=/dev/null",
    ])
    subprocess.run(["sshfs", "-p", str(server.port), "-o", options, f"{server.login}:{export}",
                    str(mount)], check=True, capture_output=True, timeout=30)
    assert "fuse.sshfs" in Path("/proc/self/mountinfo").read_text()


def _nodes_root(tmp_path: Path) -> Path:
    (tmp_path / "nodes").mkdir()
    return tmp_path / "nodes"


def _on(node: Node, data_dir: Path) -> None:
    node.extra_env["RINGRIFT_DATA_DIR"] = str(data_dir)


def _games_in(data_dir: Path) -> list[str]:
    """Every game id in every DB under games/, duplicates kept."""
    ids: list[str] = []
    for db in sorted((data_dir / "games").rglob("*.db")):
        ids.extend(read_game_ids(db))
    return ids


def _get(node: Node, path: str, token: str) -> bytes:
    request = urllib.request.Request(f"http://127.0.0.1:{node.port}{path}",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return bytes(resp.read())


def _metric(node: Node, token: str, line_start: str) -> float:
    for line in _get(node, "/metrics", token).decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


def _write_games(source: Path) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", "ringsync.selfplay_sim", str(source), "--games", str(GAMES),
         "--seed", "11"], capture_output=True, text=True, timeout=120, check=True)
    assert f"completed {GAMES}" in done.stdout
    return read_game_ids(source, "WHERE game_status = 'completed'")


def _stop_without_errors(cluster: Cluster) -> None:
    for name, node in cluster.nodes.items():
        assert cluster.terminate(name) == 0, node.log_tail()
    for node in cluster.nodes.values():
        errors = [line for line in node.log_path.read_text().splitlines() if " ERROR " in line]
        assert not errors, f"{node.name}: {errors}"


def test_a_trainer_sharing_the_data_dir_is_skipped_and_a_local_one_gets_every_game(
    tmp_path: Path, sshfs_mount: Path
) -> None:
    shared = sshfs_mount / "shared"
    cluster = Cluster(_nodes_root(tmp_path), [("selfplay-1", "gpu_selfplay"),
                                           ("train-nfs", "gpu_training_primary"),
                                           ("train-local", "nn_training_primary")], sync_interval=1.0)
    sp, nfs, local = (cluster.nodes[n] for n in ("selfplay-1", "train-nfs", "train-local"))
    _on(sp, shared)
    _on(nfs, shared)
    try:
        cluster.start_all()
        completed = _write_games(shared / "games" / "hex8_2p.db")
        local_dir = local.data_dir
        wait_until(lambda: len(_games_in(local_dir)) >= GAMES, 60, "every game at train-local")
        skips = 'ringsync_shared_storage_skips_total{peer="train-nfs"}'
        wait_until(lambda: _metric(sp, cluster.token, skips) >= GAMES, 30, "the skip recorded")

        held = _games_in(local_dir)
        assert sorted(held) == sorted(completed)  # each exactly once
        assert _metric(local, cluster.token, "ringsync_games_duplicate_received_total") == 0
        assert sorted(_games_in(shared)) == sorted(completed)  # the original only, no merged copy
        assert not list((shared / "games" / "synced").rglob("*.db"))
        assert _metric(sp, cluster.token, skips) == GAMES
        local_skips = 'ringsync_shared_storage_skips_total{peer="train-local"}'
        assert _metric(sp, cluster.token, local_skips) == 0
        status = json.loads(_get(sp, "/v1/status", cluster.token))
        assert status["storage"]["fstype"] == "fuse.sshfs"
        assert status["storage"]["skipped_games"] == {"train-nfs": GAMES}
        assert status["storage"]["sharing_targets"] == ["train-nfs"]
        assert status["manifest"]["pending"] == {}
        # Both nodes on the shared dir keep their own state; only the elected one ships.
        assert (shared / ".ringsync" / "selfplay-1" / "manifest.db").is_file()
        assert (shared / ".ringsync" / "train-nfs" / "manifest.db").is_file()
        assert json.loads(_get(nfs, "/v1/status", cluster.token))["manifest"]["games"] == 0
        assert _metric(sp, cluster.token, "ringsync_shared_dir_shipper") == 1
        assert _metric(nfs, cluster.token, "ringsync_shared_dir_shipper") == 0
        _stop_without_errors(cluster)
    finally:
        cluster.stop_all()


def test_a_selfplay_node_on_a_network_mount_feeds_both_local_trainers(
    tmp_path: Path, sshfs_mount: Path
) -> None:
    shared = sshfs_mount / "selfplay"
    cluster = Cluster(_nodes_root(tmp_path), [("selfplay-1", "gpu_selfplay"),
                                           ("train-1", "gpu_training_primary"),
                                           ("train-2", "nn_training_primary")], sync_interval=1.0)
    sp = cluster.nodes["selfplay-1"]
    _on(sp, shared)
    try:
        cluster.start_all()
        completed = _write_games(shared / "games" / "hex8_2p.db")
        trainers = [cluster.nodes["train-1"], cluster.nodes["train-2"]]
        wait_until(lambda: all(len(_games_in(t.data_dir)) >= GAMES for t in trainers), 60,
                   "every game at both trainers")
        for trainer in trainers:
            assert sorted(_games_in(trainer.data_dir)) == sorted(completed)
        status = json.loads(_get(sp, "/v1/status", cluster.token))
        assert status["storage"]["fstype"] == "fuse.sshfs"
        assert status["storage"]["network"] is True
        assert status["storage"]["skipped_games"] == {}
        _stop_without_errors(cluster)
        log = sp.log_path.read_text()
        assert "still owed {}" in log
    finally:
        cluster.stop_all()


def test_two_trainers_sharing_one_data_dir_hold_each_game_once_there(
    tmp_path: Path, sshfs_mount: Path
) -> None:
    """Trainers on one NFS export (as on Lambda) and a selfplay node elsewhere."""
    shared = sshfs_mount / "trainers"
    cluster = Cluster(_nodes_root(tmp_path), [("selfplay-1", "gpu_selfplay"),
                                           ("train-a", "gpu_training_primary"),
                                           ("train-b", "nn_training_primary")], sync_interval=1.0)
    sp, a, b = (cluster.nodes[n] for n in ("selfplay-1", "train-a", "train-b"))
    _on(a, shared)
    _on(b, shared)
    try:
        cluster.start_all()
        completed = _write_games(sp.data_dir / "games" / "hex8_2p.db")
        wait_until(lambda: len(_games_in(shared)) >= GAMES, 60, "every game in the trainers' dir")
        skips = 'ringsync_shared_storage_skips_total{peer="train-b"}'
        wait_until(lambda: _metric(sp, cluster.token, skips) >= GAMES, 30, "train-b counted as holder")
        assert sorted(_games_in(shared)) == sorted(completed)  # once, not once per trainer
        assert not list((shared / "games" / "synced" / "train-b").rglob("*.db"))
        status = json.loads(_get(sp, "/v1/status", cluster.token))
        assert status["manifest"]["pending"] == {}
        assert status["manifest"]["delivered"] == {"train-a": GAMES, "train-b": GAMES}
        log = sp.log_path.read_text()
        assert "train-b uses the same data dir as train-a" in log
        _stop_without_errors(cluster)
    finally:
        cluster.stop_all()
