"""The data server's file routes: GET /v1/files/index and GET /v1/files/<kind>/<relpath>."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from ringsync.errors import UnsafePathError
from ringsync.files.hashing import CHUNK
from ringsync.files.kinds import FileKind, file_priority
from ringsync.files.layout import FILES_PREFIX, HASH_HEADER, INDEX_PATH, file_dirs, manifest_path
from ringsync.files.manifest import FileManifest
from ringsync.files.paths import resolve_inside, safe_relpath
from ringsync.files.plan import IndexEntry
from ringsync.files.relay import Ready, RelayRoutes, add_relay_routes
from ringsync.files.server_pieces import add_piece_routes
from ringsync.ops.metrics import Metrics
from ringsync.ops.peer_session import NODE_HEADER
from ringsync.policy.bandwidth import BandwidthLimiter, Priority
from ringsync.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Pace:
    """Whom a response is paced for, and at which priority."""

    peer: str
    priority: Priority


class FileRoutes:
    """Serves what the file manifest says this node holds, and only while it is unchanged
    on disk: a file rewritten in place is withheld until it is hashed again.

    Every response goes through the node's one ``BandwidthLimiter``, the one game pushes use:
    a file's bytes leave this host here, so this is where they are paced, per requesting peer
    and in total, at the file's priority (``file_priority``). A response waits for a transfer
    slot before it starts and for tokens before each chunk; it holds one read chunk at most.
    """

    def __init__(self, settings: Settings, limiter: BandwidthLimiter,
                 metrics: Metrics | None = None) -> None:
        self._settings = settings
        self._metrics = metrics
        self._dirs = file_dirs(settings)
        self._limiter = limiter
        self._manifest: FileManifest | None = None
        self._relay = RelayRoutes(self._dirs, self._held)
        self._streams: dict[str, int] = {}  # content hash -> whole-file answers streaming now

    async def _open(self, app: web.Application) -> AsyncIterator[None]:
        self._manifest = await asyncio.to_thread(FileManifest, manifest_path(self._settings))
        yield
        manifest, self._manifest = self._manifest, None
        manifest.close()

    def _held(self) -> FileManifest:
        if self._manifest is None:
            raise web.HTTPServiceUnavailable(text="file manifest not open yet")
        return self._manifest

    async def index(self, request: web.Request) -> web.Response:
        entries = await asyncio.to_thread(self._current_entries)
        body = {"node": self._settings.node_id, "files": [e.as_dict() for e in entries]}
        return web.json_response(body, dumps=json.dumps)

    def _current_entries(self) -> list[IndexEntry]:
        out = []
        for rec in self._held().records():
            try:
                st = os.lstat(self._dirs[rec.kind] / rec.relpath)
            except OSError:
                continue
            if (st.st_size, st.st_mtime_ns, st.st_ino) == rec.stat_key:
                out.append(IndexEntry.of(rec))
        return out

    async def serve(self, request: web.Request) -> web.StreamResponse:
        try:
            kind = FileKind(request.match_info["kind"])
        except ValueError:
            raise web.HTTPNotFound(text=f"unknown file kind; use one of "
                                        f"{', '.join(k.value for k in FileKind)}") from None
        try:
            relpath = safe_relpath(request.match_info["relpath"])
        except UnsafePathError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        peer, priority = self._peer_of(request), file_priority(kind, relpath)
        # The slot first: a request waiting for one holds no file descriptor and no buffer.
        async with self._limiter.transfer(peer, priority):
            ready: Ready | None = None
            try:
                fd, size, digest = await asyncio.to_thread(self._open_held, kind, relpath)
            except web.HTTPNotFound:
                partial = await asyncio.to_thread(self._relay.open_partial, kind, relpath)
                if partial is None:
                    raise
                fd, size, digest, ready = partial  # still downloading here: relay what is held
            try:
                return await self._stream(request, fd, size, digest, ready, Pace(peer, priority))
            finally:
                os.close(fd)

    def _peer_of(self, request: web.Request) -> str:
        """The bucket a request is paced in: the inventory host its X-Ringsync-Node names (so
        its bandwidth_mbps applies), else its address: a made-up name never makes a new
        bucket or metric label of its own."""
        name = request.headers.get(NODE_HEADER, "")
        return name if self._settings.inventory.get(name) is not None else str(request.remote)

    def _open_held(self, kind: FileKind, relpath: str) -> tuple[int, int, str]:
        rec = self._held().get(kind, relpath)
        if rec is None or rec.link_target is not None:
            raise web.HTTPNotFound(text=f"{kind.value}/{relpath} is not a file held here "
                                        "(symlinks are listed in the index)")
        try:
            fd = os.open(resolve_inside(self._dirs[kind], relpath), os.O_RDONLY | os.O_NOFOLLOW)
        except (OSError, UnsafePathError):
            raise web.HTTPNotFound(text=f"{kind.value}/{relpath} is gone") from None
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns, st.st_ino) != rec.stat_key:
            os.close(fd)
            raise web.HTTPConflict(text=f"{kind.value}/{relpath} changed since it was hashed; "
                                        "it is offered again once it settles")
        return fd, st.st_size, rec.hash

    async def _stream(self, request: web.Request, fd: int, size: int, digest: str,
                      ready: Ready | None, pace: Pace) -> web.StreamResponse:
        start, stop = _range(request, size)
        # Whole-file streams are limited per content: the peers turned away fetch it from
        # those still downloading it (relays). Segments (aria2, piece repairs) are not.
        whole = stop == size
        if whole and self._streams.get(digest, 0) >= self._settings.file_upload_slots:
            raise web.HTTPServiceUnavailable(
                text="streaming this content to as many peers as allowed; fetch it from a relay",
                headers={"Retry-After": "1"})
        if whole:
            self._streams[digest] = self._streams.get(digest, 0) + 1
        try:
            return await self._send(request, fd, size, digest, ready, pace, start, stop)
        finally:
            if whole:
                self._streams[digest] -= 1
                if not self._streams[digest]:
                    del self._streams[digest]

    async def _send(self, request: web.Request, fd: int, size: int, digest: str,
                    ready: Ready | None, pace: Pace, start: int, stop: int) -> web.StreamResponse:
        partial = start > 0 or stop < size
        response = web.StreamResponse(status=206 if partial else 200)
        response.headers.update({
            HASH_HEADER: digest, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
            "Content-Length": str(stop - start),
        })
        if partial:
            response.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        await response.prepare(request)
        position = start
        upto = stop if ready is None else start  # a relay sends what its download holds
        try:
            while position < stop:
                if position >= upto and ready is not None:
                    held = await ready(position)
                    if held is None:
                        break  # the download here was given up: the receiver sees a short answer
                    upto = min(stop, held)
                chunk = await asyncio.to_thread(os.pread, fd, min(CHUNK, upto - position), position)
                if not chunk:
                    break  # truncated under us: the receiver's length and hash checks catch it
                async for piece in self._limiter.paced(pace.peer, chunk, pace.priority):
                    await response.write(piece)
                position += len(chunk)
            await response.write_eof()
        except ConnectionError:
            # The peer went away (stopped, killed): it resumes from its journal later.
            log.info("%s stopped reading %s at %d of %d bytes", request.remote,
                     request.match_info["relpath"], position, size)
        finally:
            if self._metrics is not None and position > start:
                asker = request.headers.get(NODE_HEADER, "")
                if asker not in self._settings.inventory.hosts:
                    asker = "other"  # a label per unknown name would let a peer grow the metric
                self._metrics.file_bytes_served.labels(peer=asker).inc(position - start)
        return response


def _range(request: web.Request, size: int) -> tuple[int, int]:
    """The bytes [start, stop) asked for: one range 'bytes=N-' or 'bytes=N-M' (a multi-source
    downloader such as aria2 asks each source for a segment)."""
    header = request.headers.get("Range")
    if header is None:
        return 0, size
    try:
        rng = request.http_range
    except ValueError:
        rng = None
    if rng is None or rng.start is None or rng.start < 0 or rng.step not in (None, 1) or (
            rng.stop is not None and rng.stop <= rng.start):
        raise web.HTTPRequestRangeNotSatisfiable(
            text="only one 'Range: bytes=<start>-[<last>]' is supported",
            headers={"Content-Range": f"bytes */{size}"})
    if rng.start >= size:
        raise web.HTTPRequestRangeNotSatisfiable(
            text=f"range starts at or beyond the end ({size} bytes)",
            headers={"Content-Range": f"bytes */{size}"})
    stop = size if rng.stop is None else min(int(rng.stop), size)
    return int(rng.start), stop


def add_file_routes(app: web.Application, settings: Settings, limiter: BandwidthLimiter,
                    metrics: Metrics | None = None) -> None:
    """Register the file routes on the data server's app (behind its token middleware)."""
    routes = FileRoutes(settings, limiter, metrics)
    app.cleanup_ctx.append(routes._open)
    add_piece_routes(app, routes._open_held)
    add_relay_routes(app, routes._relay)
    app.router.add_get(INDEX_PATH, routes.index)
    app.router.add_get(FILES_PREFIX + "{kind}/{relpath:.+}", routes.serve)

