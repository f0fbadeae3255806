"""The contract every daemon meets: run until stopped, signal readiness, drain, report health."""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar


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


class Daemon(ABC):
    """A small long-running service supervised by the DaemonManager.

    ``run`` does the work until it is cancelled; it calls ``ready()`` exactly once
    when dependents may start. ``drain`` asks it to stop taking new work and to
    finish what is in flight; the manager bounds it with the drain timeout and
    cancels ``run`` afterwards.
    """

    daemon_type: ClassVar[DaemonType]
    depends_on: ClassVar[tuple[DaemonType, ...]] = ()

    @abstractmethod
    async def run(self, ready: Callable[[], None]) -> None: ...

    async def drain(self) -> None:  # noqa: B027 - most daemons have nothing to drain
        """Stop taking new work; return once in-flight work is done."""

    @abstractmethod
    def health(self) -> Health: ...
