"""The daemon types this build provides: one registration line each."""

from __future__ import annotations

from ringsync.daemons.auto_sync import AutoSyncDaemon
from ringsync.daemons.base import DaemonType
from ringsync.daemons.data_server import DataServerDaemon
from ringsync.daemons.file_sync import FileSyncDaemon
from ringsync.daemons.registry import DaemonRegistry
from ringsync.node import NodeContext


def default_registry() -> DaemonRegistry[NodeContext]:
    registry: DaemonRegistry[NodeContext] = DaemonRegistry()
    registry.register(DaemonType.DATA_SERVER, DataServerDaemon)
    registry.register(DaemonType.AUTO_SYNC, AutoSyncDaemon)
    registry.register(DaemonType.FILE_SYNC, FileSyncDaemon)
    return registry
