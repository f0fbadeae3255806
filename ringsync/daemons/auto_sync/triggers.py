"""Why an auto-sync cycle ran: the ``trigger`` label of ringsync_sync_cycles_total."""

from __future__ import annotations

import enum

__all__ = ["Trigger"]


class Trigger(enum.StrEnum):
    STARTUP = "startup"  # the first cycle after start
    EVENT = "event"  # a generator committed: seen by inotify or told by /v1/notify
    INTERVAL = "interval"  # RINGRIFT_SYNC_INTERVAL passed without an event
    BACKLOG = "backlog"  # a large first scan has more to read, and a delivery pass ended
    MANUAL = "manual"  # sync_once() called directly (tools, tests)
    EXCLUDED_SKIP = "excluded_skip"  # this node pushes nothing; the cycle is counted, not run

    @property
    def rescans(self) -> bool:
        """Whether the cycle looks for new source files and scans every source; an event
        scans only the sources that changed."""
        return self is not Trigger.EVENT
