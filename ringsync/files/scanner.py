"""FileScanner: finds complete model and training files, hashes each version once, records it."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ringsync.errors import UnsafePathError
from ringsync.files.hashing import hash_file
from ringsync.files.kinds import FileKind, is_shippable_name
from ringsync.files.manifest import FileManifest, FileRecord, StatKey
from ringsync.files.paths import MAX_DEPTH, link_target_relpath, safe_link_target, safe_relpath

log = logging.getLogger(__name__)

Ident = tuple[FileKind, str]
MAX_RENAMED = 10_000


@dataclass
class ScanResult:
    picked_up: list[FileRecord] = field(default_factory=list)  # new files and new versions
    forgotten: list[Ident] = field(default_factory=list)
    waiting: int = 0  # files seen that have not settled yet


def stat_key(st: os.stat_result) -> StatKey:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


class FileScanner:
    """Scans each kind's directory; blocking, so the daemon runs it in a worker thread.

    A file is complete once it appeared by rename and is unchanged since (note_renamed,
    from inotify), or nothing wrote it for ``settle`` seconds: its mtime is that old
    already (found at start-up, say), or its size, mtime and inode stayed the same
    across a whole settle window. A file
    changed in place (RingRift's auto_promote copies onto the canonical file) gets a
    new stat and is hashed again once it settles: a new version. Only names that pass
    is_shippable_name are considered; a symlink is recorded as a symlink, unless its
    target leaves the directory (warned once, not shipped).
    """

    def __init__(self, dirs: Mapping[FileKind, Path], manifest: FileManifest, settle: float, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self._dirs = dict(dirs)
        self._manifest = manifest
        self._settle = settle
        self._clock = clock
        self._wall = wall
        self._pending: dict[Ident, tuple[StatKey, float]] = {}
        self._warned: set[Ident] = set()
        self._unsettled: frozenset[Ident] = frozenset()  # read from the event loop's thread
        self._renamed: dict[Ident, StatKey] = {}  # written from the event loop's thread

    def note_renamed(self, kind: FileKind, relpath: str) -> None:
        """``relpath`` was just renamed into place (inotify): complete if unchanged when the
        scan looks at it. Called from the event loop's thread; read by the scan's."""
        if len(self._renamed) > MAX_RENAMED:  # names renamed in and deleted before a scan
            self._renamed.clear()
        # Kept until a scan looks at the name: that scan may have listed the directory
        # before the rename.
        with contextlib.suppress(OSError):
            self._renamed[(kind, relpath)] = stat_key(os.lstat(self._dirs[kind] / relpath))

    def unsettled(self) -> set[Ident]:
        """Names on disk here that are not recorded as they are now (being written, or
        changed in place): a download must never overwrite them."""
        return set(self._unsettled)

    def scan(self) -> ScanResult:
        known = {(r.kind, r.relpath): r for r in self._manifest.records()}
        result = ScanResult()
        seen: set[Ident] = set()
        found = [((kind, rel), path, st) for kind, root in self._dirs.items()
                 for rel, path, st in _walk(root, kind)]
        # Regular files first: a symlink waits while its target is still settling.
        found.sort(key=lambda item: stat.S_ISLNK(item[2].st_mode))
        for ident, path, st in found:
            seen.add(ident)
            rec = known.get(ident)
            if rec is not None and rec.stat_key == stat_key(st):
                continue
            self._consider(ident, path, st, rec, result)
        for ident in known.keys() - seen:
            self._manifest.forget(*ident)
            result.forgotten.append(ident)
        self._pending = {i: p for i, p in self._pending.items() if i in seen}
        self._warned &= seen
        self._unsettled = frozenset(self._pending)
        return result

    def _consider(self, ident: Ident, path: Path, st: os.stat_result, rec: FileRecord | None,
                  result: ScanResult) -> None:
        if stat.S_ISLNK(st.st_mode):
            new = self._symlink(ident, path, st)
            if new is not None and _target_ident(new) in self._pending:
                self._pending[ident] = (stat_key(st), self._clock())  # offered with its target
                result.waiting += 1
                return
        elif self._settled(ident, st):
            new = self._hashed(ident, path, st)
        else:
            result.waiting += 1
            return
        if new is None:
            if rec is not None:  # it became something we do not ship
                self._manifest.forget(*ident)
                result.forgotten.append(ident)
            return
        self._manifest.record(new)
        self._pending.pop(ident, None)
        result.picked_up.append(new)

    def _settled(self, ident: Ident, st: os.stat_result) -> bool:
        key, now = stat_key(st), self._clock()
        if self._renamed.pop(ident, None) == key:
            return True  # appeared by rename and unchanged since
        seen = self._pending.get(ident)
        if seen is None or seen[0] != key:
            self._pending[ident] = (key, now)
            return self._wall() - st.st_mtime_ns / 1e9 >= self._settle
        return now - seen[1] >= self._settle

    def _hashed(self, ident: Ident, path: Path, st: os.stat_result) -> FileRecord | None:
        try:
            digest = hash_file(path)
            after = os.lstat(path)
        except FileNotFoundError:
            return None
        if stat_key(after) != stat_key(st):  # written while we read it: not settled after all
            self._pending[ident] = (stat_key(after), self._clock())
            return None
        kind, relpath = ident
        return FileRecord(kind, relpath, st.st_size, st.st_mtime_ns, st.st_ino, digest)

    def _symlink(self, ident: Ident, path: Path, st: os.stat_result) -> FileRecord | None:
        kind, relpath = ident
        try:
            target = safe_link_target(relpath, os.readlink(path))
        except FileNotFoundError:
            return None
        except UnsafePathError as exc:
            if ident not in self._warned:
                self._warned.add(ident)
                log.warning("not shipping %s symlink: %s", kind.value, exc)
            return None
        return FileRecord(kind, relpath, st.st_size, st.st_mtime_ns, st.st_ino, "", target)


def _walk(root: Path, kind: FileKind) -> Iterator[tuple[str, Path, os.stat_result]]:
    """(relpath, path, lstat) of every shippable name under ``root``; symlinked directories
    and dot-directories are not entered."""
    stack: list[tuple[Path, str, int]] = [(root, "", 0)]
    while stack:
        directory, prefix, depth = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            try:
                if entry.is_dir(follow_symlinks=False):
                    if not entry.name.startswith(".") and depth + 1 < MAX_DEPTH:
                        stack.append((Path(entry.path), f"{rel}/", depth + 1))
                    continue
                if not is_shippable_name(kind, entry.name) or not _is_safe(rel):
                    continue
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                yield rel, Path(entry.path), st


def _is_safe(relpath: str) -> bool:
    """A name peers would refuse (not UTF-8, control characters) is not offered to them."""
    try:
        safe_relpath(relpath)
    except UnsafePathError:
        return False
    return True


def _target_ident(rec: FileRecord) -> Ident:
    """The name a symlink record points at, in its own kind's directory."""
    return (rec.kind, link_target_relpath(rec.relpath, rec.link_target or ""))
