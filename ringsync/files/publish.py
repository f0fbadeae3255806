"""Atomic publication under models/ and training/, and ContentDeduplicator."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ringsync.files.hashing import CHUNK, new_hasher
from ringsync.files.kinds import FileKind, part_name
from ringsync.files.manifest import FileManifest, FileRecord
from ringsync.files.paths import resolve_inside

log = logging.getLogger(__name__)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def destination(root: Path, relpath: str) -> Path:
    """Where ``relpath`` lands under ``root``, its parent directories made (never through a
    symlink out of ``root``)."""
    root.mkdir(parents=True, exist_ok=True)
    (Path(os.path.realpath(root)) / relpath).parent.mkdir(parents=True, exist_ok=True)
    return resolve_inside(root, relpath)


def publish_file(part: Path, final: Path, mtime_ns: int | None) -> os.stat_result:
    """Make a complete, verified ``part`` visible as ``final`` in one step.

    fsync the data, set the source's mtime (so every holder offers the same version),
    rename, fsync the directory: a crash leaves either the old file or the new one,
    never a partial one under a shipped name.
    """
    fd = os.open(part, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if mtime_ns is not None:
        os.utime(part, ns=(mtime_ns, mtime_ns))
    os.replace(part, final)
    fsync_dir(final.parent)
    return os.lstat(final)


def publish_files(moves: Sequence[tuple[Path, Path, int]],
                  before_rename: Callable[[list[os.stat_result]], None]) -> None:
    """``publish_file`` for many (part, final, mtime_ns) at once, with the same guarantee:
    the data is made durable first (one syncfs of the file system instead of an fsync per
    file), ``before_rename`` records them, then each is renamed and each directory fsynced
    once. For a batch of thousands of small files the fsyncs were most of the cost."""
    if not moves:
        return
    for part, _, mtime_ns in moves:
        os.utime(part, ns=(mtime_ns, mtime_ns))
    _sync_file_systems([part for part, _, _ in moves])
    before_rename([os.lstat(part) for part, _, _ in moves])
    for part, final, _ in moves:
        os.replace(part, final)
    for parent in sorted({final.parent for _, final, _ in moves}):
        fsync_dir(parent)


def _sync_file_systems(paths: Sequence[Path]) -> None:
    """syncfs(2) on the file system of ``paths`` (they share one: a staging dir beside the
    destination); without syncfs (not Linux), an fsync per file."""
    libc = _libc()
    if libc is not None:
        fd = os.open(paths[0], os.O_RDONLY)
        try:
            if libc.syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; don't wait for it


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing ``length`` bytes at ``offset`` to disk now, without
    waiting (sync_file_range(2), Linux). A download's fsyncs then find little left to
    flush, instead of the whole file at the end; elsewhere a no-op (the fsync does it all)."""
    sync_file_range = _sync_file_range()
    if sync_file_range is not None:
        sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # best effort: fsync follows


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    fn = getattr(_c_library(), "sync_file_range", None)
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


@functools.cache
def _c_library() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return None if name is None else ctypes.CDLL(name, use_errno=True)


def _libc() -> ctypes.CDLL | None:
    """The C library when it has syncfs (Linux)."""
    libc = _c_library()
    return libc if hasattr(libc, "syncfs") else None


def publish_symlink(final: Path, target: str, mtime_ns: int,
                    before_rename: Callable[[os.stat_result], None]) -> None:
    """Point ``final`` at ``target`` atomically (replacing what was there).

    ``before_rename`` gets the link's stat (the rename keeps it) so that it is recorded
    before a scan can see the link and take it for a new local one.
    """
    tmp = final.with_name(part_name(final.name))
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.utime(tmp, ns=(mtime_ns, mtime_ns), follow_symlinks=False)
    before_rename(os.lstat(tmp))
    os.replace(tmp, final)
    fsync_dir(final.parent)


class ContentDeduplicator:
    """File-level dedup: content this node holds under any name is linked, not fetched again.

    A hard link costs no space or bytes; where linking fails (another file system,
    a link limit) the bytes are copied locally and verified against the hash.
    """

    def __init__(self, manifest: FileManifest, dirs: Mapping[FileKind, Path]) -> None:
        self._manifest = manifest
        self._dirs = dict(dirs)

    def holder(self, digest: str) -> FileRecord | None:
        """A local file with content ``digest`` that is still as it was hashed, or None."""
        for rec in self._manifest.with_hash(digest):
            try:
                st = os.lstat(self.path_of(rec))
            except FileNotFoundError:
                continue
            if (st.st_size, st.st_mtime_ns, st.st_ino) == rec.stat_key:
                return rec
        return None

    def path_of(self, rec: FileRecord) -> Path:
        return self._dirs[rec.kind] / rec.relpath

    def materialize(self, source: Path, part: Path, digest: str, *, may_link: bool = True) -> bool:
        """Put ``source``'s content at ``part``; True when hard-linked (shares the inode).

        ``may_link`` False (either name is one RingRift rewrites in place): copied, so that
        such a rewrite never changes the other name's content.
        """
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        if may_link:
            try:
                os.link(source, part)
                return True
            except OSError as exc:
                log.info("cannot hard-link %s (%s); copying it instead", source, exc.strerror)
        if _copy_hashed(source, part) != digest:
            part.unlink()
            raise FileChangedError(f"{source} changed while it was copied")
        return False


class FileChangedError(Exception):
    """A local file changed under a copy; the copy is discarded and the file fetched instead."""


def _copy_hashed(source: Path, part: Path) -> str:
    hasher = new_hasher()
    with source.open("rb") as src, part.open("wb") as dst:
        while chunk := src.read(CHUNK):
            hasher.update(chunk)
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    return hasher.hexdigest()


def record_for(rec_kind: FileKind, relpath: str, st: os.stat_result, digest: str,
               link_target: str | None = None) -> FileRecord:
    return FileRecord(rec_kind, relpath, st.st_size, st.st_mtime_ns,
                      st.st_ino, digest, link_target)
