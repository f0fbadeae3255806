"""ringsync: keeps the data of a self-play AI training cluster in sync.

The public names below load on first use: ``import ringsync.protocol`` (or policy) runs
this file first, and must not pull in aiohttp, inotify or Prometheus with the daemons.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from ringsync.daemons.auto_sync import AutoSyncDaemon
    from ringsync.daemons.base import Daemon, DaemonType, Health, HealthState
    from ringsync.daemons.file_sync import FileSyncDaemon
    from ringsync.daemons.manager import DaemonManager
    from ringsync.files.publish import ContentDeduplicator
    from ringsync.policy.router import SyncRouter
    from ringsync.settings import Settings, load_settings
    from ringsync.store.manifest import DataManifest

try:
    __version__ = _version("ringsync")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

# Public name -> the module that defines it, imported when the name is first used.
_LAZY = {
    "AutoSyncDaemon": "ringsync.daemons.auto_sync",
    "ContentDeduplicator": "ringsync.files.publish",
    "Daemon": "ringsync.daemons.base",
    "DaemonManager": "ringsync.daemons.manager",
    "DaemonType": "ringsync.health",
    "DataManifest": "ringsync.store.manifest",
    "FileSyncDaemon": "ringsync.daemons.file_sync",
    "Health": "ringsync.health",
    "HealthState": "ringsync.health",
    "Settings": "ringsync.settings",
    "SyncRouter": "ringsync.policy.router",
    "load_settings": "ringsync.settings",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ringsync' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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
