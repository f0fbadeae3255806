"""A simulated selfplay writer that fills SQLite game DBs the way RingRift's selfplay does.

It reproduces RingRift's writer (``ai-service/app/db/game_replay.py``, the shared RingRift facts
§2), because a kinder fixture hides real bugs:

- ``pattern="per-op"`` (default): every operation opens a connection, sets WAL, busy_timeout
  30000 and foreign_keys, does its work, commits and closes. When no other process holds the
  DB, that close checkpoints the WAL into the DB file and deletes ``-wal``/``-shm``.
  ``pattern="long-lived"`` keeps one connection for the writer's life.
- ``mode="bulk"`` (``store_game``): a whole game in ONE transaction ('in_progress' row, moves,
  UPDATE to the final status, players); readers never see it unfinished.
  ``mode="incremental"`` (``GameWriter``): an 'active' placeholder, one commit per move, then
  the final snapshot and one finalising transaction; partial games are visible.
- outcomes: completed; aborted (``DELETE FROM games``, cascading); truncated (finalised but
  left 'active' with total_moves > 0); killed (an 'active' placeholder left forever); late
  (completed, then rows added to ``game_nnue_features`` and ``parity_*`` set later).
- several writers (threads) on one DB, and ``<db>.writing`` during each save.
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from ringsync._selfplay_run import Mix, Outcomes, run_writer, simulate
from ringsync._selfplay_writer import (
    MODES,
    OUTCOMES,
    PATTERNS,
    SCHEMA_VERSION,
    SelfplayWriter,
    create_schema,
)
from ringsync.store import ringrift_schema

__all__ = [
    "MODES", "OUTCOMES", "PATTERNS", "SCHEMA_VERSION", "Mix", "Outcomes", "SelfplayWriter",
    "create_schema", "main", "run_writer", "simulate",
]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write N completed games and leave K in progress; prints the completed count."""
    parser = argparse.ArgumentParser(prog="python -m ringsync.selfplay_sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("db_path", type=Path)
    parser.add_argument("--games", type=int, default=100, help="completed games to write")
    parser.add_argument("--in-progress", type=int, default=0,
                        help="'active' placeholders left unfinished (killed writers)")
    parser.add_argument("--rate", type=float, default=None, help="completed games per second")
    parser.add_argument("--board-type", default="hex8")
    parser.add_argument("--num-players", type=int, default=2, choices=(2, 3, 4))
    parser.add_argument("--moves", type=int, default=80, help="moves per game (>= 5)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--pattern", choices=PATTERNS, default="per-op",
                        help="connection per operation (RingRift's) or one long-lived")
    parser.add_argument("--mode", choices=MODES, default="bulk",
                        help="store_game in one transaction, or GameWriter's commit per move")
    parser.add_argument("--writers", type=int, default=1, help="concurrent writers on the DB")
    parser.add_argument("--migrated", action="store_true",
                        help="schema of a DB migrated from v1 (only the on-complete trigger)")
    for name in ("aborted", "truncated", "killed", "late"):
        parser.add_argument(f"--p-{name}", type=float, default=0.0,
                            help=f"probability that a game ends {name}")
    parser.add_argument("--summary", type=Path, default=None,
                        help="write the game ids of each outcome to this JSON file")
    args = parser.parse_args(argv)
    if args.moves < ringrift_schema.MIN_MOVES_REQUIRED:
        parser.error(f"--moves {args.moves}: RingRift's triggers need at least "
                     f"{ringrift_schema.MIN_MOVES_REQUIRED} moves per completed game")
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()  # finish the current game's transaction, then close cleanly

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    mix = Mix(args.p_aborted, args.p_truncated, args.p_killed, args.p_late)
    out = simulate(args.db_path, args.games, leave_in_progress=args.in_progress, rate=args.rate,
                   mix=mix, writers=args.writers, stop=stop, board_type=args.board_type,
                   num_players=args.num_players, moves_per_game=args.moves, seed=args.seed,
                   pattern=args.pattern, mode=args.mode, fresh_schema=not args.migrated)
    if args.summary is not None:
        out.write(args.summary)
    print(f"completed {len(out.completed)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
