"""A merged DB holding a million games, built in seconds, for tests and benches at scale."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

from ringsync.store import ringrift_schema
from ringsync.store.gamemerge import TARGET_PAGE_SIZE

# Every WHOLE-th history game is a completed one with MIN_MOVES_REQUIRED moves (what the
# insert trigger demands); the others are bare 'abandoned' games rows, which the v18
# triggers let in: the games table and its indexes have their full size, the moves a share.
WHOLE = 100


def build_history_db(db: Path, games: int, *, prefix: str = "h") -> float:
    """Create ``db`` the way the receiver does and fill it with ``games`` history games.

    Ids are ``prefix`` + 31 hex digits in ascending order (distinct from any uuid4 hex),
    inserted with recursive-CTE INSERT ... SELECTs: ~1M games in seconds. Returns the
    file size in bytes.
    """
    db.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute(f"PRAGMA page_size={TARGET_PAGE_SIZE}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA cache_size=-262144")
        conn.execute("BEGIN")
        ringrift_schema.create_schema(conn)
        gid = f"'{prefix}' || printf('%031x', i)"
        seq = "WITH RECURSIVE k(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM k WHERE i < ?)"
        conn.execute(
            f"INSERT INTO game_moves (game_id, move_number, turn_number, player, phase, move_type, "
            f"move_json) {seq}, m(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM m WHERE n < ?) "
            f"SELECT {gid}, n, n, n % 2 + 1, 'play', 'place_ring', '{{}}' FROM k, m "
            f"WHERE i % {WHOLE} = 0", (games - 1, ringrift_schema.MIN_MOVES_REQUIRED - 1))
        conn.execute(
            f"INSERT INTO games (game_id, board_type, num_players, created_at, completed_at, "
            f"game_status, total_moves, total_turns, schema_version, source) {seq} "
            f"SELECT {gid}, 'hex8', 2, '2026-01-01T00:00:00', '2026-01-01T00:10:00', "
            f"CASE WHEN i % {WHOLE} = 0 THEN 'completed' ELSE 'abandoned' END, "
            f"CASE WHEN i % {WHOLE} = 0 THEN {ringrift_schema.MIN_MOVES_REQUIRED} ELSE 0 END, "
            f"1, {ringrift_schema.SCHEMA_VERSION}, 'history' FROM k", (games - 1,))
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return db.stat().st_size
