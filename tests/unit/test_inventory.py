"""The inventory reads RingRift's distributed_hosts.yaml unchanged and rejects bad values clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ringsync.errors import ConfigError
from ringsync.inventory import ExternalStorage, Host, Inventory, load_inventory, parse_inventory

HOSTS_YAML = """\
# RingRift cluster inventory (trimmed)
hosts:
  mac-studio:
    ssh_host: 100.107.168.125
    ssh_user: armand
    tailscale_ip: 100.107.168.125
    role: coordinator
    status: ready
    gpu: M3 Ultra
    memory_gb: 96
    selfplay_enabled: false
    training_enabled: false
  lambda-gh200-a:
    ssh_host: 192.222.51.29
    ssh_port: 22
    ssh_user: ubuntu
    ssh_key: ~/.ssh/id_cluster
    tailscale_ip: 100.123.183.70
    role: gpu_training_primary
    status: ready
    gpu: GH200
    gpu_vram_gb: 96
    bandwidth_mbps: 1000
    selfplay_enabled: true
    training_enabled: true
    ringrift_path: ~/ringrift/ai-service
  nebius-h100-1:
    ssh_host: 89.169.112.47
    ssh_port: "2222"
    ssh_user: ubuntu
    role: nn_training_primary
    status: ready
    training_enabled: "true"
    p2p_port: 8771
  vast-4090-7:
    ssh_host: ssh5.vast.ai
    ssh_port: 14398
    ssh_user: root
    role: gpu_selfplay
    status: ready
    is_ephemeral: true
    skip_sync_receive: true
    bandwidth_mbps: 250.5
    selfplay_enabled: true
    p2p_enabled: false
  hetzner-cpu1:
    ssh_host: 46.62.147.150
    role: cpu_selfplay
    status: retired
    selfplay_enabled: true
  backbone-storage:
    ssh_host: 10.0.0.5
    role: storage_aggregator
    status: ready
    p2p_host: 10.0.0.5
sync_routing:
  replication_target: 3
  excluded_hosts: [mac-studio, not-in-hosts]
  priority_hosts: [lambda-gh200-a]
  max_disk_usage_percent: 70
auto_sync:
  enabled: true
  interval_seconds: 45
  gossip_interval_seconds: 30
elo_sync:
  enabled: true
