"""GET /v1/pieces/<kind>/<relpath>: the piece hashes of a file this node serves.

Computed from the bytes on disk when first asked (only after a multi-source download went
wrong, so rarely) and kept for as long as the file is unchanged."""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from collections.abc import Callable

from aiohttp import web

from ringsync.errors import UnsafePathError
from ringsync.files.kinds import FileKind
from ringsync.files.paths import safe_relpath
from ringsync.files.pieces import PIECE_BYTES, PIECES_PREFIX, hash_pieces

CACHED_FILES = 64

OpenHeld = Callable[[FileKind, str], tuple[int, int, str]]  # -> (fd, size, content hash)
_Key = tuple[FileKind, str, int, int, int]


class PieceRoutes:
    def __init__(self, open_held: OpenHeld) -> None:
        self._open_held = open_held
        self._cache: OrderedDict[_Key, list[str]] = OrderedDict()

    async def pieces(self, request: web.Request) -> web.Response:
        try:
            kind = FileKind(request.match_info["kind"])
            relpath = safe_relpath(request.match_info["relpath"])
        except (ValueError, UnsafePathError) as exc:
            raise web.HTTPNotFound(text=f"no such file: {exc}") from None
        fd, size, digest = await asyncio.to_thread(self._open_held, kind, relpath)
        try:
            st = os.fstat(fd)
            key = (kind, relpath, st.st_size, st.st_mtime_ns, st.st_ino)
            cached = self._cache.get(key)
            if cached is None:
                # Hashed from what is on disk: a corrupt copy shows here as different pieces.
                _, pieces = await asyncio.to_thread(hash_pieces, fd, size)
                self._cache[key] = pieces
                while len(self._cache) > CACHED_FILES:
                    self._cache.popitem(last=False)
            else:
                pieces = cached
        finally:
            os.close(fd)
        return web.json_response({"hash": digest, "size": size, "piece_bytes": PIECE_BYTES,
                                  "pieces": pieces})


def add_piece_routes(app: web.Application, open_held: OpenHeld) -> None:
    app.router.add_get(PIECES_PREFIX + "{kind}/{relpath:.+}", PieceRoutes(open_held).pieces)
