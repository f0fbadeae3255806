"""Peer-to-peer spread: a node still downloading a file serves the bytes it already holds.

A new model would otherwise reach N receivers in N times the time of one, all of them
pulling from the one node that made it (whose uplink is the bottleneck). Instead each
node limits how many peers it streams one content to at once (RINGRIFT_FILE_UPLOAD_SLOTS),
lists the downloads it has in progress at GET /v1/relays, and answers a request for a file
it is still fetching from its ``.part`` file: the bytes its journal says are on disk, then
more as they arrive, to the end once the file is verified and published. Receivers turned
away by busy sources fetch from those relays, so the file spreads as a pipelined tree.

The relayed bytes are not verified yet: every receiver checks the content hash of the
whole file before it publishes, as for any source.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
from aiohttp import web

from ringsync.errors import BadInputError, UnsafePathError
from ringsync.files.hashing import is_hash
from ringsync.files.kinds import FileKind, part_name
from ringsync.files.manifest import FileManifest
from ringsync.files.paths import resolve_inside, safe_relpath
from ringsync.files.plan import FetchJob, Source
from ringsync.inventory import Host
from ringsync.ops.peer_session import PeerSession

RELAYS_PATH = "/v1/relays"
MULTI_SOURCE = "multi-source"  # journal source of an aria2 fetch: written out of order, not relayed
POLL_SECONDS = 0.05
IDLE_SECONDS = 10.0  # a relay whose own download stalls this long ends the answer
MAX_RELAYS = 10_000
MAX_LIST_BYTES = 4 * 1024 * 1024

Ready = Callable[[int], Awaitable[int | None]]

@dataclass
class _Progress:
    written: Callable[[], int]  # bytes in the part (not yet journalled: receivers check them)
    grew: asyncio.Event = field(default_factory=asyncio.Event)


# Part files a download of this process is streaming into right now.
_active: dict[Path, _Progress] = {}


@contextlib.contextmanager
def streaming_into(part: Path, written: Callable[[], int]) -> Iterator[Callable[[], None]]:
    """Mark ``part`` as being downloaded into by this process (one download per part);
    yields the function to call after each write, which wakes the relays of this part."""
    progress = _Progress(written)
    _active[part] = progress
    try:
        yield progress.grew.set
    finally:
        if _active.get(part) is progress:
            del _active[part]
        progress.grew.set()


def part_path(root: Path, relpath: str) -> Path:
    final = resolve_inside(root, relpath)
    return final.with_name(part_name(final.name))


@dataclass(frozen=True, slots=True)
class Relay:
    """A download in progress at a peer: it serves ``kind/relpath`` from its part file."""

    peer: str
    kind: FileKind
    relpath: str
    hash: str
    size: int


class RelayRoutes:
    def __init__(self, dirs: Mapping[FileKind, Path], held: Callable[[], FileManifest]) -> None:
        self._dirs = dict(dirs)
        self._held = held

    async def relays(self, request: web.Request) -> web.Response:
        listed = await asyncio.to_thread(self._relayable)
        return web.json_response({"relays": [
            {"kind": t.kind.value, "relpath": t.relpath, "hash": t.hash, "size": t.size}
            for t in listed]})

    def _relayable(self) -> list[Relay]:
        out = []
        for t in self._held().transfers():
            with contextlib.suppress(UnsafePathError):
                if t.source != MULTI_SOURCE and part_path(self._dirs[t.kind], t.relpath) in _active:
                    out.append(Relay("", t.kind, t.relpath, t.hash, t.size))
        return out

    def open_partial(self, kind: FileKind, relpath: str) -> tuple[int, int, str, Ready] | None:
        """The part file of a download in progress here, and how far it may be read."""
        t = self._held().transfer(kind, relpath)
        if t is None or t.source == MULTI_SOURCE:
            return None
        try:
            part = part_path(self._dirs[kind], relpath)
            if part not in _active:
                return None
            fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW)
        except (OSError, UnsafePathError):
            return None
        return fd, t.size, t.hash, self._ready(kind, relpath, t.hash, t.size, part)

    def _ready(self, kind: FileKind, relpath: str, digest: str, size: int, part: Path) -> Ready:
        async def ready(position: int) -> int | None:
            """Bytes of the part safe to send (journalled, or all once published with this
            content); None when the download was given up or started over."""
            idle = 0.0
            while True:
                progress = _active.get(part)
                if progress is not None:  # downloading now: its byte count, no journal read
                    progress.grew.clear()
                    written = progress.written()
                    if written != position:
                        return written if written > position else None
                    idle = 0.0
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(POLL_SECONDS):
                            await progress.grew.wait()
                    continue
                t = await asyncio.to_thread(self._held().transfer, kind, relpath)
                if t is None or t.hash != digest:
                    rec = await asyncio.to_thread(self._held().get, kind, relpath)
                    return size if rec is not None and rec.hash == digest else None
                if t.done > position:
                    return t.done
                # Between two sources, just done (publishing), or stalled: wait, boundedly.
                idle += POLL_SECONDS
                if idle > IDLE_SECONDS:
                    return None
                await asyncio.sleep(POLL_SECONDS)
        return ready


def parse_relays(peer: str, data: object) -> list[Relay]:
    """A peer's /v1/relays answer (untrusted)."""
    items = data.get("relays") if isinstance(data, dict) else None
    if not isinstance(items, list) or len(items) > MAX_RELAYS:
        raise BadInputError(f"relay list must be a list of at most {MAX_RELAYS} entries")
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise BadInputError("relay entry is not an object")
        try:
            kind = FileKind(item.get("kind"))
            relpath = safe_relpath(item.get("relpath"))
        except (ValueError, UnsafePathError) as exc:
            raise BadInputError(f"relay entry names no valid file: {exc}") from None
        size = item.get("size")
        if not is_hash(item.get("hash")) or type(size) is not int or size < 0:
            raise BadInputError(f"relay entry for {relpath!r} needs a hash and a size")
        out.append(Relay(peer, kind, relpath, str(item["hash"]), size))
    return out


def with_relays(jobs: Sequence[FetchJob], relays: Mapping[str, list[Relay]],
                excluded: Mapping[str, set[str]]) -> list[FetchJob]:
    """Each job with the peers relaying its content (and not holding it whole) added."""
    by_hash: dict[str, list[Source]] = {}
    for peer, listed in sorted(relays.items()):
        for r in listed:
            by_hash.setdefault(r.hash, []).append(Source(peer, r.kind, r.relpath))
    out = []
    for job in jobs:
        whole = {s.peer for s in job.sources}
        bad = excluded.get(job.entry.hash, set())
        extra = tuple(s for s in by_hash.get(job.entry.hash, ()) if s.peer not in whole | bad)
        out.append(replace(job, relays=extra) if extra else job)
    return out


def add_relay_routes(app: web.Application, routes: RelayRoutes) -> None:
    app.router.add_get(RELAYS_PATH, routes.relays)


class RelayClient:
    """Reads peers' /v1/relays lists (one aiohttp session for every peer)."""

    def __init__(self, node_id: str, token: str | None) -> None:
        self._session = PeerSession(node_id, token, aiohttp.ClientTimeout(total=10))

    async def relays(self, peer: Host) -> list[Relay]:
        """What ``peer`` relays; [] when it cannot say (an older node, or unreachable)."""
        try:
            async with self._session.get().get(peer.url(RELAYS_PATH)) as resp:
                if resp.status != 200:
                    return []
                body = await resp.content.read(MAX_LIST_BYTES + 1)
            return parse_relays(peer.name, json.loads(body))
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError, BadInputError):
            return []

    async def close(self) -> None:
        await self._session.close()
