"""Which daemons a node runs: named profile, --sync-only, --daemon, or the inventory role."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from ringsync.cli import resolve_daemons
from ringsync.daemons.base import DaemonType
from ringsync.errors import ConfigError
from ringsync.inventory import Host
from ringsync.profiles import load_profile, parse_daemon_types, profile_for_host, profile_names
from tests.conftest import make_settings

BOTH = (DaemonType.DATA_SERVER, DaemonType.AUTO_SYNC, DaemonType.FILE_SYNC)  # the sync daemons


def args(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(**{"daemon": [], "sync_only": False, "profile": None, **kw})


def test_the_four_profiles_exist_and_parse() -> None:
    assert {"selfplay", "training", "coordinator", "sync-only"} <= set(profile_names())
    assert load_profile("coordinator").daemons == (DaemonType.DATA_SERVER,)
    assert load_profile("selfplay").daemons == BOTH


@pytest.mark.parametrize(("host", "coordinator", "expected"), [
    (Host(name="a", role="gpu_selfplay"), False, "selfplay"),
    (Host(name="a", role="cpu_selfplay"), False, "selfplay"),
    (Host(name="a", role="gpu_training_primary"), False, "training"),
    (Host(name="a", role="storage"), False, "sync-only"),
    (Host(name="a", role="gpu_selfplay"), True, "coordinator"),
    (None, False, "sync-only"),
])
def test_profile_follows_the_role(host: Host | None, coordinator: bool, expected: str) -> None:
    assert profile_for_host(host, is_coordinator=coordinator) == expected


def test_precedence_daemon_then_sync_only_then_profile_then_role(tmp_path: Path) -> None:
    coordinator = make_settings(tmp_path, "coordinator")
    assert resolve_daemons(args(), coordinator) == (DaemonType.DATA_SERVER,)
    assert resolve_daemons(args(profile="training"), coordinator) == BOTH
    assert resolve_daemons(args(sync_only=True, profile="coordinator"), coordinator) == BOTH
    assert resolve_daemons(args(daemon=["data_server"], sync_only=True), coordinator) == (
        DaemonType.DATA_SERVER,)


def test_unknown_daemon_type_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="unknown daemon type 'gossip'; choose from: data_server"):
        parse_daemon_types(["gossip"])
