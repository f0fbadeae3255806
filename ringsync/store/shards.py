"""Where a config's merged games live: ``<key>.db``, then ``<key>+2.db``, ``<key>+3.db`` ...

A merged DB stops taking new games once it holds RINGRIFT_MERGED_SHARD_MB; the next
games go into a new one beside it. RingRift keys most per-game tables by a random
``game_id``, so in a DB far larger than a batch every new game lands on its own leaf of
each of ~10 indexes: at a million games held, merging wrote 16 times the payload and ran at
a ninth of the speed into an empty DB (docs/benchmarks.md §6). Bounded shards keep every
merge as cheap as into a small DB. RingRift's discovery reads every DB under
``games/synced/`` and deduplicates by game_id, so it reads the shards as it reads one DB.
``+`` is not allowed in a config key, so a shard's name never collides with another key's.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path

from xxhash import xxh3_64_intdigest

_SHARD_RE = re.compile(r"(?P<key>[^+/]+?)(?:\+(?P<n>[1-9][0-9]{0,8}))?\.db")


def shard_path(directory: Path, key: str, number: int) -> Path:
    """The path of shard ``number`` (1 is the config's plain ``<key>.db``)."""
    return directory / (f"{key}.db" if number == 1 else f"{key}+{number}.db")


def parse_shard(name: str) -> tuple[str, int] | None:
    """(config key, shard number) of a merged DB's file name; None for any other file."""
    match = _SHARD_RE.fullmatch(name)
    if match is None or match["key"].startswith("."):
        return None
    return match["key"], int(match["n"] or 1)


def shard_paths(directory: Path, key: str) -> list[Path]:
    """The config's merged DBs present in ``directory``, oldest first (one listing)."""
    if not directory.is_dir():
        return []
    found = (parse_shard(name) for name in _names(directory))
    numbers = sorted(shard[1] for shard in found if shard is not None and shard[0] == key)
    return [shard_path(directory, key, n) for n in numbers]


def config_keys(directory: Path) -> set[str]:
    """The config keys with at least one merged DB in ``directory``."""
    if not directory.is_dir():
        return set()
    return {parsed[0] for name in _names(directory) if (parsed := parse_shard(name)) is not None}


def held_filter_path(directory: Path, key: str) -> Path:
    """Where the filter of ``key``'s full shards is kept: beside them, not a ``*.db``."""
    return directory / f".{key}.held"


def _names(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir()]


class HeldFilter:
    """The game ids a config's full shards hold, as a Bloom filter.

    A merge looks up in the full shards only the ids this says may be there: duplicates,
    and about 1 new id in 400 (16 bits and 4 probes per id). Without it every id of every
    batch was looked up in every full shard: at a million games held in 65 shards, 30 ms
    per 500-game batch, growing with the shards. Building it reads every id of the full
    shards (~2 CPU-s at a million), so it is kept beside them (``save``/``load``, with the
    inode of each shard it covers) and a restart reads ~4 MB instead. It is grown to twice
    the ids it holds whenever it is full, so its false positives stay near that rate.
    """

    BITS_PER_ID = 16
    PROBES = 4
    _MAGIC = b"ringsync-held-filter 1\n"

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = max(capacity, 4096)
        self._bits = bytearray(self.capacity * self.BITS_PER_ID // 8)
        self._m = len(self._bits) * 8
        self.count = 0
        self.covered: dict[Path, int] = {}  # the shards whose ids were added, with their inode

    def add(self, ids: Iterable[str]) -> None:
        bits, m = self._bits, self._m
        for game_id in ids:
            h = xxh3_64_intdigest(game_id.encode())
            step = (h >> 32) | 1
            for i in range(self.PROBES):
                pos = (h + i * step) % m
                bits[pos >> 3] |= 1 << (pos & 7)
            self.count += 1

    def may_hold(self, game_id: str) -> bool:
        bits, m = self._bits, self._m
        h = xxh3_64_intdigest(game_id.encode())
        step = (h >> 32) | 1
        return all(bits[(pos := (h + i * step) % m) >> 3] & (1 << (pos & 7))
                   for i in range(self.PROBES))

    def cover(self, path: Path, ids: Iterable[str]) -> None:
        """Add the ids of the full shard at ``path``."""
        inode = path.stat().st_ino
        self.add(ids)
        self.covered[path] = inode

    def save(self, path: Path) -> None:
        """Write it to ``path`` whole or not at all (temp file, fsync, rename)."""
        header = json.dumps({"capacity": self.capacity, "count": self.count,
                             "covered": {p.name: ino for p, ino in self.covered.items()}})
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(self._MAGIC + header.encode() + b"\n")
            f.write(self._bits)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> HeldFilter | None:
        """The filter saved at ``path``, covering only the shards still there under the same
        inode (one replaced or restored from elsewhere is read again); None if unreadable."""
        try:
            data = path.read_bytes()
            if not data.startswith(cls._MAGIC):
                return None
            line_end = data.index(b"\n", len(cls._MAGIC))
            header = json.loads(data[len(cls._MAGIC):line_end])
            held = cls(int(header["capacity"]))
            bits = data[line_end + 1:]
            if len(bits) != len(held._bits):
                return None
            held._bits[:] = bits
            held.count = int(header["count"])
            for name, inode in dict(header["covered"]).items():
                shard = path.parent / str(name)
                with suppress(OSError):
                    if shard.stat().st_ino == int(inode):
                        held.covered[shard] = int(inode)
            return held
        except (OSError, ValueError, KeyError, TypeError):
            return None
