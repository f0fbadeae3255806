"""ringsync: keeps the data of a self-play AI training cluster in sync."""

from ringsync.daemons.auto_sync import AutoSyncDaemon
from ringsync.daemons.base import Daemon, DaemonType, Health, HealthState
from ringsync.daemons.manager import DaemonManager
from ringsync.errors import (
    AuthError,
    BadInputError,
    ConfigError,
    CorruptDataError,
    PeerRejectedError,
    RestartBudgetExhausted,
    RingsyncError,
    StorageFullError,
    TransportError,
    UnsafePathError,
)
from ringsync.policy.router import SyncRouter
from ringsync.settings import Settings, load_settings
from ringsync.store.manifest import DataManifest

__all__ = [
    "AuthError",
    "AutoSyncDaemon",
    "BadInputError",
    "ConfigError",
    "CorruptDataError",
    "Daemon",
    "DaemonManager",
    "DaemonType",
    "DataManifest",
    "Health",
    "HealthState",
    "PeerRejectedError",
    "RestartBudgetExhausted",
    "RingsyncError",
    "Settings",
    "StorageFullError",
    "SyncRouter",
    "TransportError",
    "UnsafePathError",
    "load_settings",
]
