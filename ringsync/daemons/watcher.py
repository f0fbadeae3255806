"""Wake auto-sync within milliseconds of a generator's commit, using inotify."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from asyncinotify import Inotify, Mask

from ringsync.settings import Settings

log = logging.getLogger(__name__)

_FILE_EVENTS = Mask.MODIFY | Mask.CLOSE_WRITE | Mask.CREATE | Mask.MOVED_TO
_DIR_EVENTS = _FILE_EVENTS | Mask.ONLYDIR
_WATCHED_SUFFIXES = (".db", ".db-wal", ".sqlite", ".sqlite-wal", ".jsonl")


def database_of(path: Path) -> Path:
    """The database a changed file belongs to (its -wal/-shm/-journal map to it)."""
    for suffix in ("-wal", "-shm", "-journal"):
        if path.name.endswith(suffix):
            return path.with_name(path.name.removesuffix(suffix))
    return path


async def watch_games_dir(settings: Settings, on_change: Callable[[Path | None], None]) -> None:
    """Call ``on_change(database)`` whenever a game DB (or its WAL) under games/ changes.

    ``None`` means a new directory appeared: look for new databases.
    The node's merged output (games/synced/) is not watched: received games are never
    pushed on as if freshly generated. Without inotify the interval alone drives syncs.
    """
    try:
        inotify = Inotify()
    except OSError as exc:
        log.warning("inotify unavailable (%s): syncing every RINGRIFT_SYNC_INTERVAL only", exc)
        return
    with inotify:
        for directory in _directories(settings.games_dir, settings.synced_dir):
            _add_watch(inotify, directory)
        async for event in inotify:
            name = event.name.name if event.name is not None else ""
            if event.mask & Mask.ISDIR and event.path is not None:
                created = event.mask & (Mask.CREATE | Mask.MOVED_TO)
                if created and not _inside(event.path, settings.synced_dir):
                    _add_watch(inotify, event.path)
                    on_change(None)
                continue
            if name.endswith(_WATCHED_SUFFIXES) and event.path is not None:
                on_change(database_of(event.path))


def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _directories(root: Path, exclude: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, _ in os.walk(root):
        current = Path(dirpath)
        if _inside(current, exclude):
            dirnames.clear()
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out.append(current)
    return out


def _add_watch(inotify: Inotify, directory: Path) -> None:
    try:
        inotify.add_watch(directory, _DIR_EVENTS)
    except OSError as exc:  # e.g. fs.inotify.max_user_watches reached
        log.warning("cannot watch %s (%s); it is still scanned every interval", directory, exc)
