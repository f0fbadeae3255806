"""Inventory and env settings of the rsync path: models_dir / training_dir, RINGRIFT_RSYNC_MIN_FILES."""

from __future__ import annotations

from pathlib import Path

import pytest

from ringsync.errors import ConfigError
from ringsync.inventory import Host, parse_inventory
from ringsync.policy.bandwidth import BandwidthLimits
from ringsync.settings import load_settings
from ringsync.transport.rsync import RsyncOptions, bwlimit_args, rsync_command, ssh_command


def test_a_peer_names_its_own_directories_as_absolute_paths() -> None:
    fields = {"models_dir": "/srv/ai-service/models", "training_dir": "/srv/ai-service/data/training"}
    inv = parse_inventory({"hosts": {"t": fields}}, source="h.yaml")
    assert inv.hosts["t"].models_dir == "/srv/ai-service/models"
    assert inv.hosts["t"].training_dir == "/srv/ai-service/data/training"
    with pytest.raises(ConfigError, match=r"hosts\.t\.models_dir = 'models' is not an absolute path"):
        parse_inventory({"hosts": {"t": {"models_dir": "models"}}}, source="h.yaml")


def test_rsync_checks_host_keys_strictly_with_the_inventory_key(tmp_path: Path) -> None:
    base = tmp_path
    (base / "kh").write_text("")
    (base / "key").write_text("")
    peer = Host("t", ssh_host="10.0.0.5", ssh_port=2222, ssh_user="ubuntu", ssh_key=str(base / "key"))
    opts = RsyncOptions(known_hosts=base / "kh")
    ssh = ssh_command(peer, opts)
    assert ssh[:3] == ["ssh", "-p", "2222"]
    for option in ("StrictHostKeyChecking=yes", f"UserKnownHostsFile={base / 'kh'}", "BatchMode=yes"):
        assert option in ssh
    assert "accept-new" not in " ".join(ssh)
    cmd = rsync_command(peer, "/srv/models", base / "list", base / "staging", opts)
    assert cmd[-2:] == ["10.0.0.5:/srv/models/", f"{base / 'staging'}/"]
    assert "--partial-dir" in cmd
    assert "--whole-file" not in cmd  # a resumed file is sent as a delta against its partial


def test_the_batch_threshold_is_read_and_checked(tmp_path: Path) -> None:
    env = {"RINGRIFT_DATA_DIR": str(tmp_path), "RINGRIFT_NODE_ID": "n1", "RINGRIFT_ENV_FILE": "/dev/null",
           "RINGRIFT_P2P_HOST": "127.0.0.1"}
    assert load_settings({**env, "RINGRIFT_RSYNC_MIN_FILES": "7"}).rsync_min_files == 7
    with pytest.raises(ConfigError, match="RINGRIFT_RSYNC_MIN_FILES"):
        load_settings({**env, "RINGRIFT_RSYNC_MIN_FILES": "-1"})


def test_rsync_is_capped_at_the_smaller_of_the_peer_and_total_limits() -> None:
    limits = BandwidthLimits(total_mbps=100.0, peer_mbps={"slow": 8.0}.get)
    assert bwlimit_args(limits, "slow") == ("--bwlimit=976",)  # 8 Mbit/s = 1,000,000 B/s
    assert bwlimit_args(limits, "other") == ("--bwlimit=12207",)  # the node's 100 Mbit/s
    assert bwlimit_args(BandwidthLimits(), "other") == ()
