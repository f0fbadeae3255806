"""Shared storage: the data dir marker, per-node state, the pair decision and the shipper election."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from ringsync.errors import ConfigError, CorruptDataError
from ringsync.inventory import Host, Inventory
from ringsync.node import build_context
from ringsync.policy.shared_storage import (
    SharedStorage,
    SharerElection,
    Siblings,
    StorageIdentity,
    all_skipped,
    nfs_hosts,
    storage_groups,
)
from ringsync.store.manifest import DataManifest, LocalGame
from ringsync.store.sharedir import (
    check_node_dir_name,
    ensure_data_dir_id,
    migrate_legacy_state,
    read_heartbeats,
    write_heartbeat,
)
from tests.conftest import make_settings

OWN = "a" * 32
OTHER = "b" * 32
SSHFS_MOUNTS = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"


# -- the marker --------------------------------------------------------------------------------

def test_marker_is_created_once_and_kept(tmp_path: Path) -> None:
    first = ensure_data_dir_id(tmp_path / ".ringsync")
    assert len(first) == 32
    assert int(first, 16) >= 0
    assert ensure_data_dir_id(tmp_path / ".ringsync") == first
    assert [p.name for p in (tmp_path / ".ringsync").iterdir()] == ["data_dir_id"]  # no temp left


def test_nodes_starting_together_on_one_dir_agree_on_one_marker(tmp_path: Path) -> None:
    seen: list[str] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        seen.append(ensure_data_dir_id(tmp_path / ".ringsync"))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(seen) == 8
    assert len(set(seen)) == 1


def test_a_damaged_marker_is_refused_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / ".ringsync").mkdir()
    (tmp_path / ".ringsync" / "data_dir_id").write_text("not-an-id\n")
    with pytest.raises(CorruptDataError, match="delete the file"):
        ensure_data_dir_id(tmp_path / ".ringsync")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", ".hidden", "data_dir_id"])
def test_node_ids_that_cannot_name_a_state_dir_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="RINGRIFT_NODE_ID"):
        check_node_dir_name(name)


# -- per-node state ----------------------------------------------------------------------------

def test_two_nodes_on_one_data_dir_keep_their_own_state(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    a = build_context(make_settings(tmp_path, "selfplay-1", data_dir=shared), mountinfo=SSHFS_MOUNTS)
    b = build_context(make_settings(tmp_path, "train-1", data_dir=shared), mountinfo=SSHFS_MOUNTS)
    try:
        assert a.shared.own.data_dir_id == b.shared.own.data_dir_id
        assert a.manifest.path != b.manifest.path
        assert a.manifest.path.parent == shared / ".ringsync" / "selfplay-1"
        assert a.settings.synced_dir != b.settings.synced_dir
        assert b.settings.synced_dir == shared / "games" / "synced" / "train-1"
    finally:
        a.close()
        b.close()


def test_a_manifest_of_the_old_layout_moves_into_the_node_dir(tmp_path: Path) -> None:
    root = tmp_path / "data" / ".ringsync"
    old = DataManifest(root / "manifest.db")
    old.record_discovered([LocalGame(g, "games/a.db", "hex8_2p") for g in ("g1", "g2")], [])
    old.ack("train-1", ["g1", "g2"])  # committed in the WAL, not yet checkpointed
    old.close()
    ctx = build_context(make_settings(tmp_path, "selfplay-1", data_dir=tmp_path / "data"))
    try:
        assert ctx.manifest.holders("g1") == ["train-1"]
        assert not (root / "manifest.db").exists()
    finally:
        ctx.close()


def test_migration_leaves_an_existing_node_manifest_alone(tmp_path: Path) -> None:
    root, mine = tmp_path / ".ringsync", tmp_path / ".ringsync" / "n"
    mine.mkdir(parents=True)
    sqlite3.connect(root / "manifest.db").close()
    (mine / "manifest.db").write_bytes(b"")
    assert migrate_legacy_state(root, mine) == []
    assert (root / "manifest.db").exists()


def test_identity_reports_the_mount(tmp_path: Path) -> None:
    mounts = SSHFS_MOUNTS + f"40 22 0:50 / {tmp_path} rw - fuse.sshfs u@h:/export rw\n"
    ctx = build_context(make_settings(tmp_path, "selfplay-1"), mountinfo=mounts)
    try:
        own = ctx.shared.own
        assert (own.fstype, own.mount_source, own.network) == ("fuse.sshfs", "u@h:/export", True)
    finally:
        ctx.close()


# -- the pair decision -------------------------------------------------------------------------

def policy(**kw: object) -> SharedStorage:
    return SharedStorage("sp", StorageIdentity(OWN, "nfs4", "srv:/x", True), **kw)  # type: ignore[arg-type]


def test_only_an_equal_fresh_marker_means_shared() -> None:
    p = policy(ttl=10.0)
    assert p.needs_probe("t1", 0.0)
    assert not p.shares("t1", 0.0)
    p.learned("t1", OWN, 0.0)
    p.learned("t2", OTHER, 0.0)  # a different data dir, even on the same NFS server
    assert p.shares("t1", 5.0)
    assert not p.shares("t2", 5.0)
    assert not p.needs_probe("t1", 5.0)
    assert p.needs_probe("t1", 11.0)
    assert not p.shares("t1", 11.0)
    p.learned("t1", OWN, 11.0)
    p.forget("t1")  # a failed push
    assert not p.shares("t1", 12.0)


def test_skip_nfs_sync_false_sends_to_every_pair() -> None:
    p = policy(enabled=False)
    p.learned("t1", OWN, 0.0)
    assert not p.shares("t1", 0.0)
    assert not p.needs_probe("t1", 0.0)


def test_nfs_flags_restrict_skipping_to_marked_pairs_never_widen_it() -> None:
    p = policy(marked_nfs=frozenset({"sp", "t1"}))
    p.learned("t1", OWN, 0.0)
    p.learned("t2", OWN, 0.0)
    p.learned("t3", OTHER, 0.0)
    assert p.shares("t1", 0.0)
    assert not p.shares("t2", 0.0)  # not an NFS host in the inventory
    p = policy(marked_nfs=frozenset({"sp", "t3"}))
    p.learned("t3", OTHER, 0.0)
    assert not p.shares("t3", 0.0)  # both marked, but a different data dir


def test_nfs_hosts_reads_ringrift_fields_when_present() -> None:
    plain = Inventory(hosts={"a": Host(name="a")})
    assert nfs_hosts(plain) is None

    class _NfsHost:
        nfs_enabled = True
        has_nfs = False

    marked = Inventory(hosts={"a": Host(name="a"), "b": _NfsHost()})  # type: ignore[dict-item]
    assert nfs_hosts(marked) == frozenset({"b"})


def test_status_shows_skips_per_target() -> None:
    p = policy()
    p.learned("t1", OWN, 0.0)
    p.skipped("t1", 3)
    p.skipped("t1", 2)
    status = p.status(0.0)
    assert status["skipped_games"] == {"t1": 5}
    assert status["sharing_targets"] == ["t1"]
    assert status["data_dir_id"] == OWN
    assert status["fstype"] == "nfs4"


def test_all_skipped_needs_targets() -> None:
    assert not all_skipped([], [])
    assert all_skipped(["a"], ["a", "b"])
    assert not all_skipped(["a", "c"], ["a"])


# -- the shipper election ----------------------------------------------------------------------

def test_smallest_live_sharer_ships_and_a_silent_one_is_taken_over() -> None:
    b = SharerElection("b-train", window=10.0)
    b.observe({"a-selfplay": "1"}, 0.0)
    assert b.shipper(0.0) == "a-selfplay"
    assert not b.is_shipper(0.0)
    b.observe({"a-selfplay": "2"}, 8.0)
    assert not b.is_shipper(15.0)  # changed at 8: alive until 18
    b.observe({"a-selfplay": "2"}, 19.0)  # no change since 8
    assert b.is_shipper(19.0)
    b.observe({"a-selfplay": "3"}, 20.0)  # back
    assert not b.is_shipper(20.0)
    b.observe({}, 21.0)  # its state dir is gone
    assert b.is_shipper(21.0)


def test_a_larger_sharer_never_stops_the_smallest_from_shipping() -> None:
    a = SharerElection("a", window=10.0)
    a.observe({"b": "1", "a": "x"}, 0.0)
    assert a.is_shipper(0.0)
    assert a.alive(0.0) == ["b"]


def test_heartbeats_are_read_back_by_name(tmp_path: Path) -> None:
    for name in ("n1", "n2"):
        (tmp_path / name).mkdir()
    write_heartbeat(tmp_path / "n1", 1)
    first = read_heartbeats(tmp_path, {"n1", "n2", "n3"})
    assert list(first) == ["n1"]
    write_heartbeat(tmp_path / "n1", 2)
    assert read_heartbeats(tmp_path, {"n1"})["n1"] != first["n1"]


def test_targets_with_one_data_dir_form_a_group_whose_first_member_is_sent_games() -> None:
    markers = {"t1": "x", "t2": None, "t3": "x", "t4": "y", "t5": "x"}
    groups = storage_groups(["t1", "t2", "t3", "t4", "t5"], markers)
    assert groups == {"t1": Siblings(("t3", "t5"), "t1"), "t3": Siblings(("t1", "t5"), "t1"),
                      "t5": Siblings(("t1", "t3"), "t1")}
    # the first one away (no marker known): the next is sent the games
    assert storage_groups(["t3", "t5"], markers)["t5"].pusher == "t3"
    assert storage_groups(["t1", "t2"], markers) == {}
