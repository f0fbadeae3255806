"""SyncRouter: who receives this node's games, and why the others do not."""

from __future__ import annotations

from ringsync.inventory import AutoSyncSection, ExternalStorage, Host, Inventory, SyncRouting
from ringsync.policy.router import SyncRouter


def inventory(k: int = 2, excluded: frozenset[str] = frozenset()) -> Inventory:
    hosts = [
        Host(name="sp-1", role="gpu_selfplay"),
        Host(name="coord", role="coordinator", training_enabled=True),
        Host(name="train-b", role="nn_training_primary"),
        Host(name="train-a", role="gpu_training_primary"),
        Host(name="store-1", role="storage"),
        Host(name="gone", role="gpu_training_primary", status="retired"),
        Host(name="quiet", role="gpu_training_primary", skip_sync_receive=True),
        Host(name="nop2p", role="gpu_training_primary", p2p_enabled=False),
        Host(name="sp-2", role="cpu_selfplay"),
    ]
    return Inventory(hosts={h.name: h for h in hosts},
                     sync_routing=SyncRouting(replication_target=k, excluded_hosts=excluded))


def test_targets_are_trainers_first_k_of_them() -> None:
    router = SyncRouter(inventory(), "sp-1", None)
    assert [h.name for h in router.game_targets()] == ["train-a", "train-b"]


def test_storage_fills_in_when_k_exceeds_trainers() -> None:
    router = SyncRouter(inventory(k=3), "sp-1", None)
    assert [h.name for h in router.game_targets()] == ["train-a", "train-b", "store-1"]


def test_coordinator_never_receives_games_even_with_training_enabled() -> None:
    router = SyncRouter(inventory(k=10), "sp-1", None)
    names = [h.name for h in router.game_targets()]
    assert "coord" not in names
    assert router.get_sync_status()["excluded"]["coord"] == "coordinator receives no games"


def test_coordinator_named_by_env_is_excluded_whatever_its_role() -> None:
    router = SyncRouter(inventory(k=10), "sp-1", "train-a")
    assert "train-a" not in [h.name for h in router.game_targets()]


def test_offline_skip_receive_excluded_and_p2p_disabled_hosts_get_nothing() -> None:
    router = SyncRouter(inventory(k=10, excluded=frozenset({"train-b"})), "sp-1", None)
    assert [h.name for h in router.game_targets()] == ["train-a", "store-1"]
    excluded = router.get_sync_status()["excluded"]
    assert isinstance(excluded, dict)
    assert excluded["gone"] == "status is retired"
    assert excluded["quiet"] == "skip_sync_receive is set"
    assert excluded["nop2p"] == "p2p_enabled is false"
    assert excluded["train-b"] == "in sync_routing.excluded_hosts"
    assert excluded["sp-2"].startswith("role cpu_selfplay")


def test_a_node_never_targets_itself() -> None:
    router = SyncRouter(inventory(k=10), "train-a", None)
    assert "train-a" not in [h.name for h in router.game_targets()]


def routed(**routing: object) -> Inventory:
    base = inventory(k=10)
    return Inventory(hosts=base.hosts, sync_routing=SyncRouting(**routing))  # type: ignore[arg-type]


def test_priority_hosts_are_served_first_in_file_order_and_count_as_trainers() -> None:
    inv = routed(replication_target=3, priority_hosts=("sp-2", "store-1"))
    router = SyncRouter(inv, "sp-1", None)
    # sp-2 is a selfplay node: receives only because it is a priority host.
    assert [h.name for h in router.game_targets()] == ["sp-2", "store-1", "train-a"]
    assert router.counts_as_trainer(inv.hosts["sp-2"])


def test_priority_never_overrides_coordinator_or_exclusion() -> None:
    inv = routed(replication_target=10, priority_hosts=("coord", "gone"))
    names = [h.name for h in SyncRouter(inv, "sp-1", None).game_targets()]
    assert "coord" not in names
    assert "gone" not in names


def test_external_storage_with_receive_games_is_a_target_whatever_its_role() -> None:
    inv = routed(replication_target=10,
                 allowed_external_storage=(ExternalStorage(host="sp-2", path="/Volumes/x"),))
    names = [h.name for h in SyncRouter(inv, "sp-1", None).game_targets()]
    assert names == ["train-a", "train-b", "sp-2", "store-1"]


def test_external_storage_with_receive_games_false_gets_no_games() -> None:
    inv = routed(replication_target=10, allowed_external_storage=(
        ExternalStorage(host="train-a", receive_games=False, receive_models=True),))
    router = SyncRouter(inv, "sp-1", None)
    assert "train-a" not in [h.name for h in router.game_targets()]
    assert "receive_games is false" in str(router.get_sync_status()["excluded"])


def test_coordinator_listed_as_external_storage_still_receives_no_games() -> None:
    inv = routed(replication_target=10, allowed_external_storage=(ExternalStorage(host="coord"),))
    assert "coord" not in [h.name for h in SyncRouter(inv, "sp-1", None).game_targets()]


def test_auto_sync_excluded_when_listed_or_disabled() -> None:
    base = inventory()
    listed = Inventory(hosts=base.hosts, auto_sync=AutoSyncSection(exclude_hosts=frozenset({"sp-1"})))
    assert "auto_sync.exclude_hosts" in str(SyncRouter(listed, "sp-1", None).auto_sync_excluded())
    assert SyncRouter(listed, "sp-2", None).auto_sync_excluded() is None
    off = Inventory(hosts=base.hosts, auto_sync=AutoSyncSection(enabled=False))
    router = SyncRouter(off, "sp-2", None)
    assert "auto_sync.enabled is false" in str(router.auto_sync_excluded())
    assert router.get_sync_status()["auto_sync_skipped"] == router.auto_sync_excluded()
