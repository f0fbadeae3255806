"""A simulated selfplay writer that fills SQLite game DBs the way RingRift's selfplay does."""

from __future__ import annotations

import argparse
import json
import random
import signal
import sqlite3
import threading
import time
import uuid
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType, TracebackType

__all__ = ["SCHEMA_VERSION", "SelfplayWriter", "create_schema", "main", "run_writer"]

# Mirrors RingRift's GameReplayDB schema (ai-service/app/db/game_replay.py, v9) plus
# a few columns and one table (game_events) that exercise what a receiver must handle:
# an AUTOINCREMENT id, a BLOB column, compressed BLOBs in TEXT columns and triggers.
SCHEMA_VERSION = 9
SNAPSHOT_INTERVAL = 20
SAMPLE_INTERVAL = 10  # history entries / NNUE features / choices: every Nth move

_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS schema_metadata (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS games (
    game_id TEXT PRIMARY KEY, board_type TEXT NOT NULL, num_players INTEGER NOT NULL,
    rng_seed INTEGER, created_at TEXT NOT NULL, completed_at TEXT, game_status TEXT NOT NULL,
    winner INTEGER, termination_reason TEXT, total_moves INTEGER NOT NULL,
    total_turns INTEGER NOT NULL, duration_ms INTEGER, source TEXT,
    schema_version INTEGER NOT NULL, time_control_type TEXT DEFAULT 'none',
    initial_time_ms INTEGER, time_increment_ms INTEGER, metadata_json TEXT,
    quality_score REAL, quality_category TEXT, engine_mode TEXT, model_version TEXT,
    host TEXT, worker_id INTEGER, updated_at TEXT
);
CREATE INDEX IF NOT EXISTS idx_games_board_players ON games(board_type, num_players);
CREATE INDEX IF NOT EXISTS idx_games_created ON games(created_at);
CREATE INDEX IF NOT EXISTS idx_games_status ON games(game_status);
CREATE TABLE IF NOT EXISTS game_players (
    game_id TEXT NOT NULL, player_number INTEGER NOT NULL, player_type TEXT NOT NULL,
    ai_type TEXT, ai_difficulty INTEGER, ai_profile_id TEXT, final_eliminated_rings INTEGER,
    final_territory_spaces INTEGER, final_rings_in_hand INTEGER,
    PRIMARY KEY (game_id, player_number),
    FOREIGN KEY (game_id) REFERENCES games(game_id) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS game_initial_state (
    game_id TEXT PRIMARY KEY, initial_state_json TEXT NOT NULL, compressed INTEGER DEFAULT 0,
    FOREIGN KEY (game_id) REFERENCES games(game_id) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS game_moves (
    game_id TEXT NOT NULL, move_number INTEGER NOT NULL, turn_number INTEGER NOT NULL,
    player INTEGER NOT NULL, phase TEXT NOT NULL, move_type TEXT NOT NULL,
    move_json TEXT NOT NULL, timestamp TEXT, think_time_ms INTEGER, time_remaining_ms INTEGER,
    engine_eval REAL, engine_eval_type TEXT, engine_depth INTEGER, engine_nodes INTEGER,
    engine_pv TEXT, engine_time_ms INTEGER,
    PRIMARY KEY (game_id, move_number),
    FOREIGN KEY (game_id) REFERENCES games(game_id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS idx_moves_game_turn ON game_moves(game_id, turn_number);
CREATE TABLE IF NOT EXISTS game_state_snapshots (
    game_id TEXT NOT NULL, move_number INTEGER NOT NULL, state_json TEXT NOT NULL,
    compressed INTEGER DEFAULT 0, state_hash TEXT,
    PRIMARY KEY (game_id, move_number),
    FOREIGN KEY (game_id) REFERENCES games(game_id) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS game_choices (
    game_id TEXT NOT NULL, move_number INTEGER NOT NULL, choice_type TEXT NOT NULL,
    player INTEGER NOT NULL, options_json TEXT NOT NULL, selected_option_json TEXT NOT NULL,
    ai_reasoning TEXT,
    PRIMARY KEY (game_id, move_number, choice_type),
    FOREIGN KEY (game_id) REFERENCES games(game_id) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS game_history_entries (
    game_id TEXT NOT NULL, move_number INTEGER NOT NULL, player INTEGER NOT NULL,
    phase_before TEXT NOT NULL, phase_after TEXT NOT NULL, status_before TEXT NOT NULL,
    status_after TEXT NOT NULL, progress_before_json TEXT NOT NULL,
    progress_after_json TEXT NOT NULL, state_hash_before TEXT, state_hash_after TEXT,
    available_moves_count INTEGER, engine_eval REAL, engine_depth INTEGER, fsm_valid INTEGER,
    fsm_error_code TEXT,
    PRIMARY KEY (game_id, move_number),
    FOREIGN KEY (game_id) REFERENCES games(game_id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS idx_history_game ON game_history_entries(game_id);
CREATE TABLE IF NOT EXISTS game_nnue_features (
    game_id TEXT NOT NULL, move_number INTEGER NOT NULL, player_perspective INTEGER NOT NULL,
    features BLOB NOT NULL, value REAL NOT NULL, board_type TEXT NOT NULL,
    feature_dim INTEGER NOT NULL,
    PRIMARY KEY (game_id, move_number, player_perspective),
    FOREIGN KEY (game_id) REFERENCES games(game_id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS idx_nnue_game ON game_nnue_features(game_id);
CREATE TABLE IF NOT EXISTS game_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, game_id TEXT NOT NULL, move_number INTEGER,
    event_type TEXT NOT NULL, payload_json TEXT, created_at TEXT NOT NULL,
    FOREIGN KEY (game_id) REFERENCES games(game_id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS idx_events_game ON game_events(game_id);
CREATE TABLE IF NOT EXISTS selfplay_stats (
    config_key TEXT PRIMARY KEY, games_completed INTEGER NOT NULL DEFAULT 0,
    total_moves INTEGER NOT NULL DEFAULT 0, updated_at TEXT
);
CREATE TRIGGER IF NOT EXISTS trg_games_touch AFTER UPDATE ON games
BEGIN
    UPDATE games SET updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
    WHERE game_id = NEW.game_id;
END;
CREATE TRIGGER IF NOT EXISTS trg_games_completed AFTER UPDATE OF game_status ON games
WHEN NEW.game_status = 'completed' AND OLD.game_status <> 'completed'
BEGIN
    INSERT INTO selfplay_stats (config_key, games_completed, total_moves, updated_at)
    VALUES (NEW.board_type || '_' || NEW.num_players || 'p', 1, NEW.total_moves,
            NEW.completed_at)
    ON CONFLICT(config_key) DO UPDATE SET games_completed = games_completed + 1,
        total_moves = total_moves + excluded.total_moves, updated_at = excluded.updated_at;
END;
"""

_PHASES = ("ring_placement", "movement", "capture", "line_processing", "territory_processing")
_MOVE_TYPES = ("place_ring", "move_stack", "overtaking_capture", "process_line", "skip_placement")
_AI_TYPES = ("mcts", "descent", "gumbel_mcts", "heuristic", "minimax")
_FEATURE_DIM = 256


def create_schema(conn: sqlite3.Connection) -> None:
    """Create RingRift's game tables, indexes and triggers, and switch the DB to WAL."""
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(_SCHEMA_SQL)
    conn.execute(
        "INSERT OR REPLACE INTO schema_metadata (key, value) VALUES ('schema_version', ?)",
        (str(SCHEMA_VERSION),),
    )
    conn.commit()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class SelfplayWriter:
    """Writes games incrementally: an in_progress row, moves in transactions, then completion."""

    def __init__(
        self,
        db_path: Path,
        *,
        board_type: str = "hex8",
        num_players: int = 2,
        moves_per_game: int = 80,
        seed: int | None = None,
    ) -> None:
        self.db_path = Path(db_path)
        self.board_type = board_type
        self.num_players = num_players
        self.moves_per_game = moves_per_game
        self._rng = random.Random(seed)
        # Without a seed, ids come from the OS so that generators on different nodes never clash.
        self._id_rng = random.Random(seed) if seed is not None else None
        self._moves: dict[str, int] = {}
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None)
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute("PRAGMA busy_timeout=30000")
        create_schema(self._conn)

    def __enter__(self) -> SelfplayWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._conn.close()

    def _new_id(self) -> str:
        if self._id_rng is None:
            return uuid.uuid4().hex
        return uuid.UUID(int=self._id_rng.getrandbits(128), version=4).hex

    def _transaction(self, statements: Sequence[tuple[str, Sequence[tuple[object, ...]]]]) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, rows in statements:
                if rows:
                    conn.executemany(sql, rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def start_game(self) -> str:
        """Insert the placeholder games row ('in_progress') and the initial state; return the id."""
        game_id = self._new_id()
        now = _now()
        meta = json.dumps({"engine": "gumbel_mcts", "sims": 800, "temperature": 1.0})
        game = (game_id, self.board_type, self.num_players, self._rng.getrandbits(31), now,
                "in_progress", 0, 0, "selfplay", SCHEMA_VERSION, meta, "gumbel_mcts",
                f"v{self._rng.randint(1, 40)}", "sim-host", self._rng.randint(0, 63), now)
        state = json.dumps({"boardType": self.board_type, "players": self.num_players,
                            "currentPlayer": 1, "rings": [18] * self.num_players})
        self._transaction([
            ("INSERT INTO games (game_id, board_type, num_players, rng_seed, created_at, "
             "game_status, total_moves, total_turns, source, schema_version, metadata_json, "
             "engine_mode, model_version, host, worker_id, updated_at) "
             "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", [game]),
            ("INSERT INTO game_initial_state (game_id, initial_state_json, compressed) "
             "VALUES (?,?,1)", [(game_id, zlib.compress(state.encode()))]),
            ("INSERT INTO game_events (game_id, move_number, event_type, payload_json, "
             "created_at) VALUES (?,?,?,?,?)", [(game_id, None, "game_started", meta, now)]),
        ])
        self._moves[game_id] = 0
        return game_id

    def add_moves(self, game_id: str, n: int) -> None:
        """Append ``n`` moves (with snapshots, choices, history, NNUE rows) in one transaction."""
        first = self._moves[game_id]
        numbers = range(first, first + n)
        self._transaction([
            (_INSERT_MOVE, [self._move_row(game_id, m) for m in numbers]),
            (_INSERT_SNAPSHOT, [self._snapshot_row(game_id, m) for m in numbers
                                if m > 0 and m % SNAPSHOT_INTERVAL == 0]),
            (_INSERT_CHOICE, [self._choice_row(game_id, m) for m in numbers
                              if m % SAMPLE_INTERVAL == 5]),
            (_INSERT_HISTORY, [self._history_row(game_id, m) for m in numbers
                               if m % SAMPLE_INTERVAL == 0]),
            (_INSERT_NNUE, [self._nnue_row(game_id, m) for m in numbers
                            if m % SAMPLE_INTERVAL == 0]),
        ])
        self._moves[game_id] = first + n

    def complete_game(self, game_id: str) -> None:
        """Finalise: players' results, a final snapshot, and the UPDATE to 'completed'."""
        total = self._moves.pop(game_id)
        winner = self._rng.randint(1, self.num_players)
        now = _now()
        self._transaction([
            (_INSERT_PLAYER, [self._player_row(game_id, p) for p in
                              range(1, self.num_players + 1)]),
            (_INSERT_SNAPSHOT, [self._snapshot_row(game_id, total)]),
            ("INSERT INTO game_events (game_id, move_number, event_type, payload_json, "
             "created_at) VALUES (?,?,?,?,?)",
             [(game_id, total, "game_over", json.dumps({"winner": winner}), now)]),
            ("UPDATE games SET game_status='completed', winner=?, termination_reason=?, "
             "total_moves=?, total_turns=?, completed_at=?, duration_ms=?, quality_score=?, "
             "quality_category=? WHERE game_id=?",
             [(winner, "ring_elimination", total, (total + 1) // 2, now,
               self._rng.randint(1000, 90000), round(self._rng.random(), 4), "good", game_id)]),
        ])

    def write_game(self) -> str:
        """A whole game: start, moves in a few transactions, completion."""
        game_id = self.start_game()
        left = self.moves_per_game
        while left > 0:
            step = min(left, SNAPSHOT_INTERVAL * 2)
            self.add_moves(game_id, step)
            left -= step
        self.complete_game(game_id)
        return game_id

    def _move_row(self, game_id: str, m: int) -> tuple[object, ...]:
        rng = self._rng
        player = m % self.num_players + 1
        move = {"type": _MOVE_TYPES[m % 5], "player": player,
                "from": {"x": rng.randint(0, 8), "y": rng.randint(0, 8)},
                "to": {"x": rng.randint(0, 8), "y": rng.randint(0, 8)}, "moveNumber": m}
        return (game_id, m, m // self.num_players, player, _PHASES[m % 5], _MOVE_TYPES[m % 5],
                json.dumps(move), _now(), rng.randint(5, 900), rng.randint(0, 600000),
                round(rng.uniform(-1, 1), 4), "value_head", rng.randint(1, 12),
                rng.randint(100, 80000), "a1 b2 c3", rng.randint(1, 500))

    def _snapshot_row(self, game_id: str, m: int) -> tuple[object, ...]:
        stacks = [self._rng.randint(0, 5) for _ in range(32)]
        state = json.dumps({"moveNumber": m, "stacks": stacks})
        return (game_id, m, zlib.compress(state.encode()), 1, f"{self._rng.getrandbits(64):016x}")

    def _choice_row(self, game_id: str, m: int) -> tuple[object, ...]:
        return (game_id, m, "line_reward", m % self.num_players + 1,
                json.dumps([{"option": i} for i in range(3)]), json.dumps({"option": 1}), None)

    def _history_row(self, game_id: str, m: int) -> tuple[object, ...]:
        progress = json.dumps({"markers": m, "collapsed": m // 3, "eliminated": m // 7})
        return (game_id, m, m % self.num_players + 1, _PHASES[m % 5], _PHASES[(m + 1) % 5],
                "active", "active", progress, progress, f"{self._rng.getrandbits(64):016x}",
                f"{self._rng.getrandbits(64):016x}", self._rng.randint(1, 60),
                round(self._rng.uniform(-1, 1), 4), 8, 1, None)

    def _nnue_row(self, game_id: str, m: int) -> tuple[object, ...]:
        features = zlib.compress(self._rng.randbytes(_FEATURE_DIM // 4) * 4)
        return (game_id, m, m % self.num_players + 1, features, 0.0, self.board_type,
                _FEATURE_DIM)

    def _player_row(self, game_id: str, p: int) -> tuple[object, ...]:
        rng = self._rng
        return (game_id, p, "ai", _AI_TYPES[p % 5], rng.randint(1, 10), f"profile-{p}",
                rng.randint(0, 18), rng.randint(0, 40), rng.randint(0, 18))


_INSERT_MOVE = (
    "INSERT INTO game_moves (game_id, move_number, turn_number, player, phase, move_type, "
    "move_json, timestamp, think_time_ms, time_remaining_ms, engine_eval, engine_eval_type, "
    "engine_depth, engine_nodes, engine_pv, engine_time_ms) "
    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_INSERT_SNAPSHOT = (
    "INSERT OR REPLACE INTO game_state_snapshots (game_id, move_number, state_json, compressed, "
    "state_hash) VALUES (?,?,?,?,?)"
)
_INSERT_CHOICE = (
    "INSERT INTO game_choices (game_id, move_number, choice_type, player, options_json, "
    "selected_option_json, ai_reasoning) VALUES (?,?,?,?,?,?,?)"
)
_INSERT_HISTORY = (
    "INSERT INTO game_history_entries (game_id, move_number, player, phase_before, phase_after, "
    "status_before, status_after, progress_before_json, progress_after_json, state_hash_before, "
    "state_hash_after, available_moves_count, engine_eval, engine_depth, fsm_valid, "
    "fsm_error_code) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_INSERT_NNUE = (
    "INSERT INTO game_nnue_features (game_id, move_number, player_perspective, features, value, "
    "board_type, feature_dim) VALUES (?,?,?,?,?,?,?)"
)
_INSERT_PLAYER = (
    "INSERT INTO game_players (game_id, player_number, player_type, ai_type, ai_difficulty, "
    "ai_profile_id, final_eliminated_rings, final_territory_spaces, final_rings_in_hand) "
    "VALUES (?,?,?,?,?,?,?,?,?)"
)


def run_writer(
    db_path: Path,
    n_games: int,
    *,
    leave_in_progress: int = 0,
    rate: float | None = None,
    board_type: str = "hex8",
    num_players: int = 2,
    moves_per_game: int = 80,
    seed: int | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Leave ``leave_in_progress`` games half-written, then write ``n_games`` completed ones.

    ``rate`` paces completions (games/s); ``stop`` ends early. Returns games completed.
    """
    stop = stop or threading.Event()
    with SelfplayWriter(db_path, board_type=board_type, num_players=num_players,
                        moves_per_game=moves_per_game, seed=seed) as writer:
        for _ in range(leave_in_progress):
            writer.add_moves(writer.start_game(), max(1, moves_per_game // 2))
        return _write_paced(writer, n_games, rate, stop)


def _write_paced(writer: SelfplayWriter, n_games: int, rate: float | None,
                 stop: threading.Event) -> int:
    started = time.monotonic()
    done = 0
    while done < n_games and not stop.is_set():
        writer.write_game()
        done += 1
        if rate:
            # Schedule against the start so that pacing does not drift.
            stop.wait(max(0.0, started + done / rate - time.monotonic()))
    return done


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write N completed games and leave K in progress; prints the completed count."""
    parser = argparse.ArgumentParser(prog="python -m ringsync.selfplay_sim", description=__doc__)
    parser.add_argument("db_path", type=Path)
    parser.add_argument("--games", type=int, default=100)
    parser.add_argument("--in-progress", type=int, default=0)
    parser.add_argument("--rate", type=float, default=None, help="games per second")
    parser.add_argument("--board-type", default="hex8")
    parser.add_argument("--num-players", type=int, default=2, choices=(2, 3, 4))
    parser.add_argument("--moves", type=int, default=80, help="moves per game")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()  # finish the current game's transaction, then close cleanly

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    done = run_writer(args.db_path, args.games, leave_in_progress=args.in_progress,
                      rate=args.rate, board_type=args.board_type,
                      num_players=args.num_players, moves_per_game=args.moves,
                      seed=args.seed, stop=stop)
    print(f"completed {done}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