"""


@pytest.fixture
def hosts_file(tmp_path: Path) -> Path:
    path = tmp_path / "distributed_hosts.yaml"
    path.write_text(HOSTS_YAML)
    return path


def _doc() -> dict[str, object]:
    doc = yaml.safe_load(HOSTS_YAML)
    assert isinstance(doc, dict)
    return doc


def _host_fields(doc: dict[str, object], name: str) -> dict[str, object]:
    hosts = doc["hosts"]
    assert isinstance(hosts, dict)
    fields = hosts[name]
    assert isinstance(fields, dict)
    return fields


def _parse_error(doc: object) -> str:
    with pytest.raises(ConfigError) as info:
        parse_inventory(doc, source="/etc/ringsync/hosts.yaml")
    message = str(info.value)
    assert message.startswith("inventory /etc/ringsync/hosts.yaml: ")
    return message


def test_reads_a_ringrift_inventory(hosts_file: Path) -> None:
    inv = load_inventory(hosts_file)
    assert inv.source == hosts_file
    assert inv.host_names == [
        "mac-studio", "lambda-gh200-a", "nebius-h100-1", "vast-4090-7", "hetzner-cpu1",
        "backbone-storage",
    ]
    gh200 = inv.hosts["lambda-gh200-a"]
    assert gh200 == Host(
        name="lambda-gh200-a", role="gpu_training_primary", status="ready",
        ssh_host="192.222.51.29", ssh_port=22, ssh_user="ubuntu", ssh_key="~/.ssh/id_cluster",
        tailscale_ip="100.123.183.70", bandwidth_mbps=1000.0, selfplay_enabled=True,
        training_enabled=True,
    )
    assert gh200.address == "100.123.183.70"


def test_lenient_where_ringrift_is(hosts_file: Path) -> None:
    nebius = load_inventory(hosts_file).hosts["nebius-h100-1"]
    assert nebius.ssh_port == 2222
    assert nebius.training_enabled is True
    assert nebius.p2p_port == 8771


def test_flags_and_defaults(hosts_file: Path) -> None:
    inv = load_inventory(hosts_file)
    vast = inv.hosts["vast-4090-7"]
    assert (vast.is_ephemeral, vast.skip_sync_receive, vast.p2p_enabled) == (True, True, False)
    assert vast.bandwidth_mbps == 250.5
    coordinator = inv.hosts["mac-studio"]
    assert coordinator.ssh_port == 22
    assert coordinator.p2p_port == 8770
    assert coordinator.p2p_enabled is True
    assert coordinator.bandwidth_mbps is None


def test_role_and_status_helpers(hosts_file: Path) -> None:
    hosts = load_inventory(hosts_file).hosts
    assert [n for n, h in hosts.items() if h.is_coordinator] == ["mac-studio"]
    assert [n for n, h in hosts.items() if h.is_trainer] == ["lambda-gh200-a", "nebius-h100-1"]
    assert [n for n, h in hosts.items() if h.is_storage] == ["backbone-storage"]
    assert [n for n, h in hosts.items() if not h.is_online] == ["hetzner-cpu1"]
    assert hosts["backbone-storage"].address == "10.0.0.5"


@pytest.mark.parametrize("status", ["offline", "RETIRED", "Terminated", "disabled",
                                    "decommissioned", "stopped "])
def test_offline_statuses(status: str) -> None:
    assert not Host(name="x", status=status).is_online


def test_other_statuses_are_online() -> None:
    assert Host(name="x", status="setup").is_online
    assert Host(name="x").is_online


def test_role_helpers_by_substring() -> None:
    assert Host(name="c", role="backup_coordinator").is_coordinator
    assert Host(name="t", role="cpu_selfplay", training_enabled=True).is_trainer
    assert Host(name="a", role="data_aggregator").is_storage
    assert not Host(name="b", role="backbone").is_storage


def test_sections(hosts_file: Path) -> None:
    inv = load_inventory(hosts_file)
    assert inv.sync_routing.replication_target == 3
    assert inv.sync_routing.excluded_hosts == frozenset({"mac-studio", "not-in-hosts"})
    assert inv.auto_sync.enabled is True
    assert inv.auto_sync.interval_seconds == 45.0


def test_sections_are_optional() -> None:
    inv = parse_inventory({"hosts": {"a": {}}}, source="x")
    assert inv.sync_routing.replication_target == 2
    assert inv.sync_routing.excluded_hosts == frozenset()
    assert inv.auto_sync.enabled is True
    assert inv.auto_sync.interval_seconds is None
    assert inv.hosts["a"] == Host(name="a")


def test_null_values_mean_defaults() -> None:
    doc = {"hosts": {"a": {"ssh_port": None, "role": None, "is_ephemeral": None}},
           "sync_routing": None, "auto_sync": {"interval_seconds": None}}
    inv = parse_inventory(doc, source="x")
    assert inv.hosts["a"] == Host(name="a")
    assert inv.auto_sync.interval_seconds is None


def test_numeric_host_names_become_strings() -> None:
    inv = parse_inventory({"hosts": {101: {"role": "gpu_selfplay"}}}, source="x")
    assert list(inv.hosts) == ["101"]


def test_single_node_inventory() -> None:
    inv = Inventory.single_node("solo")
    assert "solo" in inv
    assert inv.get("solo") == Host(name="solo")
    assert inv.get("other") is None


# --- malformed files -------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"inventory {path}: file not found"):
        load_inventory(path)


def test_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"inventory {tmp_path}: cannot read it"):
        load_inventory(tmp_path)


def test_permission_denied(hosts_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root in CI, where chmod 0 does not stop a read: fake the refusal.
    def refuse(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(ConfigError, match=r"cannot read it \(Permission denied\)"):
        load_inventory(hosts_file)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "hosts.yaml"
    path.write_bytes(b"hosts:\n  a: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_inventory(path)


def test_not_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "hosts.yaml"
    path.write_text("hosts:\n  a:\n    role: gpu_selfplay\n    status: [ready\n")
    with pytest.raises(ConfigError) as info:
        load_inventory(path)
    message = str(info.value)
    assert message.startswith(f"inventory {path}: not valid YAML")
    assert "line 5" in message or "line 4" in message


def test_bad_indentation_quotes_the_line(tmp_path: Path) -> None:
    path = tmp_path / "hosts.yaml"
    path.write_text("hosts:\n  a:\n    role: x\n   status: ready\n")
    with pytest.raises(ConfigError, match=r"line 4, column \d+: 'status: ready'"):
        load_inventory(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "hosts.yaml"
    path.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_inventory(path)


def test_top_level_not_a_mapping() -> None:
    assert "(top level) = ['a', 'b'] is not a mapping" in _parse_error(["a", "b"])


def test_hosts_missing() -> None:
    assert "hosts is missing" in _parse_error({"sync_routing": {}})


def test_hosts_not_a_mapping() -> None:
    assert "hosts = ['a', 'b'] is not a mapping" in _parse_error({"hosts": ["a", "b"]})


def test_hosts_empty() -> None:
    assert "hosts = {} is empty" in _parse_error({"hosts": {}})


def test_host_not_a_mapping() -> None:
    message = _parse_error({"hosts": {"gpu-3": "10.0.0.3"}})
    assert "hosts.gpu-3 = '10.0.0.3' is not a mapping" in message


def test_host_name_not_a_string() -> None:
    assert "host name that is not a string" in _parse_error({"hosts": {None: {}}})


def test_error_message_format() -> None:
    doc = {"hosts": {"gpu-3": {"ssh_port": "abc"}}}
    assert _parse_error(doc) == (
        "inventory /etc/ringsync/hosts.yaml: hosts.gpu-3.ssh_port = 'abc' is not a port; "
        "use an integer 1-65535"
    )


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("ssh_port", 0, "hosts.vast-4090-7.ssh_port = 0 is not a port; use an integer 1-65535"),
        ("ssh_port", 70000, "ssh_port = 70000 is not a port"),
        ("ssh_port", True, "ssh_port = True is not a port"),
        ("ssh_port", 22.5, "ssh_port = 22.5 is not a port"),
        ("p2p_port", "-1", "hosts.vast-4090-7.p2p_port = '-1' is not a port"),
        ("is_ephemeral", "maybe", "is_ephemeral = 'maybe' is not a boolean; use true or false"),
        ("is_ephemeral", 1, "is_ephemeral = 1 is not a boolean"),
        ("skip_sync_receive", [], "skip_sync_receive = [] is not a boolean"),
        ("selfplay_enabled", "on", "selfplay_enabled = 'on' is not a boolean"),
        ("training_enabled", 0, "training_enabled = 0 is not a boolean"),
        ("p2p_enabled", "", "p2p_enabled = '' is not a boolean"),
        ("bandwidth_mbps", -5, "bandwidth_mbps = -5 is not allowed; use a number >= 0"),
        ("bandwidth_mbps", "fast", "bandwidth_mbps = 'fast' is not allowed"),
        ("bandwidth_mbps", ".nan", "bandwidth_mbps = '.nan' is not allowed"),
        ("ssh_host", ["a"], "hosts.vast-4090-7.ssh_host = ['a'] is not a string"),
        ("role", {"a": 1}, "role = {'a': 1} is not a string"),
        ("status", True, "status = True is not a string"),
        ("tailscale_ip", {}, "tailscale_ip = {} is not a string"),
    ],
)
def test_bad_host_field(field: str, value: object, expected: str) -> None:
    doc = _doc()
    _host_fields(doc, "vast-4090-7")[field] = value
    message = _parse_error(doc)
    assert expected in message
    assert f"hosts.vast-4090-7.{field} = " in message


def test_long_bad_values_are_shortened() -> None:
    doc = _doc()
    _host_fields(doc, "mac-studio")["ssh_port"] = "9" * 500
    assert len(_parse_error(doc)) < 250


@pytest.mark.parametrize(
    ("section", "value", "expected"),
    [
        ("sync_routing", [], "sync_routing = [] is not a mapping"),
        ("sync_routing", {"replication_target": 0},
         "sync_routing.replication_target = 0 is not allowed; use an integer >= 1"),
        ("sync_routing", {"replication_target": "two"},
         "sync_routing.replication_target = 'two' is not allowed"),
        ("sync_routing", {"excluded_hosts": "mac-studio"},
         "sync_routing.excluded_hosts = 'mac-studio' is not a list of host names"),
        ("sync_routing", {"excluded_hosts": [{"a": 1}]}, "sync_routing.excluded_hosts = [{'a': 1}]"),
        ("auto_sync", "yes", "auto_sync = 'yes' is not a mapping"),
        ("auto_sync", {"enabled": "sometimes"},
         "auto_sync.enabled = 'sometimes' is not a boolean"),
        ("auto_sync", {"interval_seconds": 0},
         "auto_sync.interval_seconds = 0 is not allowed; use a number > 0"),
        ("auto_sync", {"interval_seconds": -3}, "auto_sync.interval_seconds = -3"),
        ("sync_routing", {"max_disk_usage_percent": 170},
         "sync_routing.max_disk_usage_percent = 170 is not a percentage; use a number 0-100"),
        ("sync_routing", {"priority_hosts": "a,b"}, "sync_routing.priority_hosts = 'a,b' is not a list"),
        ("sync_routing", {"allowed_external_storage": {"host": "x"}},
         "sync_routing.allowed_external_storage = {'host': 'x'} is not a list of mappings"),
        ("sync_routing", {"allowed_external_storage": [{"path": "/Volumes/x"}]},
         "sync_routing.allowed_external_storage[0] has no host:"),
        ("sync_routing", {"allowed_external_storage": [{"host": "a", "receive_games": "no"}]},
         "sync_routing.allowed_external_storage[0].receive_games = 'no' is not a boolean"),
        ("sync_routing", {"allowed_external_storage": [{"host": "a", "subdirs": ["games"]}]},
         "sync_routing.allowed_external_storage[0].subdirs = ['games'] is not a mapping"),
        ("sync_routing", {"s3": {"enabled": "maybe"}}, "sync_routing.s3.enabled = 'maybe'"),
        ("auto_sync", {"skip_nfs_sync": "sometimes"}, "auto_sync.skip_nfs_sync = 'sometimes'"),
        ("auto_sync", {"max_concurrent_syncs": 0},
         "auto_sync.max_concurrent_syncs = 0 is not allowed; use an integer >= 1"),
        ("auto_sync", {"min_games_to_sync": -1}, "auto_sync.min_games_to_sync = -1"),
        ("auto_sync", {"bandwidth_limit_mbps": -1},
         "auto_sync.bandwidth_limit_mbps = -1 is not allowed; use a number >= 0 (0: no limit)"),
        ("auto_sync", {"exclude_hosts": "vast-4090-7"}, "auto_sync.exclude_hosts = 'vast-4090-7'"),
        ("auto_sync", {"host_bandwidth_overrides": {"vast-*": "fast"}},
         "auto_sync.host_bandwidth_overrides = {'vast-*': 'fast'} is not a mapping of host "
         "patterns (globs such as vast-*) to Mbit/s >= 0 (0: no limit)"),
    ],
)
def test_bad_section_field(section: str, value: object, expected: str) -> None:
    doc = _doc()
    doc[section] = value
    assert expected in _parse_error(doc)


def test_string_numbers_in_sections() -> None:
    doc = _doc()
    doc["sync_routing"] = {"replication_target": "1"}
    doc["auto_sync"] = {"interval_seconds": "2.5", "enabled": "False"}
    inv = parse_inventory(doc, source="x")
    assert inv.sync_routing.replication_target == 1
    assert inv.auto_sync.interval_seconds == 2.5
    assert inv.auto_sync.enabled is False


def test_unknown_sections_and_fields_are_ignored() -> None:
    doc = _doc()
    doc["something_new"] = [1, 2, 3]
    _host_fields(doc, "mac-studio")["future_field"] = {"nested": True}
    assert "mac-studio" in parse_inventory(doc, source="x")


UPSTREAM_SECTIONS = """\
sync_routing:
  max_disk_usage_percent: 80
  target_disk_usage_percent: 65
  min_free_disk_percent: 10
  replication_target: 3
  excluded_hosts: [hetzner-cpu1]
  priority_hosts: [nebius-h100-1, lambda-gh200-a, nebius-h100-1]
  underserved_configs: [hex8_4p, square19_3p]
  allowed_external_storage:
    - host: mac-studio
      path: /Volumes/RingRift-Data
      receive_games: true
      receive_npz: false
      receive_models: true
      subdirs:
        games: selfplay_repository
        npz: canonical_data
    - host: vast-4090-7
      receive_games: false
  s3:
    enabled: true
    bucket: ringrift-data
