"""Settings come from RINGRIFT_* variables, a .env file and the inventory, and fail clearly."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import pytest

from ringsync.errors import ConfigError
from ringsync.inventory import Host
from ringsync.settings import ENV_VARS, Settings, _Env, is_loopback_host, load_settings

TOKEN = "s3cret-Token-0123456789-abcdef"
INVENTORY = """\
hosts:
  coord:
    role: coordinator
    ssh_host: 10.0.0.1
  train-1:
    role: gpu_training_primary
    p2p_host: 10.0.0.2
    p2p_port: 9001
  selfplay-1:
    role: gpu_selfplay
  local-1:
    role: gpu_selfplay
    p2p_host: 127.0.0.1
sync_routing:
  replication_target: 3
auto_sync:
  interval_seconds: 15
"""


@pytest.fixture(autouse=True)
def _fixed_hostname(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "selfplay-1.cluster.example")


@pytest.fixture
def inventory_file(tmp_path: Path) -> Path:
    path = tmp_path / "distributed_hosts.yaml"
    path.write_text(INVENTORY)
    return path


def load(tmp_path: Path, **env: str) -> Settings:
    return load_settings(env, cwd=tmp_path)


def error(tmp_path: Path, **env: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, **env)
    return str(info.value)


def test_defaults(tmp_path: Path) -> None:
    s = load(tmp_path)
    assert s.node_id == "selfplay-1.cluster.example"
    assert s.data_dir == Path("/var/lib/ringsync")
    assert list(s.inventory.hosts) == [s.node_id]
    assert s.inventory.source is None
    assert (s.p2p_host, s.p2p_port, s.auth_token) == ("127.0.0.1", 8770, None)
    assert s == Settings(node_id=s.node_id, data_dir=s.data_dir, inventory=s.inventory)


def test_every_variable(tmp_path: Path, inventory_file: Path) -> None:
    s = load(
        tmp_path,
        RINGRIFT_NODE_ID="train-1", RINGRIFT_DATA_DIR=str(tmp_path / "data"),
        RINGRIFT_CLUSTER_CONFIG=str(inventory_file), RINGRIFT_P2P_HOST="10.0.0.9",
        RINGRIFT_P2P_PORT="9100", RINGRIFT_CLUSTER_AUTH_TOKEN=TOKEN,
        RINGRIFT_SYNC_INTERVAL="2.5", RINGRIFT_COORDINATOR_NODE="coord",
        RINGRIFT_SKIP_NFS_SYNC="no", RINGRIFT_SYNC_BATCH_GAMES="100",
        RINGRIFT_MAX_BATCH_BYTES=str(2 * 1024 * 1024), RINGRIFT_DRAIN_TIMEOUT="3",
        RINGRIFT_SYNC_DEBOUNCE="0", RINGRIFT_PUSH_TIMEOUT="30",
        RINGRIFT_DAEMON_RESTART_LIMIT="0", RINGRIFT_DAEMON_RESTART_WINDOW="60",
        RINGRIFT_LOG_LEVEL="debug", RINGRIFT_USE_UVLOOP="OFF",
    )
    assert s == Settings(
        node_id="train-1", data_dir=tmp_path / "data", inventory=s.inventory,
        p2p_host="10.0.0.9", p2p_port=9100, auth_token=TOKEN, sync_interval=2.5,
        coordinator_node="coord", skip_nfs_sync=False, batch_games=100,
        max_batch_bytes=2 * 1024 * 1024, drain_timeout=3.0, debounce=0.0, push_timeout=30.0,
        restart_limit=0, restart_window=60.0, log_level="DEBUG", use_uvloop=False,
    )
    assert s.inventory.source == inventory_file
    assert s.replication_target == 3


def test_reads_os_environ_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("RINGRIFT_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RINGRIFT_SYNC_BATCH_GAMES", "7")
    (tmp_path / ".env").write_text("RINGRIFT_PUSH_TIMEOUT=9\n")
    s = load_settings()
    assert (s.batch_games, s.push_timeout) == (7, 9.0)
    assert "RINGRIFT_PUSH_TIMEOUT" not in os.environ


# --- .env -------------------------------------------------------------------------------------


def test_dotenv_in_cwd_and_environment_wins(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "# local overrides\nRINGRIFT_SYNC_BATCH_GAMES=42\nRINGRIFT_PUSH_TIMEOUT=7\n"
        "RINGRIFT_LOG_LEVEL=\nRINGRIFT_NODE_ID\n"
    )
    s = load(tmp_path, RINGRIFT_PUSH_TIMEOUT="8", RINGRIFT_SYNC_BATCH_GAMES="")
    assert s.batch_games == 42  # an empty real value counts as unset
    assert s.push_timeout == 8.0
    assert s.log_level == "INFO"
    assert s.node_id == "selfplay-1.cluster.example"


def test_named_env_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("RINGRIFT_SYNC_BATCH_GAMES=1\n")
    named = tmp_path / "conf" / "node.env"
    named.parent.mkdir()
    named.write_text("RINGRIFT_SYNC_BATCH_GAMES=2\n")
    assert load(tmp_path, RINGRIFT_ENV_FILE="conf/node.env").batch_games == 2


def test_env_file_may_be_dev_null(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("RINGRIFT_SYNC_BATCH_GAMES=1\n")
    assert load(tmp_path, RINGRIFT_ENV_FILE=os.devnull).batch_games == 500


def test_named_env_file_must_exist(tmp_path: Path) -> None:
    message = error(tmp_path, RINGRIFT_ENV_FILE="missing.env")
    assert message == (
        "RINGRIFT_ENV_FILE = 'missing.env' does not exist; "
        "point it at an existing .env file or unset it"
    )


def test_env_file_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.env").mkdir()
    assert "is a directory" in error(tmp_path, RINGRIFT_ENV_FILE="dir.env")


def test_bad_value_in_dotenv_is_reported(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("RINGRIFT_P2P_PORT=http\n")
    assert error(tmp_path).startswith("RINGRIFT_P2P_PORT = 'http' is not an integer")


def test_typo_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ringsync.settings"):
        load(tmp_path, RINGRIFT_SYNC_INTERVALL="5", RINGRIFT_GPU_COUNT="8")
    assert "RINGRIFT_SYNC_INTERVALL; did you mean RINGRIFT_SYNC_INTERVAL?" in caplog.text
    assert "RINGRIFT_GPU_COUNT" not in caplog.text  # RingRift's own variables are left alone


# --- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("1", True), ("YES", True), ("On", True), (" false ", False), ("0", False),
     ("No", False), ("off", False)],
)
def test_booleans(tmp_path: Path, text: str, expected: bool) -> None:
    s = load(tmp_path, RINGRIFT_SKIP_NFS_SYNC=text, RINGRIFT_USE_UVLOOP=text)
    assert s.skip_nfs_sync is expected
    assert s.use_uvloop is expected


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("RINGRIFT_P2P_PORT", "abc", "RINGRIFT_P2P_PORT = 'abc' is not an integer"),
        ("RINGRIFT_P2P_PORT", "0", "RINGRIFT_P2P_PORT = '0' is out of range; use an integer 1-65535"),
        ("RINGRIFT_P2P_PORT", "65536", "RINGRIFT_P2P_PORT = '65536' is out of range"),
        ("RINGRIFT_SYNC_INTERVAL", "0", "RINGRIFT_SYNC_INTERVAL = '0' is out of range; use a number > 0"),
        ("RINGRIFT_SYNC_INTERVAL", "soon", "RINGRIFT_SYNC_INTERVAL = 'soon' is not a number"),
        ("RINGRIFT_SYNC_INTERVAL", "inf", "RINGRIFT_SYNC_INTERVAL = 'inf' is not a number"),
        ("RINGRIFT_SYNC_INTERVAL", "nan", "RINGRIFT_SYNC_INTERVAL = 'nan' is not a number"),
        ("RINGRIFT_SKIP_NFS_SYNC", "maybe",
         "RINGRIFT_SKIP_NFS_SYNC = 'maybe' is not a boolean; use true/false, 1/0, yes/no or on/off"),
        ("RINGRIFT_USE_UVLOOP", "2", "RINGRIFT_USE_UVLOOP = '2' is not a boolean"),
        ("RINGRIFT_SYNC_BATCH_GAMES", "0",
         "RINGRIFT_SYNC_BATCH_GAMES = '0' is out of range; use an integer 1-100000"),
        ("RINGRIFT_SYNC_BATCH_GAMES", "100001", "RINGRIFT_SYNC_BATCH_GAMES = '100001' is out of"),
        ("RINGRIFT_SYNC_BATCH_GAMES", "1.5", "RINGRIFT_SYNC_BATCH_GAMES = '1.5' is not an integer"),
        ("RINGRIFT_MAX_BATCH_BYTES", "1048575",
         "RINGRIFT_MAX_BATCH_BYTES = '1048575' is out of range; use an integer >= 1048576"),
        ("RINGRIFT_MAX_BATCH_BYTES", "64MiB", "RINGRIFT_MAX_BATCH_BYTES = '64MiB' is not an integer"),
        ("RINGRIFT_DRAIN_TIMEOUT", "-1", "RINGRIFT_DRAIN_TIMEOUT = '-1' is out of range"),
        ("RINGRIFT_SYNC_DEBOUNCE", "-0.1",
         "RINGRIFT_SYNC_DEBOUNCE = '-0.1' is out of range; use a number >= 0"),
        ("RINGRIFT_PUSH_TIMEOUT", "0", "RINGRIFT_PUSH_TIMEOUT = '0' is out of range"),
        ("RINGRIFT_DAEMON_RESTART_LIMIT", "-1",
         "RINGRIFT_DAEMON_RESTART_LIMIT = '-1' is out of range; use an integer >= 0"),
        ("RINGRIFT_DAEMON_RESTART_WINDOW", "0", "RINGRIFT_DAEMON_RESTART_WINDOW = '0' is out of"),
        ("RINGRIFT_LOG_LEVEL", "verbose",
         "RINGRIFT_LOG_LEVEL = 'verbose' is not allowed; use one of DEBUG, INFO, WARNING, ERROR"),
    ],
)
def test_bad_values(tmp_path: Path, name: str, value: str, expected: str) -> None:
    assert error(tmp_path, **{name: value}).startswith(expected)


def test_whitespace_around_values_is_ignored(tmp_path: Path) -> None:
    s = load(tmp_path, RINGRIFT_SYNC_BATCH_GAMES=" 12 ", RINGRIFT_LOG_LEVEL=" warning")
    assert (s.batch_games, s.log_level) == (12, "WARNING")


def test_empty_strings_are_unset(tmp_path: Path) -> None:
    names = {v.name: "" for v in ENV_VARS}
    assert load(tmp_path, **names) == load(tmp_path)


def test_undeclared_variable_is_a_programming_error() -> None:
    with pytest.raises(KeyError, match="not declared in ENV_VARS"):
        _Env({}).get("RINGRIFT_NOT_A_SETTING")


# --- data dir ---------------------------------------------------------------------------------


def test_relative_data_dir_resolves_against_cwd(tmp_path: Path) -> None:
    assert load(tmp_path, RINGRIFT_DATA_DIR="data/../node").data_dir == tmp_path / "node"


def test_data_dir_expands_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load(tmp_path, RINGRIFT_DATA_DIR="~/rs").data_dir == tmp_path / "home" / "rs"


def test_data_dir_must_not_be_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    message = error(tmp_path, RINGRIFT_DATA_DIR="file")
    assert message.startswith("RINGRIFT_DATA_DIR = 'file' is not a directory")


# --- inventory, node, coordinator -------------------------------------------------------------


def test_inventory_and_node(tmp_path: Path, inventory_file: Path) -> None:
    s = load(tmp_path, RINGRIFT_CLUSTER_CONFIG="distributed_hosts.yaml", RINGRIFT_NODE_ID="coord")
    assert s.node_id == "coord"
    assert s.inventory.source == inventory_file
    assert s.sync_interval == 15.0  # auto_sync.interval_seconds
    assert s.replication_target == 3


def test_short_hostname_matches_inventory(tmp_path: Path, inventory_file: Path) -> None:
    assert load(tmp_path, RINGRIFT_CLUSTER_CONFIG=str(inventory_file)).node_id == "selfplay-1"


def test_node_not_in_inventory(tmp_path: Path, inventory_file: Path) -> None:
    message = error(tmp_path, RINGRIFT_CLUSTER_CONFIG=str(inventory_file), RINGRIFT_NODE_ID="gpu-9")
    assert message == (
        f"RINGRIFT_NODE_ID = 'gpu-9' is not a host in inventory {inventory_file}; "
        "use one of: coord, train-1, selfplay-1, local-1"
    )


def test_unknown_hostname_without_node_id(tmp_path: Path, inventory_file: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "laptop")
    message = error(tmp_path, RINGRIFT_CLUSTER_CONFIG=str(inventory_file))
    assert message.startswith("RINGRIFT_NODE_ID is unset and this machine's hostname 'laptop'")


def test_host_list_is_capped_at_ten(tmp_path: Path) -> None:
    hosts = "".join(f"  node-{i:02}: {{}}\n" for i in range(25))
    (tmp_path / "big.yaml").write_text("hosts:\n" + hosts)
    message = error(tmp_path, RINGRIFT_CLUSTER_CONFIG="big.yaml", RINGRIFT_NODE_ID="x")
    assert "node-09, … (15 more)" in message
    assert "node-10" not in message


def test_missing_inventory(tmp_path: Path) -> None:
    message = error(tmp_path, RINGRIFT_CLUSTER_CONFIG="nope.yaml")
    assert message == (
        "RINGRIFT_CLUSTER_CONFIG = 'nope.yaml' does not exist; "
        "point it at the cluster's distributed_hosts.yaml"
    )


def test_bad_inventory_error_passes_through(tmp_path: Path) -> None:
    (tmp_path / "hosts.yaml").write_text("hosts:\n  gpu-3:\n    ssh_port: abc\n")
    message = error(tmp_path, RINGRIFT_CLUSTER_CONFIG="hosts.yaml", RINGRIFT_NODE_ID="gpu-3")
    assert "hosts.gpu-3.ssh_port = 'abc' is not a port" in message


def test_coordinator_must_be_a_host(tmp_path: Path, inventory_file: Path) -> None:
    message = error(tmp_path, RINGRIFT_CLUSTER_CONFIG=str(inventory_file),
                    RINGRIFT_COORDINATOR_NODE="boss")
    assert message.startswith("RINGRIFT_COORDINATOR_NODE = 'boss' is not a host in inventory")


def test_coordinator_without_inventory_is_free(tmp_path: Path) -> None:
    assert load(tmp_path, RINGRIFT_COORDINATOR_NODE="boss").coordinator_node == "boss"


# --- P2P endpoint -----------------------------------------------------------------------------


def test_p2p_from_inventory(tmp_path: Path, inventory_file: Path) -> None:
    s = load(tmp_path, RINGRIFT_CLUSTER_CONFIG=str(inventory_file), RINGRIFT_NODE_ID="train-1",
             RINGRIFT_CLUSTER_AUTH_TOKEN=TOKEN)
    assert (s.p2p_host, s.p2p_port) == ("10.0.0.2", 9001)


def test_env_beats_inventory(tmp_path: Path, inventory_file: Path) -> None:
    s = load(tmp_path, RINGRIFT_CLUSTER_CONFIG=str(inventory_file), RINGRIFT_NODE_ID="train-1",
             RINGRIFT_P2P_HOST="127.0.0.1", RINGRIFT_P2P_PORT="9500")
    assert (s.p2p_host, s.p2p_port) == ("127.0.0.1", 9500)


def test_default_host_depends_on_token(tmp_path: Path) -> None:
    assert load(tmp_path).p2p_host == "127.0.0.1"
    assert load(tmp_path, RINGRIFT_CLUSTER_AUTH_TOKEN=TOKEN).p2p_host == "0.0.0.0"


def test_exposed_without_token_is_refused(tmp_path: Path) -> None:
    message = error(tmp_path, RINGRIFT_P2P_HOST="0.0.0.0")
    assert message.startswith("RINGRIFT_P2P_HOST = '0.0.0.0' is not a loopback address")
    assert "RINGRIFT_CLUSTER_AUTH_TOKEN" in message
    assert "RINGRIFT_P2P_HOST=127.0.0.1" in message


def test_exposed_inventory_host_without_token_is_refused(tmp_path: Path,
                                                         inventory_file: Path) -> None:
    message = error(tmp_path, RINGRIFT_CLUSTER_CONFIG=str(inventory_file),
                    RINGRIFT_NODE_ID="train-1")
    assert message.startswith(f"inventory {inventory_file}: hosts.train-1.p2p_host = '10.0.0.2'")


def test_loopback_inventory_host_without_token(tmp_path: Path, inventory_file: Path) -> None:
    s = load(tmp_path, RINGRIFT_CLUSTER_CONFIG=str(inventory_file), RINGRIFT_NODE_ID="local-1")
    assert s.p2p_host == "127.0.0.1"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.9.8.7", "::1", "[::1]", "localhost", "LocalHost"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.1", "example.com", "localhost.evil"])
def test_non_loopback_hosts(host: str) -> None:
    assert not is_loopback_host(host)


# --- the cluster token ------------------------------------------------------------------------


def test_token_file_is_stripped(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(f"  {TOKEN}\n")
    assert load(tmp_path, RINGRIFT_CLUSTER_AUTH_TOKEN_FILE="token").auth_token == TOKEN


def test_both_token_sources_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN)
    message = error(tmp_path, RINGRIFT_CLUSTER_AUTH_TOKEN=TOKEN,
                    RINGRIFT_CLUSTER_AUTH_TOKEN_FILE="token")
    assert "both set; set only one" in message


def test_unreadable_token_file(tmp_path: Path) -> None:
    message = error(tmp_path, RINGRIFT_CLUSTER_AUTH_TOKEN_FILE="missing-token")
    assert message.startswith("RINGRIFT_CLUSTER_AUTH_TOKEN_FILE = 'missing-token' cannot be read")


def test_short_token(tmp_path: Path) -> None:
    message = error(tmp_path, RINGRIFT_CLUSTER_AUTH_TOKEN="hunter2-secret")
    assert message == (
        "RINGRIFT_CLUSTER_AUTH_TOKEN is too short (14 characters); use at least 16, "
        "e.g. `openssl rand -hex 32`"
    )


def test_short_token_from_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("hunter2-secret\n")
    message = error(tmp_path, RINGRIFT_CLUSTER_AUTH_TOKEN_FILE="token")
    assert "is too short (14 characters)" in message
    assert "hunter2" not in message


def test_token_with_control_characters(tmp_path: Path) -> None:
    message = error(tmp_path, RINGRIFT_CLUSTER_AUTH_TOKEN=TOKEN[:10] + "\x07" + TOKEN[10:])
    assert "control characters" in message
    assert TOKEN[:10] not in message


@pytest.mark.parametrize(
    "bad",
    [{"RINGRIFT_P2P_PORT": "x"}, {"RINGRIFT_NODE_ID": "nope"}, {"RINGRIFT_LOG_LEVEL": "loud"},
     {"RINGRIFT_CLUSTER_AUTH_TOKEN_FILE": "token"}, {"RINGRIFT_DATA_DIR": "token"}],
)
def test_token_never_in_error_messages(tmp_path: Path, inventory_file: Path,
                                       bad: dict[str, str]) -> None:
    (tmp_path / "token").write_text(TOKEN)
    env = {"RINGRIFT_CLUSTER_AUTH_TOKEN": TOKEN, "RINGRIFT_CLUSTER_CONFIG": str(inventory_file),
           "RINGRIFT_NODE_ID": "coord", **bad}
    with pytest.raises(ConfigError) as info:
        load_settings(env, cwd=tmp_path)
    assert TOKEN not in str(info.value)
    assert TOKEN not in repr(info.value)


def test_token_not_in_repr_or_describe(tmp_path: Path) -> None:
    s = load(tmp_path, RINGRIFT_CLUSTER_AUTH_TOKEN=TOKEN)
    assert s.auth_token == TOKEN
    assert TOKEN not in repr(s)
    assert TOKEN not in str(s)
    described = s.describe()
    assert TOKEN not in json.dumps(described)
    assert described["auth_token"] == "set"


def test_describe(tmp_path: Path, inventory_file: Path) -> None:
    s = load(tmp_path, RINGRIFT_CLUSTER_CONFIG=str(inventory_file), RINGRIFT_NODE_ID="local-1")
    described = s.describe()
    json.dumps(described)  # plain values only
    assert described["node_id"] == "local-1"
    assert described["auth_token"] == "unset"
    assert described["inventory"] == str(inventory_file)
    assert described["hosts"] == 4
    assert described["replication_target"] == 3
    assert described["data_dir"] == "/var/lib/ringsync"


def test_settings_built_by_hand_keep_working() -> None:
    hosts = {"a": Host(name="a")}
    s = Settings(node_id="a", data_dir=Path("/d"))
    assert s.replication_target == 2
    assert s.synced_dir == Path("/d/games/synced/a")  # per node: RingRift's games/synced/<node>/
    assert s.state_dir == Path("/d/.ringsync/a")
    assert hosts["a"].address == "127.0.0.1"


@pytest.mark.parametrize(("in_file", "env", "expected"), [
    (None, None, True),  # upstream's default
    ("false", None, False),  # the inventory's auto_sync.skip_nfs_sync is honoured
    ("true", None, True),
    ("false", "true", True),  # the environment wins
    ("true", "false", False),
])
def test_skip_nfs_sync_from_inventory_unless_the_env_says(
        tmp_path: Path, in_file: str | None, env: str | None, expected: bool) -> None:
    text = INVENTORY + (f"  skip_nfs_sync: {in_file}\n" if in_file else "")
    (tmp_path / "hosts.yaml").write_text(text)
    extra = {"RINGRIFT_SKIP_NFS_SYNC": env} if env else {}
    s = load(tmp_path, RINGRIFT_CLUSTER_CONFIG="hosts.yaml", RINGRIFT_NODE_ID="selfplay-1", **extra)
    assert s.skip_nfs_sync is expected
