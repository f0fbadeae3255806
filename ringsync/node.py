"""NodeContext: the objects one node's daemons share, built once from Settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ringsync.health import DaemonType, Health
from ringsync.inventory import Host
from ringsync.ops.fsdetect import mount_of
from ringsync.ops.memory import MemoryTrimmer
from ringsync.ops.metrics import Metrics
from ringsync.policy.backoff import Clock
from ringsync.policy.bandwidth import BandwidthLimiter
from ringsync.policy.breaker import BreakerChange, BreakerConfig, Breakers, BreakerState, CircuitBreaker
from ringsync.policy.router import SyncRouter
from ringsync.policy.shared_storage import SharedStorage, StorageIdentity, nfs_hosts
from ringsync.settings import Settings
from ringsync.store.manifest import JOURNAL_NAME, DataManifest
from ringsync.store.receiver import GameReceiver
from ringsync.store.sharedir import check_node_dir_name, ensure_data_dir_id, migrate_legacy_state

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from ringsync.transport.ssh_tunnel import SshTunnels


@dataclass
class NodeContext:
    """Shared by the daemons of one node; no module-level state anywhere."""

    settings: Settings
    metrics: Metrics
    manifest: DataManifest
    router: SyncRouter
    receiver: GameReceiver
    shared: SharedStorage
    sync_wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    memory: MemoryTrimmer = field(default_factory=MemoryTrimmer)
    bandwidth: BandwidthLimiter = field(default_factory=BandwidthLimiter)  # paces every send
    breakers: Breakers = field(default_factory=Breakers)  # per (peer, transport), every path
    daemon_health: Callable[[], dict[DaemonType, Health]] = dict
    _ssh: SshTunnels | None = field(default=None, repr=False)

    @property
    def host(self) -> Host | None:
        return self.settings.inventory.hosts.get(self.settings.node_id)

    def ssh(self) -> SshTunnels:
        """The node's SSH connections, one per peer, shared by games, files and rsync
        (built on first use; no connection opens before a peer is reached over SSH)."""
        if self._ssh is None:
            from ringsync.transport.ssh_tunnel import SshOptions, SshTunnels  # transport imports node

            self._ssh = SshTunnels(SshOptions.from_settings(self.settings))
        return self._ssh

    async def close_connections(self) -> None:
        """Stop the SSH masters and wait for them (bounded; shielded from a second cancel)."""
        if self._ssh is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(15):
                    await asyncio.shield(self._ssh.close())

    def close(self) -> None:
        if self._ssh is not None:
            self._ssh.kill_now()  # whatever close_connections did not get to
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


def storage_identity(settings: Settings, *, mountinfo: str | None = None) -> StorageIdentity:
    """This data dir's marker (created on first use) and the mount it lives on."""
    marker = ensure_data_dir_id(settings.state_root)
    mount = mount_of(settings.data_dir, mountinfo=mountinfo)
    return StorageIdentity(marker, mount.fstype, mount.source, mount.is_network)


def build_context(settings: Settings, *, mountinfo: str | None = None) -> NodeContext:
    """Open the node's durable state and wire the shared objects."""
    check_node_dir_name(settings.node_id)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    settings.synced_dir.mkdir(parents=True, exist_ok=True)
    identity = storage_identity(settings, mountinfo=mountinfo)
    migrate_legacy_state(settings.state_root, settings.state_dir)
    router = SyncRouter(settings.inventory, settings.node_id, settings.coordinator_node)
    manifest = DataManifest(settings.state_dir / JOURNAL_NAME)
    metrics = Metrics()
    receiver = GameReceiver(settings.synced_dir, refuse_reason=receive_refusal(settings, router),
                            manifest=manifest, metrics=metrics, max_configs=settings.max_configs,
                            ledger=settings.state_dir / "received_configs.db",
                            shard_bytes=settings.merged_shard_mb << 20)
    shared = SharedStorage(settings.node_id, identity, enabled=settings.skip_nfs_sync,
                           marked_nfs=nfs_hosts(settings.inventory))
    return NodeContext(settings=settings, metrics=metrics, manifest=manifest, router=router,
                       receiver=receiver, shared=shared,
                       bandwidth=bandwidth_limiter(settings, metrics),
                       breakers=circuit_breakers(metrics, breaker_config(settings)))


def bandwidth_limiter(settings: Settings, metrics: Metrics) -> BandwidthLimiter:
    """The node's one limiter, counting into its metrics."""
    return BandwidthLimiter(
        settings.bandwidth_limits,
        on_sent=lambda peer, priority, n: metrics.bandwidth_bytes.labels(
            peer=peer, priority=priority.label).inc(n),
        on_wait=lambda priority, reason, seconds: metrics.bandwidth_wait.labels(
            priority=priority.label, reason=reason).inc(seconds))


def breaker_config(s: Settings) -> BreakerConfig:
    return BreakerConfig(failure_threshold=s.circuit_failure_threshold,
                         recovery_s=s.circuit_recovery, recovery_max_s=s.circuit_recovery_max)


def circuit_breakers(metrics: Metrics, config: BreakerConfig | None = None, *,
                     clock: Clock = time.monotonic) -> Breakers:
    """The node's one set of breakers, per (peer, transport): each state change is logged
    once, with the wall-clock time it happened, and exported as ringsync_circuit_state."""
    def changed(change: BreakerChange) -> None:
        metrics.circuit_state.labels(peer=change.peer, transport=change.transport).set(
            change.new.gauge)
        if change.old is not None:
            level = logging.WARNING if change.new is BreakerState.OPEN else logging.INFO
            log.log(level, "%s; %s since %s", change.describe(), change.new.value,
                    wall_time(time.time()))
    return Breakers(config, clock=clock, on_change=changed)


def wall_time(t: float) -> str:
    """How logs and status say when something began: UTC, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def circuit_since(breakers: Breakers, breaker: CircuitBreaker) -> str:
    """What an operator reads of a breaker: peer, transport, state and since when."""
    age = breakers.age(breaker)
    return (f"{breaker.peer}: circuit {breaker.state.value} over {breaker.transport} since "
            f"{wall_time(time.time() - age)} ({age:.0f}s)")


def circuits_status(breakers: Breakers) -> list[dict[str, object]]:
    """For /v1/status: every breaker that is not closed (games' and files' alike)."""
    now = time.time()
    return [{"peer": b.peer, "transport": b.transport, "state": b.state.value,
             "since": wall_time(now - breakers.age(b)), "seconds": round(breakers.age(b))}
            for b in breakers if b.state is not BreakerState.CLOSED]
