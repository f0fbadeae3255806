"""The ringsync command as an operator meets it: exit codes, messages, status, demo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ringsync.localcluster import Cluster, free_port

TOKEN = "cli-test-token-0123456789"


def run_cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ringsync", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RINGRIFT_", "NOTIFY_SOCKET"))}
    env.update({"RINGRIFT_NODE_ID": "solo", "RINGRIFT_DATA_DIR": str(tmp_path / "data"),
                "RINGRIFT_ENV_FILE": os.devnull, "RINGRIFT_P2P_PORT": str(free_port())})
    env.update(extra)
    return env


@pytest.mark.parametrize(("variable", "value"), [
    ("RINGRIFT_SYNC_INTERVAL", "soon"),
    ("RINGRIFT_P2P_PORT", "70000"),
    ("RINGRIFT_SKIP_NFS_SYNC", "maybe"),
    ("RINGRIFT_LOG_LEVEL", "LOUD"),
])
def test_bad_env_value_exits_2_naming_the_variable(tmp_path: Path, variable: str, value: str) -> None:
    result = run_cli("run", env=base_env(tmp_path, **{variable: value}))
    assert result.returncode == 2
    assert variable in result.stderr
    assert value in result.stderr
    assert not (tmp_path / "data").exists(), "a bad setting must change nothing"


def test_malformed_inventory_exits_2_naming_the_field(tmp_path: Path) -> None:
    inventory = tmp_path / "hosts.yaml"
    inventory.write_text("hosts:\n  solo:\n    role: gpu_selfplay\n    ssh_port: twenty-two\n")
    result = run_cli("run", env=base_env(tmp_path, RINGRIFT_CLUSTER_CONFIG=str(inventory)))
    assert result.returncode == 2
    assert "hosts.solo.ssh_port" in result.stderr
    assert str(inventory) in result.stderr


def test_public_bind_without_token_is_refused(tmp_path: Path) -> None:
    result = run_cli("run", env=base_env(tmp_path, RINGRIFT_P2P_HOST="0.0.0.0"))
    assert result.returncode == 2
    assert "RINGRIFT_CLUSTER_AUTH_TOKEN" in result.stderr


def test_token_never_reaches_logs_or_errors(tmp_path: Path) -> None:
    result = run_cli("run", env=base_env(tmp_path, RINGRIFT_CLUSTER_AUTH_TOKEN="short",
                                         RINGRIFT_SYNC_INTERVAL="x"))
    assert result.returncode == 2
    assert "short" not in result.stderr.replace("too short", "")


def test_restart_budget_exhausted_exits_3_for_systemd(tmp_path: Path) -> None:
    with socket.socket() as blocker:  # the data server's port is taken: it crashes on every start
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        result = run_cli("run", env=base_env(tmp_path, RINGRIFT_P2P_PORT=str(port),
                                             RINGRIFT_DAEMON_RESTART_LIMIT="1"))
    assert result.returncode == 3, result.stderr
    assert "crashed" in result.stderr
    assert "systemd" in result.stderr


def test_auto_sync_module_runs_with_its_data_server_and_status_reports_it(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, [("solo", "gpu_selfplay")])
    node = cluster.nodes["solo"]
    node.data_dir.mkdir(parents=True)
    env = cluster.env(node)
    import socket as _socket

    with _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM) as sock:
        sock.bind(str(node.notify_path))
        sock.settimeout(30)
        proc = subprocess.Popen([sys.executable, "-m", "ringsync.auto_sync_daemon"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            while b"READY=1" not in sock.recv(4096).split(b"\n"):
                pass
            status = run_cli("status", "--json", env=env)
            assert status.returncode == 0, status.stderr
            (view,) = json.loads(status.stdout)
            assert view["node"] == "solo"
            assert set(view["daemons"]) == {"data_server", "auto_sync"}
            assert TOKEN not in status.stdout
            assert cluster.token not in status.stdout
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()


@pytest.mark.slow
def test_demo_shows_games_reaching_trainers_and_not_the_coordinator(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGRIFT_")}
    result = subprocess.run([sys.executable, "-m", "ringsync", "demo", "--duration", "6",
                             "--dir", str(tmp_path / "demo")], env=env, capture_output=True,
                            text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("done:")
    counts = dict(part.rsplit(" holds ", 1) for part in summary.split("; ", 1)[1].split(", "))
    completed = int(summary.split("completed ")[1].split(" ")[0])
    assert completed > 0
    assert int(counts["train-1"]) == int(counts["train-2"]) == completed
    assert int(counts["coordinator"]) == 0