auto_sync:
  enabled: true
  interval_seconds: 30
  gossip_interval_seconds: 15
  skip_nfs_sync: false
  max_concurrent_syncs: 2
  min_games_to_sync: 10
  bandwidth_limit_mbps: 100
  exclude_hosts: [mac-studio, typo-host]
  host_bandwidth_overrides:
    "vast-*": 50
    lambda-gh200-a: "400"
"""


def test_reads_every_upstream_sync_key() -> None:
    doc = _doc()
    doc.update(yaml.safe_load(UPSTREAM_SECTIONS))
    _host_fields(doc, "lambda-gh200-a")["nfs_enabled"] = True
    _host_fields(doc, "nebius-h100-1")["has_nfs"] = "true"
    inv = parse_inventory(doc, source="x")
    routing, auto = inv.sync_routing, inv.auto_sync
    assert (routing.max_disk_usage_percent, routing.target_disk_usage_percent,
            routing.min_free_disk_percent) == (80, 65, 10)
    assert routing.priority_hosts == ("nebius-h100-1", "lambda-gh200-a")  # file order, once each
    assert routing.underserved_configs == ("hex8_4p", "square19_3p")
    assert routing.allowed_external_storage == (
        ExternalStorage(host="mac-studio", path="/Volumes/RingRift-Data", receive_games=True,
                        receive_npz=False, receive_models=True,
                        subdirs={"games": "selfplay_repository", "npz": "canonical_data"}),
        ExternalStorage(host="vast-4090-7", receive_games=False),
    )
    assert routing.s3_enabled is True
    assert auto.skip_nfs_sync is False
    assert (auto.gossip_interval_seconds, auto.max_concurrent_syncs, auto.min_games_to_sync,
            auto.bandwidth_limit_mbps) == (15, 2, 10, 100)
    assert auto.exclude_hosts == frozenset({"mac-studio", "typo-host"})
    assert auto.host_bandwidth_overrides == {"vast-*": 50.0, "lambda-gh200-a": 400.0}
    assert [h.name for h in inv.hosts.values() if h.nfs_enabled] == ["lambda-gh200-a", "nebius-h100-1"]
    # A name that is not a host is tolerated (upstream does) but said, with a suggestion.
    assert any("auto_sync.exclude_hosts names 'typo-host'" in n for n in inv.notes)
    # Keys read but not acted on are said at start-up, never silently dropped.
    assert any("min_games_to_sync = 10 is not a gate" in n for n in inv.notes)
    for key in ("max_concurrent_syncs", "underserved_configs", "s3.enabled"):
        assert any(key in n and "not used by ringsync yet" in n for n in inv.notes), key
    for key in ("bandwidth_limit_mbps", "host_bandwidth_overrides"):  # the bandwidth limiter's
        assert not any(key in n for n in inv.notes), key


def test_upstream_defaults_when_sections_are_absent() -> None:
    inv = parse_inventory({"hosts": {"a": {"ssh_host": "10.0.0.1"}}}, source="x")
    assert inv.hosts["a"].role == "selfplay"  # upstream's default role
    assert inv.sync_routing.max_disk_usage_percent == 70
    assert inv.auto_sync.skip_nfs_sync is None  # not set: RINGRIFT_SKIP_NFS_SYNC decides
    assert inv.sync_routing.s3_enabled is False
    assert inv.notes == ()


@pytest.mark.parametrize("role", [
    "coordinator", "gpu_training_selfplay", "gpu_training_primary", "gpu_selfplay", "cpu_selfplay",
    "proxy", "nn_training_primary", "storage", "aggregator", "selfplay", "training",
    "storage_aggregator", "GPU_Training_H100",
])
def test_known_and_classifiable_roles_load(role: str) -> None:
    doc = {"hosts": {"a": {"role": role}}}
    assert parse_inventory(doc, source="x").hosts["a"].role == role


def test_unknown_role_is_an_error_with_a_suggestion_and_the_known_roles() -> None:
    doc = _doc()
    _host_fields(doc, "nebius-h100-1")["role"] = "gpu_trainnig_primary"
    message = _parse_error(doc)
    assert "hosts.nebius-h100-1.role = 'gpu_trainnig_primary' is not a known role" in message
    assert "did you mean gpu_training_primary?" in message
    for role in ("coordinator", "gpu_selfplay", "cpu_selfplay", "proxy", "nn_training_primary"):
        assert role in message


@pytest.mark.parametrize(("field", "value"), [
    ("tailscale_ip", "<tailscale-ip>"),
    ("ssh_host", "x.x.x.x"),
    ("p2p_host", "TODO"),
    ("ssh_host", "{{ host }}"),
    ("tailscale_ip", "100.x.x.x"),
])
def test_placeholder_address_is_an_error_naming_host_field_and_fix(field: str, value: str) -> None:
    doc = _doc()
    _host_fields(doc, "vast-4090-7")[field] = value
    message = _parse_error(doc)
    assert f"hosts.vast-4090-7.{field} = {value!r} is a template placeholder" in message
    assert "put this host's real address there" in message


@pytest.mark.parametrize("value", ["ssh5.vast.ai", "100.107.168.125", "fd7a:115c:a1e0::1",
                                   "node-x.example.com", "todoist-host"])
def test_real_addresses_are_not_placeholders(value: str) -> None:
    doc = {"hosts": {"a": {"ssh_host": value}}}
    assert parse_inventory(doc, source="x").hosts["a"].ssh_host == value


def test_the_example_inventory_in_the_repo_loads_and_routes_to_the_trainers() -> None:
    from ringsync.policy.router import SyncRouter

    inv = load_inventory(Path(__file__).parents[2] / "examples" / "distributed_hosts.yaml")
    assert inv.notes == ()
    targets = SyncRouter(inv, "vast-4090-7", None).game_targets()
    assert [h.name for h in targets] == ["gh200-a", "h100-1"]  # never the coordinator
