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

import re
from pathlib import Path

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


def _names(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir()]
