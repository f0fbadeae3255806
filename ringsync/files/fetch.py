"""FileFetcher: one file from whichever peers hold it, resumable, verified, published atomically."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from blake3 import blake3

from ringsync.errors import CorruptDataError, TransportError
from ringsync.files.client import Body, PeerFiles
from ringsync.files.hashing import feed_file, new_hasher
from ringsync.files.kinds import FileKind, is_written_in_place, part_name
from ringsync.files.manifest import FileManifest, Transfer
from ringsync.files.plan import FetchJob, IndexEntry, Source
from ringsync.files.publish import (
    ContentDeduplicator,
    FileChangedError,
    destination,
    publish_file,
    publish_files,
    publish_symlink,
    record_for,
    start_writeback,
)
from ringsync.files.relay import MULTI_SOURCE, streaming_into
from ringsync.inventory import Host
from ringsync.ops.metrics import Metrics

log = logging.getLogger(__name__)

WRITE_BYTES = 1024 * 1024  # bytes gathered before one write (in a worker thread)
MAX_PENDING = 8 * 1024 * 1024  # gathered while a write runs; beyond it, reading waits
# fsync + journal (what a restart resumes from) this often, whichever comes first
CHECKPOINT_BYTES = 64 * 1024 * 1024
CHECKPOINT_SECONDS = 1.0


@dataclass
class Exclusions:
    """Peers that served wrong bytes for some content; never asked for it again by this run."""

    by_hash: dict[str, set[str]] = field(default_factory=dict)

    def add(self, digest: str, peers: set[str]) -> None:
        self.by_hash.setdefault(digest, set()).update(peers)


@dataclass
class _Part:
    """The download's temp file: its fd, bytes written, and the hash of those bytes.

    Its I/O runs in worker threads, one job at a time, in order: ``start`` one, ``wait``
    for it before the next."""

    path: Path
    fd: int
    written: int
    hasher: blake3
    sources: set[str] = field(default_factory=set)  # peers whose bytes are in it
    _last_io: asyncio.Future[None] | None = None

    @property
    def busy(self) -> bool:
        return self._last_io is not None and not self._last_io.done()

    def start(self, fn: Callable[..., None], *args: object) -> asyncio.Future[None]:
        """Run ``fn`` (which uses the fd) in a worker thread, without waiting for it."""
        assert not self.busy, "one I/O job at a time on a part"
        self._last_io = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        return self._last_io

    async def wait(self) -> None:
        """Wait for the job in flight; its error is raised here, once. Shielded: a cancelled
        download does not close the fd under a write still running in its thread."""
        job = self._last_io
        if job is None:
            return
        try:
            await asyncio.shield(job)
        finally:
            if job.done():
                self._last_io = None

    async def io(self, fn: Callable[..., None], *args: object) -> None:
        await self.wait()
        self.start(fn, *args)
        await self.wait()

    def close(self) -> None:
        """Close the fd now, or once the thread still using it is done."""
        pending = self._last_io
        if pending is not None and not pending.done():
            pending.add_done_callback(lambda _: os.close(self.fd))
        else:
            os.close(self.fd)


@dataclass
class _Checkpoints:
    """When the next checkpoint is due: CHECKPOINT_SECONDS or CHECKPOINT_BYTES after the last."""

    since: int = 0
    last: float = field(default_factory=time.monotonic)

    def due(self, nbytes: int) -> bool:
        self.since += nbytes
        now = time.monotonic()
        if self.since < CHECKPOINT_BYTES and now - self.last < CHECKPOINT_SECONDS:
            return False
        self.since, self.last = 0, now
        return True


class MultiSource(Protocol):
    """A fetch from several sources at once (the Aria2Transport), for large files."""

    def wants(self, e: IndexEntry, sources: Sequence[Source]) -> bool: ...

    async def fetch_into(self, e: IndexEntry, sources: Sequence[Source], part: Path) -> bool | None:
        """True: ``part`` holds the verified content; False: not now (resumable); None: use
        the single-source path (``part`` removed)."""
        ...


class FileFetcher:
    def __init__(self, dirs: Mapping[FileKind, Path], manifest: FileManifest, client: PeerFiles,
                 metrics: Metrics, hosts: Callable[[str], Host | None],
                 exclusions: Exclusions, multi: MultiSource | None = None) -> None:
        self._multi = multi
        self._dirs = dict(dirs)
        self._manifest = manifest
        self._client = client
        self._metrics = metrics
        self._hosts = hosts
        self._exclusions = exclusions
        self._dedup = ContentDeduplicator(manifest, dirs)
        # The hash state of parts whose download stopped: (content hash, bytes, hasher).
        self._prefixes: dict[tuple[FileKind, str], tuple[str, int, blake3]] = {}

    async def fetch(self, job: FetchJob, *, multi: bool = True, single: bool = True) -> bool:
        """Make the job's version present here; False when no source could provide it now.

        ``multi``: from every holder at once (the MultiSource, aria2) when it wants the file;
        ``single``: from one source at a time. The daemon's transport chain picks them.
        """
        e = job.entry
        final = await asyncio.to_thread(destination, self._dirs[e.kind], e.relpath)
        if await asyncio.to_thread(self._would_clobber, e, final):
            log.warning("not replacing %s/%s: the file here is not the one last recorded (being "
                        "written?); it is hashed once it settles", e.kind.value, e.relpath)
            return False
        if e.link_target is not None:
            await asyncio.to_thread(self._link, e, final)
            return True
        if await asyncio.to_thread(self._deduplicated, e, final):
            return True
        if multi and self._multi is not None and self._multi.wants(e, job.sources):
            many = await self._fetch_multi(self._multi, job, final)
            if many is not None:
                return many
        if not single:
            return False
        part = await asyncio.to_thread(self._open_part, e, final)
        try:
            done = await self._download(job, part, final)
        finally:
            part.close()
        if not done:  # next round resumes without reading the part again to hash it
            self._prefixes[e.ident] = (e.hash, part.written, part.hasher.copy())
        return done

    # -- local shortcuts ---------------------------------------------------------------------------

    def _link(self, e: IndexEntry, final: Path) -> None:
        assert e.link_target is not None
        target = e.link_target
        publish_symlink(final, target, e.mtime_ns, lambda st: self._manifest.record(
            record_for(e.kind, e.relpath, st, "", target)))
        self._metrics.files_published.labels(kind=e.kind.value, how="symlink").inc()
        log.info("published %s/%s -> %s", e.kind.value, e.relpath, e.link_target)

    def _deduplicated(self, e: IndexEntry, final: Path) -> bool:
        rec = self._dedup.holder(e.hash)
        if rec is None:
            return False
        holder, part = self._dedup.path_of(rec), final.with_name(part_name(final.name))
        may_link = not (is_written_in_place(rec.relpath) or is_written_in_place(e.relpath))
        try:
            linked = self._dedup.materialize(holder, part, e.hash, may_link=may_link)
        except (OSError, FileChangedError) as exc:
            log.warning("cannot reuse %s for %s/%s (%s); fetching it", holder, e.kind.value,
                        e.relpath, exc)
            return False
        # A hard link shares its twin's mtime: setting ours would change the twin's too.
        self._publish(e, part, final, None if linked else e.mtime_ns, "linked" if linked else "copied")
        return True

    def _would_clobber(self, e: IndexEntry, final: Path) -> bool:
        """True when ``final`` exists but is not what the manifest recorded there: a local
        file that is new or being rewritten, which a download must never replace."""
        try:
            st = os.lstat(final)
        except FileNotFoundError:
            return False
        rec = self._manifest.get(e.kind, e.relpath)
        return rec is None or rec.stat_key != (st.st_size, st.st_mtime_ns, st.st_ino)

    def _publish(self, e: IndexEntry, part: Path, final: Path, mtime_ns: int | None, how: str) -> None:
        if self._would_clobber(e, final):
            raise FileExistsError(f"{final} changed here during the download; not replaced")
        st_part = os.lstat(part)
        # Recorded before the rename (the inode, size and mtime survive it), so the scanner
        # never mistakes our own file for a new local one and hashes it again.
        times = st_part.st_mtime_ns if mtime_ns is None else mtime_ns
        rec = dataclasses.replace(record_for(e.kind, e.relpath, st_part, e.hash), mtime_ns=times)
        self._manifest.publish(rec)
        publish_file(part, final, mtime_ns)
        self._metrics.files_published.labels(kind=e.kind.value, how=how.split()[0]).inc()
        log.info("published %s/%s (%d bytes, %s)", e.kind.value, e.relpath, e.size, how)

    async def _fetch_multi(self, multi: MultiSource, job: FetchJob, final: Path) -> bool | None:
        e = job.entry
        part = final.with_name(part_name(final.name))
        # Journalled at 0 bytes: the part is the multi-source fetcher's (it resumes from its
        # own control file); the single-source path never trusts its bytes.
        await asyncio.to_thread(self._manifest.save_transfer, Transfer(
            e.kind, e.relpath, e.hash, e.size, e.mtime_ns, 0, MULTI_SOURCE))
        done = await multi.fetch_into(e, job.sources, part)
        if done:
            await asyncio.to_thread(self._publish, e, part, final, e.mtime_ns,
                                    f"fetched from {len(job.sources)} sources at once")
        return done
    def publish_staged(self, staged: Sequence[tuple[IndexEntry, Path]], how: str) -> list[IndexEntry]:
        """Complete files whose hashes the caller checked (an rsync batch), published together
        (publish_files); a name where a local file must not be replaced is left out."""
        moves, entries = [], []
        for e, part in staged:
            final = destination(self._dirs[e.kind], e.relpath)
            if self._would_clobber(e, final):
                log.warning("not publishing %s/%s: a file there is not the one last recorded",
                            e.kind.value, e.relpath)
                continue
            moves.append((part, final, e.mtime_ns))
            entries.append(e)

        def record(stats: list[os.stat_result]) -> None:
            self._manifest.publish_many([record_for(e.kind, e.relpath, st, e.hash)
                                         for e, st in zip(entries, stats, strict=True)])

        publish_files(moves, record)
        for e in entries:
            self._metrics.files_published.labels(kind=e.kind.value, how=how.split()[0]).inc()
        log.info("published %d files (%s)", len(entries), how)
        return entries

    def reject_copy(self, e: IndexEntry, peer: str, why: str) -> None:
        """``peer`` served wrong bytes for ``e`` (already discarded): never asked for it again."""
        self._metrics.file_hash_mismatches.labels(kind=e.kind.value).inc()
        log.warning("discarding %s/%s from %s: %s; not asking it for this content again",
                    e.kind.value, e.relpath, peer, why)
        self._exclusions.add(e.hash, {peer})

    # -- the download ----------------------------------------------------------------------------

    def _open_part(self, e: IndexEntry, final: Path) -> _Part:
        """The temp file, resumed where the journal says its bytes are safely on disk."""
        path = final.with_name(part_name(final.name))
        journal = self._manifest.transfer(e.kind, e.relpath)
        keep = 0
        if journal is not None and journal.hash == e.hash and journal.size == e.size:
            keep = journal.done
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        keep = min(keep, os.fstat(fd).st_size)
        os.ftruncate(fd, keep)
        cached = self._prefixes.pop(e.ident, None)
        if cached is not None and cached[:2] == (e.hash, keep):
            hasher = cached[2]
        else:
            hasher = new_hasher()
            feed_file(hasher, fd, keep)
        if keep:
            log.info("resuming %s/%s at %d of %d bytes", e.kind.value, e.relpath, keep, e.size)
        source = journal.source if journal is not None and keep else ""
        self._manifest.save_transfer(Transfer(e.kind, e.relpath, e.hash, e.size, e.mtime_ns, keep, source))
        return _Part(path, fd, keep, hasher, {source} if source else set())

    async def _download(self, job: FetchJob, part: _Part, final: Path) -> bool:
        e = job.entry
        sources, relays = list(job.sources), list(job.relays)
        random.shuffle(sources)  # spread the load over every holder
        random.shuffle(relays)
        for source in sources + relays:  # relays when the holders are busy
            if source.peer in self._exclusions.by_hash.get(e.hash, set()):
                continue
            host = self._hosts(source.peer)
            if host is None:
                continue
            started = part.written
            try:
                await self._from(host, source, e, part)
            except TransportError as exc:
                log.warning("fetching %s/%s from %s stopped at %d of %d bytes: %s", e.kind.value,
                            e.relpath, source.peer, part.written, e.size, exc)
                await part.io(self._checkpoint, e, part, source.peer)
                continue
            except CorruptDataError as exc:
                await part.io(self._reject, e, part, exc)
                continue
            finally:
                self._metrics.file_source_bytes.labels(peer=source.peer, transport="http").inc(
                    max(0, part.written - started))
            if part.written == e.size:
                if part.hasher.hexdigest() == e.hash:
                    await asyncio.to_thread(self._publish, e, part.path, final, e.mtime_ns,
                                            f"fetched from {', '.join(sorted(part.sources))}")
                    return True
                await part.io(self._reject, e, part, CorruptDataError(
                    f"content hash {part.hasher.hexdigest()[:16]}… is not the expected {e.hash[:16]}…"))
        return False

    async def _from(self, host: Host, source: Source, e: IndexEntry, part: _Part) -> None:
        async with self._client.open(host, source, part.written) as body:
            if body.hash != e.hash:
                raise TransportError(source.peer, "it now holds another version of this content")
            if body.start != part.written:
                if body.start != 0:
                    raise TransportError(source.peer, f"answered bytes from {body.start}, not the "
                                                      f"{part.written} asked for")
                await part.io(self._restart, part)  # it ignored our Range (a 200): start over
            part.sources.add(source.peer)
            # Relayed to peers only now that a source answers: two nodes turned away by the
            # holders never relay to each other with nothing behind them.
            with streaming_into(part.path, lambda: part.written) as grew:
                await self._stream_body(e, part, body, source.peer, grew)

    async def _stream_body(self, e: IndexEntry, part: _Part, body: Body, peer: str,
                           grew: Callable[[], None]) -> None:
        """Read the body while the previous bytes are written and hashed in a worker thread.

        The socket is never left unread while the disk works: what arrives meanwhile is
        gathered, up to MAX_PENDING; then reading waits for the write. A download holds at
        most about twice MAX_PENDING plus the client's read buffer. Writeback of each write is
        started at once (``start_writeback``), so a checkpoint's fsync and the final one
        find little left to flush."""
        pending = bytearray()
        received = part.written
        checkpoints = _Checkpoints()
        try:
            async for chunk in body.chunks():
                received += len(chunk)
                if received > e.size:
                    raise CorruptDataError(f"{peer} sent more than the {e.size} bytes expected")
                pending += chunk
                if len(pending) < WRITE_BYTES:
                    continue
                if part.busy and len(pending) < MAX_PENDING:
                    continue  # keep reading while the last write runs
                await part.wait()
                pending = self._write(e, part, pending, checkpoints.due(len(pending)), peer, grew)
        except CorruptDataError:
            raise
        except Exception:
            # The stream broke: what arrived before is kept (the next source resumes after it).
            await self._flush(e, part, pending, peer, grew)
            raise
        await self._flush(e, part, pending, peer, grew)
        if part.written != e.size:
            raise TransportError(peer, f"answer ended at {part.written} of {e.size} bytes")

    async def _flush(self, e: IndexEntry, part: _Part, pending: bytearray, peer: str,
                     grew: Callable[[], None]) -> None:
        await part.wait()
        self._write(e, part, pending, False, peer, grew)
        await part.wait()

    def _write(self, e: IndexEntry, part: _Part, data: bytearray, checkpoint: bool, peer: str,
               grew: Callable[[], None]) -> bytearray:
        """Start writing ``data`` (and then checkpointing, when due) in the worker thread;
        returns a fresh buffer for what arrives meanwhile."""
        if data:
            self._metrics.file_bytes_fetched.labels(kind=e.kind.value).inc(len(data))
            then = (lambda: self._checkpoint(e, part, peer)) if checkpoint else None
            part.start(_append, part, data, then).add_done_callback(lambda _: grew())
        return bytearray()

    def _checkpoint(self, e: IndexEntry, part: _Part, peer: str) -> None:
        """fsync the part, then record its length: a restart resumes from here."""
        os.fdatasync(part.fd)
        self._manifest.save_transfer(Transfer(e.kind, e.relpath, e.hash, e.size, e.mtime_ns,
                                              part.written, peer))

    def _restart(self, part: _Part) -> None:
        os.ftruncate(part.fd, 0)
        part.written = 0
        part.hasher = new_hasher()
        part.sources.clear()

    def _reject(self, e: IndexEntry, part: _Part, exc: Exception) -> None:
        """Wrong bytes: the part is discarded. A single source is not asked for this content
        again; when several contributed (a resumed download), none is blamed, and the next
        attempt, from one source and from byte 0, tells which."""
        self._metrics.file_hash_mismatches.labels(kind=e.kind.value).inc()
        blamed = part.sources if len(part.sources) == 1 else set()
        log.warning("discarding the download of %s/%s from %s: %s%s", e.kind.value, e.relpath,
                    ", ".join(sorted(part.sources)) or "unknown", exc,
                    "; not asking it for this content again" if blamed else "")
        self._exclusions.add(e.hash, set(blamed))
        for peer in blamed:
            self._metrics.file_source_exclusions.labels(peer=peer).inc()
        self._restart(part)
        self._manifest.save_transfer(Transfer(e.kind, e.relpath, e.hash, e.size, e.mtime_ns, 0, ""))


def _append(part: _Part, data: bytearray, then: Callable[[], None] | None) -> None:
    """Write, hash and start writeback a MiB at a time, however much was gathered: whole
    8 MiB writes with their writeback ran at a quarter of the speed here (1 GiB with its
    fsync: 0.53 s in 1 MiB steps, 1.1-2.5 s in 8 MiB ones), and a slower writer gathers
    bigger writes."""
    view = memoryview(data)
    for start in range(0, len(view), WRITE_BYTES):
        piece, offset = view[start:start + WRITE_BYTES], part.written
        while piece:
            n = os.pwrite(part.fd, piece, part.written)
            part.hasher.update(piece[:n])
            part.written += n
            piece = piece[n:]
        start_writeback(part.fd, offset, part.written - offset)
    if then is not None:
        then()
