"""BLAKE3 content hashes, read in bounded chunks (models are hundreds of MB, NPZ files GBs)."""

from __future__ import annotations

import os
from pathlib import Path

from blake3 import blake3

CHUNK = 1024 * 1024
HASH_HEX_CHARS = 64


def new_hasher() -> blake3:
    return blake3()


def feed_file(hasher: blake3, path: Path | int, length: int | None = None) -> int:
    """Feed the first ``length`` bytes (all when None) of a path or open fd; returns bytes fed."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW) if isinstance(path, Path) else path
    try:
        fed = 0
        while length is None or fed < length:
            want = CHUNK if length is None else min(CHUNK, length - fed)
            chunk = os.pread(fd, want, fed)
            if not chunk:
                break
            hasher.update(chunk)
            fed += len(chunk)
        return fed
    finally:
        if isinstance(path, Path):
            os.close(fd)


def hash_file(path: Path) -> str:
    hasher = new_hasher()
    feed_file(hasher, path)
    return hasher.hexdigest()


def is_hash(value: object) -> bool:
    return (isinstance(value, str) and len(value) == HASH_HEX_CHARS
            and all(c in "0123456789abcdef" for c in value))
