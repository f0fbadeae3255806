"""NodeContext: the objects one node's daemons share, built once from Settings."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from ringsync.daemons.base import DaemonType, Health
from ringsync.inventory import Host
from ringsync.ops.memory import MemoryTrimmer
from ringsync.ops.metrics import Metrics
from ringsync.policy.router import SyncRouter
from ringsync.settings import Settings
from ringsync.store.manifest import DataManifest
from ringsync.store.receiver import GameReceiver


@dataclass
class NodeContext:
    """Shared by the daemons of one node; no module-level state anywhere."""

    settings: Settings
    metrics: Metrics
    manifest: DataManifest
    router: SyncRouter
    receiver: GameReceiver
    sync_wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    memory: MemoryTrimmer = field(default_factory=MemoryTrimmer)
    daemon_health: Callable[[], dict[DaemonType, Health]] = dict

    @property
    def host(self) -> Host | None:
        return self.settings.inventory.hosts.get(self.settings.node_id)

    def close(self) -> None:
        self.receiver.close()
        self.manifest.close()


def receive_refusal(settings: Settings, router: SyncRouter) -> str | None:
    """Why this node must refuse pushed games (invariant 6), or None."""
    host = settings.inventory.hosts.get(settings.node_id)
    if settings.coordinator_node == settings.node_id or (host and router.is_coordinator(host)):
        return f"{settings.node_id} is the coordinator; it receives no games"
    if host is not None and host.skip_sync_receive:
        return f"{settings.node_id} has skip_sync_receive set; it receives no games"
    return None


def build_context(settings: Settings) -> NodeContext:
    """Open the node's durable state and wire the shared objects."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    settings.synced_dir.mkdir(parents=True, exist_ok=True)
    router = SyncRouter(settings.inventory, settings.node_id, settings.coordinator_node)
    manifest = DataManifest(settings.state_dir / "manifest.db")
    metrics = Metrics()
    receiver = GameReceiver(settings.synced_dir, refuse_reason=receive_refusal(settings, router),
                            manifest=manifest, metrics=metrics)
    return NodeContext(
        settings=settings, metrics=metrics, manifest=manifest, router=router, receiver=receiver
    )
