"""FileJanitor: nothing an abandoned download left stays on a receiver's disk.

At start-up it removes what no journal entry resumes (part files, aria2 control files,
rsync staging of peers no longer reached over SSH); while running it drops the downloads
AbandonPolicy gives up. It only ever looks under the models and training dirs, never
follows a symlink, and removes regular files only (plus rsync's own staging trees).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Set
from pathlib import Path

from ringsync.errors import UnsafePathError
from ringsync.files.abandon import Abandoned, AbandonPolicy
from ringsync.files.kinds import PART_SUFFIX, FileKind, part_name
from ringsync.files.manifest import FileManifest
from ringsync.files.paths import resolve_inside
from ringsync.files.plan import FetchJob, Ident, IndexEntry
from ringsync.ops.metrics import Metrics
from ringsync.transport.aria2 import CONTROL_SUFFIX
from ringsync.transport.rsync import STAGING_DIR

log = logging.getLogger(__name__)

_LEFTOVER_SUFFIXES = (PART_SUFFIX, PART_SUFFIX + CONTROL_SUFFIX)


class FileJanitor:
    def __init__(self, dirs: Mapping[FileKind, Path], metrics: Metrics, grace: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._dirs = dict(dirs)
        self._metrics = metrics
        self.policy = AbandonPolicy(grace, clock)

    # -- at start-up, before any download runs ------------------------------------------------

    def at_start(self, manifest: FileManifest, rsync_in_use: Callable[[str], bool]) -> None:
        """Remove part and aria2 control files no journal entry resumes, and the rsync staging
        of peers ``rsync_in_use`` no longer names (a peer in use resumes from its own)."""
        live = {(t.kind, t.relpath) for t in manifest.transfers()}
        for kind, root in self._dirs.items():
            for path, relpath in _download_files(root):
                if (kind, relpath) not in live:
                    self._remove_leftover(
                        kind, path, f"the leftover download of {kind.value}/{relpath} ({path.name})",
                        "no transfer journal entry resumes it")
            for staging in _subdirs(root / STAGING_DIR):
                if not rsync_in_use(staging.name):
                    self._remove_leftover(
                        kind, staging, f"the rsync staging of {staging.name} under {kind.value}",
                        f"{staging.name} is no longer an SSH peer of this node", tree=True)

    def _remove_leftover(self, kind: FileKind, path: Path, what: str, why: str, *,
                         tree: bool = False) -> None:
        nbytes = _remove(path, tree=tree)
        if nbytes is None:
            return
        self._count(kind, "leftover", nbytes)
        log.info("removed %s (%d bytes): %s", what, nbytes, why)

    # -- while running --------------------------------------------------------------------------

    def sweep(self, manifest: FileManifest, polled: Iterable[str],
              indexes: Mapping[str, Iterable[IndexEntry]], jobs: Iterable[FetchJob],
              busy: Set[Ident]) -> None:
        """One poll round: what peers offer now, this round's plan, and the paths being
        fetched (never touched); drops what AbandonPolicy gives up."""
        planned = {j.entry.ident: j.entry.hash for j in jobs if j.entry.link_target is None}
        for gone in self.policy.decide(polled, indexes, manifest.transfers(), planned, busy):
            self.drop(manifest, gone)

    def drop(self, manifest: FileManifest, gone: Abandoned) -> None:
        """Journal row first, then the part, then aria2's control file. Killed between two
        steps, what is left has no row, and the next start-up removes it; no part is
        removed while a row still resumes it."""
        t = gone.transfer
        if not manifest.drop_transfer(t):
            return  # a download of a new version took the entry over
        try:
            final = resolve_inside(self._dirs[t.kind], t.relpath)
        except UnsafePathError as exc:  # its directory became a symlink out: not ours to touch
            log.warning("dropped the transfer of %s/%s but left its files: %s", t.kind.value,
                        t.relpath, exc)
            return
        part = final.with_name(part_name(final.name))
        nbytes = sum(_remove(p) or 0 for p in (part, part.with_name(part.name + CONTROL_SUFFIX)))
        self._count(t.kind, gone.reason, nbytes)
        log.info("abandoned the download of %s/%s: %d of %d bytes discarded; %s", t.kind.value,
                 t.relpath, nbytes, t.size, gone.why)

    def _count(self, kind: FileKind, reason: str, nbytes: int) -> None:
        self._metrics.file_transfers_abandoned.labels(kind=kind.value, reason=reason).inc()
        self._metrics.file_abandoned_bytes.labels(kind=kind.value).inc(nbytes)


def _download_files(root: Path) -> Iterator[tuple[Path, str]]:
    """Part and aria2 control files under ``root`` (rsync's staging aside), each with the
    relpath of the file it was to become; symlinked directories are not followed."""
    for current, dirnames, filenames in os.walk(root):
        if current == str(root):
            dirnames[:] = [d for d in dirnames if d != STAGING_DIR]
        for name in filenames:
            suffix = next((s for s in _LEFTOVER_SUFFIXES if name.endswith(s)), None)
            if suffix is None or not name.startswith("."):
                continue
            target = Path(current, name[1:-len(suffix)])
            yield Path(current, name), target.relative_to(root).as_posix()


def _subdirs(path: Path) -> list[Path]:
    """Real directories in ``path``, itself a real directory (a symlink is not followed)."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return []
        with os.scandir(path) as entries:
            return [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _remove(path: Path, *, tree: bool = False) -> int | None:
    """Remove a regular file, or (``tree``: rsync's staging) a real directory tree; the bytes
    it held. None: it is something else (a symlink: never followed nor removed; a directory
    where a part file was expected) or already gone."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISREG(st.st_mode):
        try:
            path.unlink()
        except FileNotFoundError:
            return None
        except OSError as exc:  # e.g. a read-only mount: the next start tries again
            log.warning("cannot remove %s: %s", path, exc)
            return None
        return st.st_size
    if not (tree and stat.S_ISDIR(st.st_mode)):
        return None
    nbytes = sum(_tree_bytes(path))
    shutil.rmtree(path, ignore_errors=True)  # removes symlinks inside, never what they point to
    return nbytes


def _tree_bytes(path: Path) -> Iterator[int]:
    for current, _, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(current, name))
                if stat.S_ISREG(st.st_mode):
                    yield st.st_size
