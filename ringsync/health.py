"""Daemon kinds and health states: the words the node, its HTTP status and the daemons share.

Below the daemons that report them, so that the node context and the HTTP server can
speak of health without importing the daemons.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class DaemonType(enum.Enum):
    """The kinds of daemon a node can run; values are what profiles and --daemon use."""

    DATA_SERVER = "data_server"
    AUTO_SYNC = "auto_sync"
    FILE_SYNC = "file_sync"


class HealthState(enum.Enum):
    STARTING = "starting"
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class Health:
    state: HealthState
    detail: str = ""
