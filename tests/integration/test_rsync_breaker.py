"""A peer whose rsync keeps failing gets its (peer, rsync) circuit breaker opened, its files
still arrive one by one, and after the breaker's recovery one rsync run probes and closes it.

Real sshd, rsync and `ringsync run` nodes. The peer's sshd runs every command through a
ForceCommand that fails while a flag file exists, as a peer whose rsync is killed (out of
memory, say) would: the SSH connection and its forwards keep working, and HTTP too, so the
per-file chain still reaches the peer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench._sshd import SshServer, sshd_server
from ringsync.files.hashing import hash_file
from ringsync.localcluster import Cluster, wait_until
from ringsync.status_view import render

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120),
              pytest.mark.skipif(shutil.which("rsync") is None or not Path("/usr/sbin/sshd").exists(),
                                 reason="rsync or OpenSSH sshd is not installed")]
FILES = 6  # per batch; RINGRIFT_RSYNC_MIN_FILES is 4
THRESHOLD = 2
RECOVERY = 8.0  # seconds, jitter ±20 %
OPEN, CLOSED = 2.0, 0.0
RSYNC_STATE = 'ringsync_circuit_state{peer="train-1",transport="rsync"}'


@pytest.fixture(scope="module")
def flaky(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SshServer, Path]]:
    """An sshd whose commands (rsync's) fail while the returned flag file exists."""
    root = tmp_path_factory.mktemp("flaky-sshd")
    flag, command = root / "rsync-fails", root / "force-command"
    command.write_text(f"#!/bin/sh\nif [ -e {flag} ]; then echo 'rsync was killed on the peer' >&2; "
                       'exit 1; fi\nexec /bin/sh -c "$SSH_ORIGINAL_COMMAND"\n')
    command.chmod(0o755)
    with sshd_server(extra=(f"ForceCommand {command}",)) as server:
        yield server, flag


def get(cluster: Cluster, path: str) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{cluster.nodes['selfplay-1'].port}{path}",
                                     headers={"Authorization": f"Bearer {cluster.token}"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        return str(resp.read().decode())


def sample(cluster: Cluster, series: str) -> float | None:
    for line in get(cluster, "/metrics").splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_peer_whose_rsync_keeps_failing_is_left_to_per_file_fetches_until_a_probe_gets_through(
        tmp_path: Path, flaky: tuple[SshServer, Path]) -> None:
    sshd, flag = flaky
    src = tmp_path / "train-1" / "data" / "models"
    fields = {"ssh_host": sshd.host, "ssh_port": sshd.port, "ssh_user": sshd.user,
              "ssh_key": str(sshd.client_key), "transport": "http,ssh", "models_dir": str(src)}
    cluster = Cluster(tmp_path, [("train-1", "gpu_training_primary"), ("selfplay-1", "gpu_selfplay")],
                      sync_interval=30.0, host_fields={"train-1": fields})
    env = {"RINGRIFT_FILE_SETTLE_TIME": "0.5", "RINGRIFT_FILE_POLL_INTERVAL": "0.3",
           "RINGRIFT_SSH_KNOWN_HOSTS": str(sshd.known_hosts), "RINGRIFT_RSYNC_MIN_FILES": "4",
           "RINGRIFT_CIRCUIT_FAILURE_THRESHOLD": str(THRESHOLD),
           "RINGRIFT_CIRCUIT_RECOVERY": str(RECOVERY), "RINGRIFT_CIRCUIT_RECOVERY_MAX": str(RECOVERY)}
    here = cluster.nodes["selfplay-1"].data_dir / "models"
    log_path = cluster.nodes["selfplay-1"].log_path
    batches = iter(range(100))

    def drop() -> list[Path]:
        """FILES settled models appearing at train-1 at once (one directory rename)."""
        name = f"b{next(batches)}"
        staging = src / f".incoming-{name}"
        staging.mkdir(parents=True)
        for i in range(FILES):
            (staging / f"m_{i}.pth").write_bytes(os.urandom(3000 + i))
            os.utime(staging / f"m_{i}.pth", (1, 1))
        os.rename(staging, src / name)
        return [src / name / f"m_{i}.pth" for i in range(FILES)]

    def arrive(files: list[Path]) -> None:
        def there() -> bool:
            return all((mine := here / f.relative_to(src)).is_file() and hash_file(mine) == hash_file(f)
                       for f in files)
        wait_until(there, 20, f"{files[0].parent.name} at selfplay-1 with its hashes")

    def failed_runs() -> int:
        return len(re.findall(r"rsync of \d+ models files from train-1 failed", log_path.read_text()))

    try:
        flag.touch()
        for name in cluster.nodes:
            cluster.nodes[name].extra_env.update(env)
            cluster.start(name)
        # Each batch is offered to rsync, fails, and arrives one by one, until the breaker opens.
        for _ in range(THRESHOLD + 2):
            arrive(drop())
            if sample(cluster, RSYNC_STATE) == OPEN:
                break
        assert sample(cluster, RSYNC_STATE) == OPEN, log_path.read_text()[-3000:]
        assert THRESHOLD <= failed_runs() <= THRESHOLD + 2
        assert "rsync was killed on the peer" in log_path.read_text()
        # Open: the next batch goes one by one straight away, without an rsync run.
        runs, opened = failed_runs(), time.monotonic()
        arrive(drop())
        assert time.monotonic() - opened < RECOVERY * 0.8  # well inside the open time
        assert failed_runs() == runs
        status = json.loads(get(cluster, "/v1/status"))
        assert {(c["peer"], c["transport"], c["state"]) for c in status["circuits"]} == {
            ("train-1", "rsync", "open")}
        assert "selfplay-1 -> train-1: circuit open over rsync since " in render([status])
        # rsync works again: after the recovery time one run probes and closes the breaker.
        flag.unlink()
        time.sleep(RECOVERY * 1.2)
        arrive(drop())
        wait_until(lambda: sample(cluster, RSYNC_STATE) == CLOSED, 10, "the rsync breaker closed")
        log = log_path.read_text()
        assert re.search(rf"rsync from train-1: {FILES} of {FILES} models files published", log)
        assert re.search(r"circuit to train-1 over rsync: half_open for \d+s -> closed", log), log[-3000:]
        assert failed_runs() == runs
        # The per-file fetches went through the file chain's http step, counted as such.
        ok = sample(cluster, 'ringsync_transport_attempts_total{data_type="files",outcome="ok",'
                             'transport="http"}')
        assert ok is not None
        assert ok >= FILES * 2
        assert sample(cluster, 'ringsync_transport_attempts_total{data_type="models",outcome="ok",'
                               'transport="rsync"}') == 1
    finally:
        flag.unlink(missing_ok=True)
        cluster.stop_all()
