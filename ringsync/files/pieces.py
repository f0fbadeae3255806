"""Per-piece BLAKE3 hashes of a file: how a multi-source download finds which bytes are wrong.

The content hash (BLAKE3 of the whole file) is the only root of trust. A peer's piece list
is a claim about the bytes it holds; after a multi-source download whose content hash is
wrong, the pieces where our copy and the claims disagree are the ones to fetch again, and
once the file verifies, any source whose claims differ from it is proven to hold wrong bytes.
"""

from __future__ import annotations

import os

from blake3 import blake3

from ringsync.errors import BadInputError
from ringsync.files.hashing import CHUNK, is_hash

PIECE_BYTES = 4 * 1024 * 1024
PIECES_PREFIX = "/v1/pieces/"
MAX_PIECES = (1 << 40) // PIECE_BYTES + 1


def piece_count(size: int, piece_bytes: int = PIECE_BYTES) -> int:
    return max(1, -(-size // piece_bytes))


def piece_span(index: int, size: int, piece_bytes: int = PIECE_BYTES) -> tuple[int, int]:
    """Bytes [start, stop) of piece ``index``."""
    start = index * piece_bytes
    return start, min(size, start + piece_bytes)


def hash_pieces(fd: int, size: int, piece_bytes: int = PIECE_BYTES) -> tuple[str, list[str]]:
    """The content hash and the hash of each piece of the first ``size`` bytes of ``fd``,
    read once."""
    whole, pieces = blake3(), []
    for index in range(piece_count(size, piece_bytes)):
        start, stop = piece_span(index, size, piece_bytes)
        piece = blake3()
        position = start
        while position < stop:
            chunk = os.pread(fd, min(CHUNK, stop - position), position)
            if not chunk:
                break
            piece.update(chunk)
            whole.update(chunk)
            position += len(chunk)
        pieces.append(piece.hexdigest())
    return whole.hexdigest(), pieces


def parse_claims(data: object, size: int, digest: str) -> list[str]:
    """A peer's piece list (untrusted) for content ``digest`` of ``size`` bytes."""
    if not isinstance(data, dict):
        raise BadInputError("piece list is not an object")
    if data.get("hash") != digest or data.get("size") != size:
        raise BadInputError("piece list is for other content")
    if data.get("piece_bytes") != PIECE_BYTES:
        raise BadInputError(f"piece list uses pieces of {data.get('piece_bytes')!r:.20} bytes, "
                            f"not {PIECE_BYTES}")
    pieces = data.get("pieces")
    if not isinstance(pieces, list) or len(pieces) != piece_count(size):
        raise BadInputError("piece list has the wrong number of pieces")
    if not all(is_hash(p) for p in pieces):
        raise BadInputError("piece list holds something that is not a hash")
    return [str(p) for p in pieces]
