"""File sync daemon between real `ringsync run` nodes: a peer reachable only over SSH sends many
small files in one rsync run; its index comes through the SSH tunnel (real sshd, real rsync)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench._sshd import SshServer, sshd_server
from ringsync.files.hashing import hash_file
from ringsync.localcluster import Cluster, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90),
              pytest.mark.skipif(shutil.which("rsync") is None or not Path("/usr/sbin/sshd").exists(),
                                 reason="rsync or OpenSSH sshd is not installed")]
FILES = 60


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshServer]:
    with sshd_server() as server:
        yield server


def test_many_small_models_arrive_by_one_rsync_run_from_an_ssh_only_peer(
        tmp_path: Path, sshd: SshServer) -> None:
    src_models = tmp_path / "train-1" / "data" / "models"
    ssh_only = {"ssh_host": sshd.host, "ssh_port": sshd.port, "ssh_user": sshd.user,
                "ssh_key": str(sshd.client_key), "transport": "ssh",
                "p2p_host": "127.0.0.2",  # its data server is not reachable directly: SSH it is
                "models_dir": str(src_models)}
    cluster = Cluster(tmp_path, [("train-1", "gpu_training_primary"), ("selfplay-1", "gpu_selfplay")],
                      sync_interval=30.0, host_fields={"train-1": ssh_only})
    env = {"RINGRIFT_FILE_SETTLE_TIME": "0.5", "RINGRIFT_FILE_POLL_INTERVAL": "0.3",
           "RINGRIFT_SSH_KNOWN_HOSTS": str(sshd.known_hosts), "RINGRIFT_RSYNC_MIN_FILES": "20"}
    try:
        src_models.mkdir(parents=True)
        for i in range(FILES):
            (src_models / f"production/hex8_2p/m_{i:03d}.pth").parent.mkdir(parents=True, exist_ok=True)
            (src_models / f"production/hex8_2p/m_{i:03d}.pth").write_bytes(os.urandom(2000 + i))
        (src_models / "canonical_hex8_2p.pth").write_bytes(os.urandom(3 * 1024 * 1024))
        assert cluster.nodes["train-1"].data_dir / "models" == src_models
        cluster.nodes["train-1"].extra_env["RINGRIFT_P2P_HOST"] = "127.0.0.1"  # loopback only
        for name in cluster.nodes:
            cluster.nodes[name].extra_env.update(env)
            cluster.start(name)
        here = cluster.nodes["selfplay-1"].data_dir / "models"

        def arrived() -> bool:
            return all((here / p.relative_to(src_models)).is_file() and
                       hash_file(here / p.relative_to(src_models)) == hash_file(p)
                       for p in src_models.rglob("*.pth"))

        wait_until(arrived, 45, "every model at selfplay-1 with its hash")
        log_path = cluster.nodes["selfplay-1"].log_path
        # The run's summary is logged after its files are renamed into place: wait for it.
        wait_until(lambda: "rsync from train-1:" in log_path.read_text(), 10,
                   "the rsync run's summary")  # the small files came in one batch
        log = log_path.read_text()
        assert f"{FILES + 1} of {FILES + 1} models files published" in log
        assert "is reached over ssh" in log  # its index came through the SSH tunnel
        assert not list(here.rglob(".ringsync-rsync"))  # staging cleaned up
    finally:
        cluster.stop_all()
