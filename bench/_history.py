"""Large source DBs for the scale benchmarks, built fast and cached.

A template of RingRift-written games (SelfplayWriter, v18 schema and triggers) is copied
inside SQLite with new game ids until the DB holds ``games`` games: children first, then
the games rows (so RingRift's insert trigger passes), in one transaction per copy.
"""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from ringsync.selfplay_sim import SelfplayWriter

TEMPLATE_GAMES = 1000


def cached_source_db(cache_dir: Path, games: int, moves: int) -> Path:
    """A checkpointed source DB of ``games`` completed games of ``moves`` moves, built once."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    db = cache_dir / f"history_{games}_{moves}m.db"
    if db.exists():
        return db
    started = time.monotonic()
    part = db.with_name(db.name + ".building")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{part}{suffix}").unlink(missing_ok=True)
    template = min(games, TEMPLATE_GAMES)
    with SelfplayWriter(part, moves_per_game=moves, seed=7, pattern="long-lived") as writer:
        for _ in range(template):
            writer.write_game()
    with closing(sqlite3.connect(part, isolation_level=None)) as conn:
        conn.execute("PRAGMA synchronous=OFF")
        tables = _game_tables(conn)
        copy = 1
        while copy * template < games:
            n = min(template, games - copy * template)
            conn.execute("BEGIN")
            for table, cols in tables:  # children first, games last: the insert trigger
                select = ", ".join(f"game_id || '-c{copy}'" if c == "game_id" else f'"{c}"'
                                   for c in cols)
                names = ", ".join(f'"{c}"' for c in cols)
                conn.execute(f'INSERT INTO "{table}" ({names}) SELECT {select} FROM "{table}" '
                             f"WHERE game_id IN (SELECT game_id FROM games WHERE rowid <= ?)", (n,))
            conn.execute("COMMIT")
            copy += 1
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    os.replace(part, db)
    for suffix in ("-wal", "-shm"):
        Path(f"{part}{suffix}").unlink(missing_ok=True)
    print(f"  built {db} ({games:,} games of {moves} moves, {db.stat().st_size / 1e6:,.0f} MB) "
          f"in {time.monotonic() - started:.0f} s", flush=True)
    return db


def _game_tables(conn: sqlite3.Connection) -> list[tuple[str, list[str]]]:
    """Per-game tables (children first, games last) with the columns to copy (no own rowid key)."""
    out = []
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' "
                                        "AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    for name in names:
        info = conn.execute(f'PRAGMA table_info("{name}")').fetchall()
        cols = [r[1] for r in info]
        if "game_id" not in cols:
            continue
        pks = [r for r in info if r[5]]
        if len(pks) == 1 and str(pks[0][2]).upper() == "INTEGER":
            cols.remove(pks[0][1])  # an alias of the rowid: new rows get new ones
        out.append((name, cols))
    out.sort(key=lambda t: t[0] == "games")
    return out
