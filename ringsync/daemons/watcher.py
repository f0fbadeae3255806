"""Wake auto-sync within milliseconds of a generator's commit, using inotify."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from asyncinotify import Mask

from ringsync.ops.watchtree import TreeWatches, open_inotify
from ringsync.policy.sources import SourcePatterns, kind_of
from ringsync.settings import Settings

log = logging.getLogger(__name__)

_FILE_EVENTS = Mask.MODIFY | Mask.CLOSE_WRITE | Mask.CREATE | Mask.MOVED_TO
# RingRift starts a job dir per job; a long-lived node collects thousands.
MAX_WATCHES = 8192


def database_of(path: Path) -> Path:
    """The database a changed file belongs to (its -wal/-shm/-journal map to it)."""
    for suffix in ("-wal", "-shm", "-journal"):
        if path.name.endswith(suffix):
            return path.with_name(path.name.removesuffix(suffix))
    return path


class _Wanted:
    """The directories that can hold sources: the source roots, recursively, and their parents."""

    def __init__(self, data_dir: Path, patterns: SourcePatterns, exclude: Path) -> None:
        self._data_dir = data_dir
        self._patterns = patterns
        self._roots = patterns.roots()
        self._exclude = exclude

    def __call__(self, directory: Path) -> bool:
        """Inside a source root (or on the way to one), not excluded, not received games."""
        if directory == self._exclude or self._exclude in directory.parents:
            return False
        try:
            rel = directory.relative_to(self._data_dir).as_posix()
        except ValueError:
            return False
        if rel == ".":
            return True
        if self._patterns.prunes(rel):
            return False
        return any(_within(rel, r) or _within(r, rel) for r in self._roots)


def _within(path: str, parent: str) -> bool:
    return parent == "" or path == parent or path.startswith(parent + "/")


async def watch_sources(settings: Settings, on_change: Callable[[Path | None], None], *,
                        limit: int = MAX_WATCHES) -> None:
    """Call ``on_change(path)`` whenever a game source (a DB, its WAL, a JSONL log) changes.

    ``None`` means a new directory appeared: look for new sources. The node's merged
    output (games/synced/) is not watched: received games are never pushed on as if
    freshly generated. Without inotify the interval alone drives syncs.
    """
    inotify = open_inotify("syncing every RINGRIFT_SYNC_INTERVAL only")
    if inotify is None:
        return
    with inotify:
        watches = TreeWatches(inotify, _FILE_EVENTS, limit=limit,
                              unwatched="games there are found by the RINGRIFT_SYNC_INTERVAL scan",
                              wanted=_Wanted(settings.data_dir, settings.source_patterns,
                                             settings.received_root))
        if settings.data_dir.is_dir():
            watches.add_tree(settings.data_dir)
        async for event in inotify:
            if event.path is None:
                continue
            if event.mask & Mask.ISDIR:
                if event.mask & (Mask.CREATE | Mask.MOVED_TO) and watches.wanted(event.path):
                    watches.add_tree(event.path)
                    on_change(None)
                continue
            changed = database_of(event.path)
            if kind_of(changed.name) is not None:
                on_change(changed)
