"""ringsync: keeps the data of a self-play AI training cluster in sync."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

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
from ringsync.files.daemon import FileSyncDaemon
from ringsync.files.publish import ContentDeduplicator
from ringsync.policy.router import SyncRouter
from ringsync.settings import Settings, load_settings
from ringsync.store.manifest import DataManifest

try:
    __version__ = _version("ringsync")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AuthError",
    "AutoSyncDaemon",
    "BadInputError",
    "ConfigError",
    "ContentDeduplicator",
    "CorruptDataError",
    "Daemon",
    "DaemonManager",
    "DaemonType",
    "DataManifest",
    "FileSyncDaemon",
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
    "__version__",
    "load_settings",
]
