"""Notice a model or training file renamed into place at once (inotify), so it ships without
waiting out the settle time; the scanner's settle rule still covers everything else."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from asyncinotify import Mask

from ringsync.files.kinds import FileKind
from ringsync.ops.watchtree import TreeWatches, open_inotify

log = logging.getLogger(__name__)

_EVENTS = Mask.MOVED_TO | Mask.CREATE
MAX_WATCHES = 4096


async def watch_renames(dirs: Mapping[FileKind, Path],
                        on_rename: Callable[[FileKind, str], None]) -> None:
    """Call ``on_rename(kind, relpath)`` for each file renamed into a kind's directory tree.

    Directories are watched recursively (dot-directories not); without inotify the
    settle time alone decides, as it does for a file written in place.
    """
    inotify = open_inotify("files are picked up after the settle time only")
    if inotify is None:
        return
    with inotify:
        watches = TreeWatches(inotify, _EVENTS, limit=MAX_WATCHES,
                              unwatched="files there ship after the settle time",
                              wanted=lambda d: not d.name.startswith("."))
        roots: dict[Path, FileKind] = {}
        for kind, root in dirs.items():
            root.mkdir(parents=True, exist_ok=True)
            roots[root] = kind
            watches.add_tree(root)
        async for event in inotify:
            if event.path is None or event.name is None or str(event.name).startswith("."):
                continue
            if event.mask & Mask.ISDIR:
                watches.add_tree(event.path)
            elif event.mask & Mask.MOVED_TO:
                found = _kind_of(roots, event.path)
                if found is not None:
                    on_rename(*found)


def _kind_of(roots: Mapping[Path, FileKind], path: Path) -> tuple[FileKind, str] | None:
    for root, kind in roots.items():
        if root in path.parents:
            return kind, path.relative_to(root).as_posix()
    return None
