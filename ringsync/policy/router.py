"""SyncRouter: which nodes receive this node's games, decided without I/O."""

from __future__ import annotations

from dataclasses import dataclass

from ringsync.inventory import Host, Inventory


@dataclass(frozen=True, slots=True)
class Exclusion:
    """A host that gets no games, and why (shown by `ringsync status`)."""

    host: str
    reason: str


class SyncRouter:
    """Chooses game targets from the inventory.

    Targets are ``sync_routing.priority_hosts`` first (in file order), then training
    nodes, then storage nodes and ``allowed_external_storage`` hosts with
    ``receive_games`` true; never the coordinator (not even when it is listed as
    external storage: invariant 6), never a host that is offline, excluded, marked
    ``skip_sync_receive`` or listed as external storage with ``receive_games: false``;
    ``replication_target`` of them (K, default 2).
    """

    def __init__(self, inventory: Inventory, node_id: str, coordinator_node: str | None) -> None:
        self._inventory = inventory
        self._node_id = node_id
        self._coordinator_node = coordinator_node

    def is_coordinator(self, host: Host) -> bool:
        return host.is_coordinator or host.name == self._coordinator_node

    def is_priority(self, host: Host) -> bool:
        return host.name in self._inventory.sync_routing.priority_hosts

    def counts_as_trainer(self, host: Host) -> bool:
        """Training nodes and priority hosts (upstream counts those as training nodes)."""
        return host.is_trainer or self.is_priority(host)

    def exclusion_reason(self, host: Host) -> str | None:
        """Why ``host`` may not receive games, or None when it may."""
        routing = self._inventory.sync_routing
        external = routing.external_storage(host.name)
        stores_games = (self.counts_as_trainer(host) or host.is_storage
                        or (external is not None and external.receive_games))
        checks = (
            (host.name == self._node_id, "this node"),
            (self.is_coordinator(host), "coordinator receives no games"),
            (host.name in routing.excluded_hosts, "in sync_routing.excluded_hosts"),
            (external is not None and not external.receive_games,
             "receive_games is false in sync_routing.allowed_external_storage"),
            (host.skip_sync_receive, "skip_sync_receive is set"),
            (not host.is_online, f"status is {host.status}"),
            (not host.p2p_enabled, "p2p_enabled is false"),
            (not stores_games, f"role {host.role} does not store games"),
        )
        return next((reason for failed, reason in checks if failed), None)

    def game_targets(self) -> list[Host]:
        """The K hosts this node pushes its games to, in a stable order."""
        eligible = [h for h in self._inventory.hosts.values() if self.exclusion_reason(h) is None]
        eligible.sort(key=self._target_order)
        return eligible[: self._inventory.sync_routing.replication_target]

    def _target_order(self, host: Host) -> tuple[int, int, str]:
        priority = self._inventory.sync_routing.priority_hosts
        rank = priority.index(host.name) if host.name in priority else len(priority)
        return (rank, 0 if self.counts_as_trainer(host) else 1, host.name)

    def auto_sync_excluded(self) -> str | None:
        """Why this node skips its own auto-sync cycles (it still receives), or None."""
        auto = self._inventory.auto_sync
        if not auto.enabled:
            return "auto_sync.enabled is false in the inventory"
        if self._node_id in auto.exclude_hosts:
            return f"{self._node_id} is in auto_sync.exclude_hosts in the inventory"
        return None

    def exclusions(self) -> list[Exclusion]:
        out = []
        for host in self._inventory.hosts.values():
            reason = self.exclusion_reason(host)
            if reason is not None and host.name != self._node_id:
                out.append(Exclusion(host.name, reason))
        return out

    def get_sync_status(self) -> dict[str, object]:
        """The routing decision, readable by people and machines."""
        return {
            "node": self._node_id,
            "targets": [h.name for h in self.game_targets()],
            "replication_target": self._inventory.sync_routing.replication_target,
            "excluded": {e.host: e.reason for e in self.exclusions()},
            "auto_sync_skipped": self.auto_sync_excluded(),
        }
