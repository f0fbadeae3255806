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

    Targets are training nodes first, then storage nodes, never the coordinator,
    never a host that is offline, excluded or marked ``skip_sync_receive``;
    ``replication_target`` of them (K, default 2).
    """

    def __init__(self, inventory: Inventory, node_id: str, coordinator_node: str | None) -> None:
        self._inventory = inventory
        self._node_id = node_id
        self._coordinator_node = coordinator_node

    def is_coordinator(self, host: Host) -> bool:
        return host.is_coordinator or host.name == self._coordinator_node

    def exclusion_reason(self, host: Host) -> str | None:
        """Why ``host`` may not receive games, or None when it may."""
        checks = (
            (host.name == self._node_id, "this node"),
            (self.is_coordinator(host), "coordinator receives no games"),
            (host.name in self._inventory.sync_routing.excluded_hosts, "in sync_routing.excluded_hosts"),
            (host.skip_sync_receive, "skip_sync_receive is set"),
            (not host.is_online, f"status is {host.status}"),
            (not host.p2p_enabled, "p2p_enabled is false"),
            (not (host.is_trainer or host.is_storage), f"role {host.role} does not store games"),
        )
        return next((reason for failed, reason in checks if failed), None)

    def game_targets(self) -> list[Host]:
        """The K hosts this node pushes its games to, in a stable order."""
        eligible = [h for h in self._inventory.hosts.values() if self.exclusion_reason(h) is None]
        eligible.sort(key=lambda h: (not h.is_trainer, h.name))
        return eligible[: self._inventory.sync_routing.replication_target]

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
        }
