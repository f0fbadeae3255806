"""The ringsync command as an operator meets it: exit codes, messages, status, demo."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from ringsync.localcluster import Cluster, free_port
from ringsync.node import NodeContext
from tests.conftest import TOKEN as CONFTEST_TOKEN

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


@pytest.mark.parametrize("bind_host", ["127.0.0.1", "0.0.0.0"])
def test_port_in_use_is_a_configuration_error_in_one_line(tmp_path: Path, bind_host: str) -> None:
    with socket.socket() as blocker:  # a real process (this one) holds the port
        blocker.bind((bind_host, 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        result = run_cli("run", env=base_env(tmp_path, RINGRIFT_P2P_PORT=str(port),
                                             RINGRIFT_P2P_HOST="127.0.0.1"))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "crashed" not in result.stderr  # no restart loop
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"ringsync: configuration error: RINGRIFT_P2P_PORT={port}: address "
                      f"127.0.0.1:{port} is already in use (another ringsync or process holds "
                      "it); stop it or choose another port"]


def test_address_not_on_this_machine_is_a_configuration_error(tmp_path: Path) -> None:
    # 192.0.2.0/24 is TEST-NET-1: never assigned to a local interface; nothing is sent.
    result = run_cli("run", env=base_env(tmp_path, RINGRIFT_P2P_HOST="192.0.2.7",
                                         RINGRIFT_CLUSTER_AUTH_TOKEN=TOKEN))
    assert result.returncode == 2, result.stderr
    assert "RINGRIFT_P2P_HOST=192.0.2.7" in result.stderr
    assert "not an address of this machine" in result.stderr
    assert "Traceback" not in result.stderr


def test_restart_budget_exhausted_exits_3_for_systemd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A held port no longer crashes the data server (exit 2 above); the budget itself is
    # exercised by the DaemonManager tests. Here: the CLI's mapping of it to systemd's exit code.
    import ringsync.runner
    from ringsync.cli import main
    from ringsync.errors import RestartBudgetExhausted

    async def crashing(*_: object) -> None:
        raise RestartBudgetExhausted("data_server", 6, 300.0)

    for name, value in base_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RINGRIFT_USE_UVLOOP", "false")
    monkeypatch.setattr(ringsync.runner, "run_node", crashing)
    assert main(["run"]) == 3


def test_version(tmp_path: Path) -> None:
    from importlib.metadata import version

    result = run_cli("--version", env=base_env(tmp_path))
    assert result.returncode == 0
    assert result.stdout.strip() == f"ringsync {version('ringsync')}"


def test_auto_sync_module_help_names_itself(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "ringsync.auto_sync_daemon", "--help"],
                            env=base_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: python -m ringsync.auto_sync_daemon")
    assert "auto-sync daemon" in result.stdout
    assert "RINGRIFT_NODE_ID" in result.stdout
    assert not (tmp_path / "data").exists(), "--help starts nothing"


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


# --- `ringsync status` from a machine that is not a node ------------------------------------


def _inventory_for(tmp_path: Path, up: dict[str, int], down_port: int) -> Path:
    hosts = {name: {"role": "gpu_training_primary", "p2p_host": "127.0.0.1", "p2p_port": port}
             for name, port in up.items()}
    hosts["gone-1"] = {"role": "gpu_selfplay", "p2p_host": "127.0.0.1", "p2p_port": down_port}
    path = tmp_path / "distributed_hosts.yaml"
    path.write_text(json.dumps({"hosts": hosts}))  # JSON is YAML
    return path


async def _status(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """`ringsync status` as a subprocess, while this loop keeps serving the nodes."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ringsync", "status", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _client_env(tmp_path: Path, inventory: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGRIFT_")}
    # No RINGRIFT_NODE_ID and a hostname that is not in the inventory: not a node.
    env.update({"RINGRIFT_CLUSTER_CONFIG": str(inventory), "RINGRIFT_ENV_FILE": os.devnull})
    env.update(extra)
    return env


async def test_status_from_any_machine_shows_every_node_and_what_to_do(
        tmp_path: Path, node_factory: Callable[..., NodeContext],
        served: Callable[..., Awaitable[object]]) -> None:
    ctx = node_factory("train-1")
    await served(ctx)
    down = free_port()
    inventory = _inventory_for(tmp_path, {"train-1": ctx.settings.p2p_port}, down)
    token_file = tmp_path / "token"
    token_file.write_text(CONFTEST_TOKEN + "\n")
    code, out, err = await _status("--token-file", str(token_file),
                                   env=_client_env(tmp_path, inventory))
    assert code == 1, err  # one node is down
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(rows) == {"train-1", "gone-1"}
    assert rows["train-1"].split()[1:2] == ["gpu_training_primary"]  # its own /v1/status answered
    assert f"unreachable: 127.0.0.1:{down}" in rows["gone-1"]
    assert "systemctl status ringsync@<profile>" in rows["gone-1"]
    assert f"port {down} is open" in rows["gone-1"]
    assert CONFTEST_TOKEN not in out + err


async def test_status_says_what_to_do_about_a_wrong_or_missing_token(
        tmp_path: Path, node_factory: Callable[..., NodeContext],
        served: Callable[..., Awaitable[object]]) -> None:
    ctx = node_factory("train-1")
    await served(ctx)
    inventory = _inventory_for(tmp_path, {"train-1": ctx.settings.p2p_port}, free_port())
    wrong = "wrong-token-0123456789abcdef"
    code, out, err = await _status("--json", env=_client_env(
        tmp_path, inventory, RINGRIFT_CLUSTER_AUTH_TOKEN=wrong))
    assert code == 1
    (row,) = [st for st in json.loads(out) if st["node"] == "train-1"]
    assert row["error"].startswith("token rejected: set RINGRIFT_CLUSTER_AUTH_TOKEN(_FILE)")
    assert wrong not in out + err
    code, out, err = await _status(env=_client_env(tmp_path, inventory))
    assert code == 1
    assert "no cluster token configured" in err
    assert "no token sent: set RINGRIFT_CLUSTER_AUTH_TOKEN(_FILE)" in out


@pytest.mark.slow
def test_demo_keeps_its_logs_where_it_says_they_are(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGRIFT_")}
    env["TMPDIR"] = str(tmp_path)  # the demo's default directory is a temp dir
    result = subprocess.run([sys.executable, "-m", "ringsync", "demo", "--duration", "2"], env=env,
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    said = result.stdout.splitlines()[0]  # "ringsync demo: 4 nodes on 127.0.0.1 in DIR (logs: ...)"
    root = Path(said.split(" in ", 1)[1].split(" (logs", 1)[0])
    assert root.parent == tmp_path
    assert result.stdout.strip().splitlines()[-1] == f"node logs kept in {root} (<node>.log)"
    for name in ("selfplay-1", "train-1", "train-2", "coordinator"):
        log = root / f"{name}.log"
        assert f"node {name} ready" in log.read_text(), name
        assert not (root / name).exists(), "the demo's data is removed"
