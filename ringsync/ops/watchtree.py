"""Directory trees watched with inotify, bounded, shared by the game and file watchers."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from asyncinotify import Inotify, Mask

log = logging.getLogger(__name__)


def open_inotify(without: str) -> Inotify | None:
    """An inotify instance, or None (logged with ``without``: what happens instead) where the
    kernel refuses one (no inotify, or fs.inotify.max_user_instances reached)."""
    try:
        return Inotify()
    except OSError as exc:
        log.warning("inotify unavailable (%s): %s", exc, without)
        return None


class TreeWatches:
    """Watches directories and every ``wanted`` one below them, at most ``limit`` in all.

    Past the limit (or when the kernel's fs.inotify.max_user_watches is reached) a
    directory is not watched; ``unwatched`` says what the caller does instead (a periodic
    scan), once per cause, so an operator learns why changes there are noticed late.
    """

    def __init__(self, inotify: Inotify, mask: Mask, *, limit: int, unwatched: str,
                 wanted: Callable[[Path], bool] = lambda _: True) -> None:
        self._inotify = inotify
        self._mask = mask | Mask.ONLYDIR
        self._limit = limit
        self._unwatched = unwatched
        self.wanted = wanted
        self._full_reported = False
        self._refused_reported = False

    @property
    def count(self) -> int:
        """Directories watched now (the kernel drops the watch of one that is removed)."""
        return len(self._inotify.watches)

    def add_tree(self, top: Path) -> None:
        """Watch ``top`` and every wanted directory below it (created before the watch, too)."""
        for current, dirnames, _ in os.walk(top):
            here = Path(current)
            if not self._add(here):
                return
            dirnames[:] = [d for d in dirnames if self.wanted(here / d)]

    def _add(self, directory: Path) -> bool:
        if self.count >= self._limit:
            if not self._full_reported:
                self._full_reported = True
                log.warning("watching %d directories (the limit); newer ones are not watched: %s",
                            self.count, self._unwatched)
            return False
        try:
            self._inotify.add_watch(directory, self._mask)
        except OSError as exc:  # e.g. ENOSPC: fs.inotify.max_user_watches reached
            if not self._refused_reported:
                self._refused_reported = True
                log.warning("cannot watch %s (%s; raise the sysctl fs.inotify.max_user_watches "
                            "if it is the limit): %s", directory, exc, self._unwatched)
            return True
        return True
