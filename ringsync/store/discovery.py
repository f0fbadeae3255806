"""Find the files under the data dir where RingRift's local generators write games.

Lock safety: nothing here opens a candidate file. POSIX record locks belong to the
process, and closing *any* descriptor of a file drops all of them, so an open()/close()
of a live DB beside ringsync's own SQLite connection lets RingRift's writer checkpoint
and delete -wal/-shm under it. Only stat() is used; SQLite alone opens DBs (a DB that
is not a game DB simply yields nothing when scanned).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ringsync.policy.sources import SourceKind, SourcePatterns, kind_of

__all__ = ["SourceFile", "discover_sources"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SourceFile:
    """A file that holds locally generated games; ``key`` is its posix path under the data dir."""

    path: Path
    key: str
    kind: SourceKind


def discover_sources(data_dir: Path, patterns: SourcePatterns | None = None, *,
                     exclude: Iterable[Path] = ()) -> list[SourceFile]:
    """Every source under ``data_dir`` that ``patterns`` select, sorted by key.

    ``exclude``: directories never read (the node's merged received games). A symlink
    that patterns exclude also excludes its target (``jsonl_aggregated.db`` may link to a
    consolidation DB), and a file reached twice (through a symlink) is one source.
    """
    patterns = patterns or SourcePatterns()
    data_dir = Path(data_dir)
    excluded = [p.resolve() for p in exclude]
    found: list[SourceFile] = []
    excluded_targets: set[Path] = set()
    for root in patterns.roots():
        top = data_dir / root if root else data_dir
        for current, dirnames, filenames in os.walk(top):
            here = Path(current)
            rel = here.relative_to(data_dir).as_posix()
            prefix = "" if rel == "." else rel + "/"
            dirnames[:] = sorted(d for d in dirnames if not patterns.prunes(prefix + d)
                                 and not _inside_any(here / d, excluded))
            for name in filenames:
                path = here / name
                kind = patterns.classify(prefix + name)
                if kind is not None:
                    found.append(SourceFile(path, prefix + name, kind))
                elif kind_of(name) is not None and path.is_symlink():
                    excluded_targets.add(path.resolve())
    return _unique_regular_files(found, excluded, excluded_targets)


def _unique_regular_files(found: list[SourceFile], excluded: list[Path],
                          excluded_targets: set[Path]) -> list[SourceFile]:
    by_target: dict[Path, SourceFile] = {}
    # Real files before symlinks, so a file reached twice keeps its own name.
    for source in sorted(found, key=lambda s: (s.path.is_symlink(), s.key)):
        target = source.path.resolve()
        if target in excluded_targets or _inside_any(target, excluded) or target in by_target:
            continue
        if _is_regular_file(source.path):
            by_target[target] = source
    return sorted(by_target.values(), key=lambda s: s.key)


def _is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _inside_any(path: Path, parents: list[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved == p or resolved.is_relative_to(p) for p in parents)
