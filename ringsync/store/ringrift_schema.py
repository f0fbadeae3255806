"""RingRift's game DB schema (GameReplayDB v18): received DBs are created with it.

RingRift's readers migrate a DB without ``schema_metadata`` in place as if it were v1 and
refuse one above 18, so a DB ringsync creates must look exactly like one RingRift created.
Column and table names follow ``ai-service/app/db/game_replay.py`` as the RingRift facts file
(section 2) describes it; the v10-v18 additions beyond those it names are modelled, not copied.
"""

from __future__ import annotations

import re
import sqlite3

from ringsync.protocol.ringrift import COMPLETED_STATUSES, MIN_MOVES_REQUIRED

__all__ = [
    "COMPLETED_STATUSES",
    "MIN_MOVES_REQUIRED",
    "OBJECT_NAMES",
    "SCHEMA_VERSION",
    "TABLES",
    "TRIGGER_ON_COMPLETE",
    "TRIGGER_ON_INSERT",
    "create_schema",
    "table_statements",
]

SCHEMA_VERSION = 18

_TABLES = """
CREATE TABLE IF NOT EXISTS schema_metadata (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS games (
    game_id TEXT PRIMARY KEY, board_type TEXT NOT NULL, num_players INTEGER NOT NULL,
    rng_seed INTEGER, created_at TEXT NOT NULL, completed_at TEXT, game_status TEXT NOT NULL,
    winner INTEGER, termination_reason TEXT, total_moves INTEGER NOT NULL,
    total_turns INTEGER NOT NULL, duration_ms INTEGER, source TEXT,
    schema_version INTEGER NOT NULL, time_control_type TEXT DEFAULT 'none',
    initial_time_ms INTEGER, time_increment_ms INTEGER, metadata_json TEXT,
    quality_score REAL, quality_category TEXT, engine_mode TEXT, model_version TEXT,
    parity_status TEXT, parity_checked_at TEXT, parity_divergence_move INTEGER,
    excluded_from_training INTEGER DEFAULT 0
);
CREATE INDEX IF NOT EXISTS idx_games_board_type ON games(board_type);
CREATE INDEX IF NOT EXISTS idx_games_winner ON games(winner);
CREATE INDEX IF NOT EXISTS idx_games_created ON games(created_at);
CREATE INDEX IF NOT EXISTS idx_games_board_players ON games(board_type, num_players);
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
    engine_pv TEXT, engine_time_ms INTEGER, heuristic_features BLOB,
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
    board_summary_before_json TEXT, board_summary_after_json TEXT, state_before_json TEXT,
    state_after_json TEXT, compressed_states INTEGER DEFAULT 0, available_moves_json TEXT,
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
CREATE TABLE IF NOT EXISTS orphaned_games (
    game_id TEXT PRIMARY KEY, reason TEXT, detected_at TEXT, moves_found INTEGER
);
"""

# BEFORE UPDATE: a game may not become completed with fewer than 5 moves (the column).
TRIGGER_ON_COMPLETE = f"""
CREATE TRIGGER IF NOT EXISTS enforce_moves_on_complete BEFORE UPDATE ON games
WHEN NEW.game_status IN ('completed', 'finished') AND NEW.total_moves < {MIN_MOVES_REQUIRED}
BEGIN SELECT RAISE(ABORT, 'completed game needs at least {MIN_MOVES_REQUIRED} moves'); END;
"""
# AFTER INSERT: a completed insert aborts while fewer than 5 game_moves rows exist.
TRIGGER_ON_INSERT = f"""
CREATE TRIGGER IF NOT EXISTS enforce_moves_on_insert AFTER INSERT ON games
WHEN NEW.game_status IN ('completed', 'finished') AND
     (SELECT count(*) FROM game_moves WHERE game_id = NEW.game_id) < {MIN_MOVES_REQUIRED}
BEGIN SELECT RAISE(ABORT, 'completed game inserted with fewer than {MIN_MOVES_REQUIRED} moves'); END;
"""


def create_schema(conn: sqlite3.Connection, *, triggers: bool = True) -> None:
    """Create the v18 tables, indexes and (as a fresh RingRift DB has) both triggers.

    Runs in the caller's transaction when one is open; sets ``schema_version`` to 18.
    """
    for statement in _statements(_TABLES + (TRIGGER_ON_COMPLETE + TRIGGER_ON_INSERT if triggers else "")):
        conn.execute(statement)
    conn.execute("INSERT OR REPLACE INTO schema_metadata (key, value) VALUES ('schema_version', ?)",
                 (str(SCHEMA_VERSION),))


def _statements(script: str) -> list[str]:
    """Split a script of CREATE statements (triggers end with END;)."""
    out: list[str] = []
    current = ""
    for line in script.strip().splitlines():
        current += line + "\n"
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    return out


_OBJECT = re.compile(r"CREATE (TABLE|INDEX|TRIGGER) IF NOT EXISTS (\w+)(?: (?:BEFORE|AFTER) \w+)?"
                     r"(?: ON (\w+))?")


def _objects() -> list[tuple[str, str, str, str]]:
    """(kind, name, table, statement) of every object of the v18 schema."""
    out = []
    for statement in _statements(_TABLES + TRIGGER_ON_COMPLETE + TRIGGER_ON_INSERT):
        match = _OBJECT.match(statement)
        assert match is not None, statement
        kind, name, table = match.groups()
        out.append((kind.lower(), name, table or name, statement))
    return out


# Tables RingRift's schema has, and every name it uses (tables, indexes, triggers).
TABLES = frozenset(name for kind, name, _, _ in _objects() if kind == "table")
OBJECT_NAMES = frozenset(name for _, name, _, _ in _objects())


def table_statements(name: str) -> list[str]:
    """The CREATE statements of the v18 table ``name`` and its indexes ([] if RingRift
    has no such table): a missing table is always created in RingRift's shape."""
    return [statement for kind, _, table, statement in _objects()
            if kind != "trigger" and table.lower() == name.lower()]
