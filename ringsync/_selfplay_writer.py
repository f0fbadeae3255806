"""SelfplayWriter: writes games into a SQLite DB the way RingRift's selfplay does.

What it reproduces, and why, is in ``ringsync.selfplay_sim``'s docstring.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from ringsync.store import ringrift_schema
from ringsync.store.ringrift_schema import SCHEMA_VERSION, TRIGGER_ON_COMPLETE

__all__ = ["MODES", "OUTCOMES", "PATTERNS", "SCHEMA_VERSION", "SelfplayWriter", "create_schema"]

PATTERNS = ("per-op", "long-lived")
MODES = ("bulk", "incremental")
OUTCOMES = ("completed", "aborted", "truncated", "killed", "late")
SNAPSHOT_INTERVAL = 20
SAMPLE_INTERVAL = 10  # history entries / choices: every Nth move
BUSY_TIMEOUT_MS = 30000  # RingRift's app/config/thresholds.py

# Not RingRift's: a table with an AUTOINCREMENT id that exercises what a receiver must handle
# beyond the v18 tables. Only with extra_tables=True, which also fills game_nnue_features
# during the game so that every table has rows (RingRift's tools add them later).
_EXTRA_SQL = """
CREATE TABLE IF NOT EXISTS game_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, game_id TEXT NOT NULL, move_number INTEGER,
    event_type TEXT NOT NULL, payload_json TEXT, created_at TEXT NOT NULL,
    FOREIGN KEY (game_id) REFERENCES games(game_id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS idx_events_game ON game_events(game_id);
"""

_PHASES = ("ring_placement", "movement", "capture", "line_processing", "territory_processing")
_MOVE_TYPES = ("place_ring", "move_stack", "overtaking_capture", "process_line", "skip_placement")
_AI_TYPES = ("mcts", "descent", "gumbel_mcts", "heuristic", "minimax")
_FEATURE_DIM = 256
_HEURISTIC_BYTES = 196


def create_schema(conn: sqlite3.Connection, *, fresh: bool = True,
                  extra_tables: bool = False) -> None:
    """RingRift's v18 schema in WAL mode; ``fresh=False`` models a DB migrated from v1.

    A migrated DB has only the ``enforce_moves_on_complete`` trigger (the RingRift facts, §2).
    """
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("BEGIN IMMEDIATE")
    try:
        ringrift_schema.create_schema(conn, triggers=fresh)
        if not fresh:
            conn.execute(TRIGGER_ON_COMPLETE)
        if extra_tables:
            for statement in _EXTRA_SQL.strip().split(";\n"):
                conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _connect(db_path: Path) -> sqlite3.Connection:
    """A connection set up the way RingRift's ``_get_conn`` sets one up."""
    conn = sqlite3.connect(db_path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                           check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        _journal_mode_wal(conn)
        conn.execute("PRAGMA foreign_keys=ON")
    except BaseException:
        conn.close()
        raise
    return conn


def _journal_mode_wal(conn: sqlite3.Connection, attempts: int = 5) -> None:
    """PRAGMA journal_mode=WAL, retried like RingRift retries "locked" (5 tries).

    While another connection's close checkpoints and deletes the WAL, this pragma can
    answer SQLITE_BUSY at once, without waiting on the busy handler.
    """
    for attempt in range(attempts):
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


Statements = Sequence[tuple[str, Sequence[tuple[object, ...]]]]


class SelfplayWriter:
    """One RingRift game writer on ``db_path``; see the module docstring for the options."""

    def __init__(
        self,
        db_path: Path,
        *,
        board_type: str = "hex8",
        num_players: int = 2,
        moves_per_game: int = 80,
        seed: int | None = None,
        pattern: str = "per-op",
        mode: str = "bulk",
        fresh_schema: bool = True,
        extra_tables: bool = False,
    ) -> None:
        if pattern not in PATTERNS:
            raise ValueError(f"pattern={pattern!r}: use one of {', '.join(PATTERNS)}")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: use one of {', '.join(MODES)}")
        self.db_path = Path(db_path)
        self.board_type = board_type
        self.num_players = num_players
        self.moves_per_game = moves_per_game
        self.pattern = pattern
        self.mode = mode
        self.extra_tables = extra_tables
        self._rng = random.Random(seed)
        # Without a seed, ids come from the OS so that generators on different nodes never clash.
        self._id_rng = random.Random(seed) if seed is not None else None
        self._moves: dict[str, int] = {}
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = _connect(self.db_path) if pattern == "long-lived" else None
        with self._op() as conn:
            create_schema(conn, fresh=fresh_schema, extra_tables=extra_tables)

    def __enter__(self) -> SelfplayWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the long-lived connection, if any (idempotent)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- connections ---------------------------------------------------------------------

    @contextmanager
    def _op(self) -> Iterator[sqlite3.Connection]:
        """The connection for one operation: a new one per operation unless long-lived."""
        if self._conn is not None:
            yield self._conn
            return
        conn = _connect(self.db_path)
        try:
            yield conn
        finally:
            conn.close()  # the last close checkpoints and deletes -wal/-shm

    def _transaction(self, statements: Statements) -> None:
        with self._op() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, rows in statements:
                    if rows:
                        conn.executemany(sql, rows)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """``<db>.writing`` exists while a save runs, as SelfplayRunner's write lock does."""
        marker = self.db_path.with_name(self.db_path.name + ".writing")
        marker.touch()
        try:
            yield
        finally:
            with suppress(FileNotFoundError):  # another writer's save ended first
                marker.unlink()

    def _new_id(self) -> str:
        if self._id_rng is None:
            return uuid.uuid4().hex
        return uuid.UUID(int=self._id_rng.getrandbits(128), version=4).hex

    # -- incremental (GameWriter) --------------------------------------------------------

    def start_game(self) -> str:
        """Insert the 'active' placeholder (total_moves 0) and the initial state; return the id."""
        game_id = self._new_id()
        self._transaction(self._start_rows(game_id, "active", "unknown"))
        self._moves[game_id] = 0
        return game_id

    def add_moves(self, game_id: str, n: int) -> None:
        """Append ``n`` moves, one commit each, with the heuristic_features UPDATE."""
        for _ in range(n):
            m = self._moves[game_id]
            self._transaction([
                (_INSERT_MOVE, [self._move_row(game_id, m)]),
                ("UPDATE game_moves SET heuristic_features=? WHERE game_id=? AND move_number=?",
                 [(self._rng.randbytes(_HEURISTIC_BYTES), game_id, m)]),
                *self._per_move_extras(game_id, m),
            ])
            self._moves[game_id] = m + 1

    def complete_game(self, game_id: str, *, status: str = "completed") -> None:
        """Finalise: the final snapshot, then the games UPDATE and the players in one commit."""
        total = self._moves.pop(game_id)
        self._transaction([(_INSERT_SNAPSHOT, [self._snapshot_row(game_id, total)])])
        self._transaction(self._final_rows(game_id, total, status))

    def abort_game(self, game_id: str) -> None:
        """Abort (an exception, or < 5 moves): the games row goes, its rows cascade."""
        self._moves.pop(game_id, None)
        self._transaction([("DELETE FROM games WHERE game_id=?", [(game_id,)])])

    def change_later(self, game_id: str) -> None:
        """What separate tools do to a finished game: NNUE feature rows and a parity check."""
        total = self.moves_per_game
        self._transaction([
            (_INSERT_NNUE, [self._nnue_row(game_id, m, perspective=0)
                            for m in range(0, total, SAMPLE_INTERVAL)]),
            ("UPDATE games SET parity_status='passed', parity_checked_at=? WHERE game_id=?",
             [(_now(), game_id)]),
        ])

    # -- whole games ---------------------------------------------------------------------

    def write_game(self, outcome: str = "completed") -> str:
        """One game with ``outcome`` (see OUTCOMES; "late" is written as completed)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome={outcome!r}: use one of {', '.join(OUTCOMES)}")
        status = "active" if outcome == "truncated" else "completed"
        with self._writing():
            if outcome in ("aborted", "killed"):
                game_id = self.start_game()
                self.add_moves(game_id, max(1, self.moves_per_game // 2))
                if outcome == "aborted":
                    self.abort_game(game_id)
                else:
                    self._moves.pop(game_id)  # the process died: nobody finalises it
                return game_id
            if self.mode == "bulk":
                return self._store_game(status)
            game_id = self.start_game()
            self.add_moves(game_id, self.moves_per_game)
            self.complete_game(game_id, status=status)
            return game_id

    def _store_game(self, status: str) -> str:
        """RingRift's store_game: the whole game in one transaction."""
        game_id = self._new_id()
        total = self.moves_per_game
        moves = range(total)
        self._transaction([
            *self._start_rows(game_id, "in_progress", "selfplay"),
            (_INSERT_MOVE, [self._move_row(game_id, m) for m in moves]),
            *(s for m in moves for s in self._per_move_extras(game_id, m)),
            (_INSERT_SNAPSHOT, [self._snapshot_row(game_id, total)]),
            *self._final_rows(game_id, total, status),
        ])
        return game_id

    def _start_rows(self, game_id: str, status: str, source: str) -> list[
            tuple[str, Sequence[tuple[object, ...]]]]:
        now = _now()
        game = (game_id, self.board_type, self.num_players, self._rng.getrandbits(31), now,
                status, 0, 0, source, SCHEMA_VERSION, "gumbel_mcts",
                f"v{self._rng.randint(1, 40)}")
        state = json.dumps({"boardType": self.board_type, "players": self.num_players,
                            "currentPlayer": 1, "rings": [18] * self.num_players})
        rows: list[tuple[str, Sequence[tuple[object, ...]]]] = [
            ("INSERT INTO games (game_id, board_type, num_players, rng_seed, created_at, "
             "game_status, total_moves, total_turns, source, schema_version, engine_mode, "
             "model_version) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", [game]),
            ("INSERT INTO game_initial_state (game_id, initial_state_json, compressed) "
             "VALUES (?,?,1)", [(game_id, zlib.compress(state.encode()))]),
        ]
        if self.extra_tables:
            rows.append((_INSERT_EVENT, [(game_id, None, "game_started", "{}", now)]))
        return rows

    def _per_move_extras(self, game_id: str, m: int) -> list[tuple[str, Sequence[tuple[object, ...]]]]:
        extras: list[tuple[str, Sequence[tuple[object, ...]]]] = []
        if m > 0 and m % SNAPSHOT_INTERVAL == 0:
            extras.append((_INSERT_SNAPSHOT, [self._snapshot_row(game_id, m)]))
        if m % SAMPLE_INTERVAL == 5:
            extras.append((_INSERT_CHOICE, [self._choice_row(game_id, m)]))
        if m % SAMPLE_INTERVAL == 0:
            extras.append((_INSERT_HISTORY, [self._history_row(game_id, m)]))
            if self.extra_tables:
                extras.append((_INSERT_NNUE, [self._nnue_row(game_id, m)]))
        return extras

    def _final_rows(self, game_id: str, total: int, status: str) -> list[
            tuple[str, Sequence[tuple[object, ...]]]]:
        winner = self._rng.randint(1, self.num_players) if status == "completed" else None
        reason = "status:completed:elimination" if status == "completed" else "max_moves"
        meta = json.dumps({"engine": "gumbel_mcts", "sims": 800, "temperature": 1.0})
        rows: list[tuple[str, Sequence[tuple[object, ...]]]] = [
            ("UPDATE games SET game_status=?, winner=?, termination_reason=?, total_moves=?, "
             "total_turns=?, completed_at=?, duration_ms=?, metadata_json=?, quality_score=?, "
             "quality_category=? WHERE game_id=?",
             [(status, winner, reason, total, (total + 1) // 2, _now(),
               self._rng.randint(1000, 90000), meta, round(self._rng.random(), 4), "good",
               game_id)]),
            (_INSERT_PLAYER, [self._player_row(game_id, p) for p in range(1, self.num_players + 1)]),
        ]
        if self.extra_tables:
            rows.append((_INSERT_EVENT, [(game_id, total, "game_over", json.dumps(
                {"winner": winner}), _now())]))
        return rows

    # -- rows ----------------------------------------------------------------------------

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

    def _nnue_row(self, game_id: str, m: int, perspective: int | None = None) -> tuple[object, ...]:
        """Later rows use perspective 0 (no in-game row does), so they are new keys."""
        features = zlib.compress(self._rng.randbytes(_FEATURE_DIM // 4) * 4)
        who = m % self.num_players + 1 if perspective is None else perspective
        return (game_id, m, who, features, 0.0, self.board_type, _FEATURE_DIM)

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
    "INSERT OR IGNORE INTO game_nnue_features (game_id, move_number, player_perspective, "
    "features, value, board_type, feature_dim) VALUES (?,?,?,?,?,?,?)"
)
_INSERT_PLAYER = (
    "INSERT INTO game_players (game_id, player_number, player_type, ai_type, ai_difficulty, "
    "ai_profile_id, final_eliminated_rings, final_territory_spaces, final_rings_in_hand) "
    "VALUES (?,?,?,?,?,?,?,?,?)"
)
_INSERT_EVENT = ("INSERT INTO game_events (game_id, move_number, event_type, payload_json, "
                 "created_at) VALUES (?,?,?,?,?)")
