"""Which files under the data dir are this node's freshly generated games (no I/O).

Patterns are gitignore-style globs relative to the data dir (``selfplay/**/*.db``,
``*.tmp``), as RingRift's ``ai-service/data`` lays files out (the shared RingRift facts file §1,
§3). Includes name what local generators write (class a); excludes name copies, imports,
consolidations and evaluation games (class b), which are never shipped as new games.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import pathspec

from ringsync.errors import ConfigError

__all__ = [
    "DEFAULT_EXCLUDE",
    "DEFAULT_INCLUDE",
    "SourceKind",
    "SourcePatterns",
    "kind_of",
    "parse_patterns",
]

DEFAULT_INCLUDE: tuple[str, ...] = (
    # SelfplayRunner's default DBs and selfplay.db (a+b: its copies dedup by game_id); its
    # subdirs are all received or imported copies (excluded below) unless an operator
    # rotated a DB aside, whose owed games must still be found.
    "games/**/*.db",
    # p2p, p2p_hybrid, p2p_gpu, gumbel, slurm_*, unified_* and every other job dir.
    "selfplay/**/*.db",
    # GPU, soak and Gumbel JSONL logs, and their archived .gz variants.
    "selfplay/**/*.jsonl",
    "selfplay/**/*.jsonl.gz",
    "games/**/*.jsonl",
    "games/**/*.jsonl.gz",
    "logs/selfplay/*.jsonl",
    "logs/selfplay/*.jsonl.gz",
)
DEFAULT_EXCLUDE: tuple[str, ...] = (
    # Received, fetched and imported copies.
    "synced/", "fetched/", "s3_downloads/", "cluster_sync/", "owc_imports/", "imports/",
    "games/*_synced.db", "games/jsonl_aggregated.db", "games/jsonl_converted_*",
    "games/selfplay_*",
    # Consolidated corpora, evaluation games, harvests.
    "canonical_*", "tournament_*", "gauntlet_*", "baseline_calibration_*", "harvested_*",
    "training/",
    # Files being written, locks, archives of other data.
    "*.tmp", "tmp*", "*.lock", "*.writing", "*.archived_*",
)
_SIDECARS = ("-wal", "-shm", "-journal")


class SourceKind(enum.Enum):
    """How a source file is read."""

    DB = "db"
    JSONL = "jsonl"


def kind_of(name: str) -> SourceKind | None:
    """The kind a file name says it is, or None for anything else."""
    if name.endswith((".db", ".sqlite")):
        return SourceKind.DB
    if name.endswith((".jsonl", ".jsonl.gz")):
        return SourceKind.JSONL
    return None


@dataclass(frozen=True)
class SourcePatterns:
    """Include and exclude patterns, compiled once."""

    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    _inc: pathspec.GitIgnoreSpec = field(init=False, repr=False, compare=False)
    _exc: pathspec.GitIgnoreSpec = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_inc", pathspec.GitIgnoreSpec.from_lines(self.include))
        object.__setattr__(self, "_exc", pathspec.GitIgnoreSpec.from_lines(self.exclude))

    def classify(self, relpath: str) -> SourceKind | None:
        """The kind of source at ``relpath`` (posix, relative to the data dir), or None."""
        parts = PurePosixPath(relpath).parts
        if not parts or any(p.startswith((".", "~")) for p in parts):
            return None  # dotfiles and ringsync's own .ringsync/ state, editor temp files
        if parts[-1].endswith(_SIDECARS):
            return None
        kind = kind_of(parts[-1])
        if kind is None or not self._inc.match_file(relpath) or self._exc.match_file(relpath):
            return None
        return kind

    def prunes(self, reldir: str) -> bool:
        """True when nothing below directory ``reldir`` can be a source."""
        name = PurePosixPath(reldir).name
        return name.startswith((".", "~")) or self._exc.match_file(reldir + "/")

    def roots(self) -> tuple[str, ...]:
        """The directories to walk: each include pattern's literal leading directories."""
        out: list[str] = []
        for pattern in self.include:
            if pattern.startswith("!"):
                continue
            parts = pattern.strip("/").split("/")[:-1]
            literal = []
            for part in parts:
                if any(ch in part for ch in "*?[\\"):
                    break
                literal.append(part)
            out.append("/".join(literal))
        # A root inside another root is walked with it.
        unique = sorted(set(out), key=len)
        return tuple(r for i, r in enumerate(unique)
                     if not any(_within(r, o) for o in unique[:i]))


def _within(path: str, parent: str) -> bool:
    return parent == "" or path == parent or path.startswith(parent + "/")


def parse_patterns(name: str, text: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    """Comma-separated patterns from env variable ``name``; refuses any that leave the data dir."""
    if text is None:
        return default
    patterns = tuple(p.strip() for p in text.split(",") if p.strip())
    for p in patterns:
        _check_pattern(name, p)
    return patterns


def _check_pattern(name: str, pattern: str) -> None:
    body = pattern.removeprefix("!")
    if body.startswith(("/", "~")) or (len(body) > 1 and body[1] == ":"):
        raise ConfigError(f"{name}: pattern {pattern!r} is absolute; patterns are relative to "
                          "RINGRIFT_DATA_DIR, e.g. selfplay/**/*.db")
    if ".." in body.replace("\\", "/").split("/"):
        raise ConfigError(f"{name}: pattern {pattern!r} leaves the data dir ('..'); patterns "
                          "are relative to RINGRIFT_DATA_DIR and stay inside it")
