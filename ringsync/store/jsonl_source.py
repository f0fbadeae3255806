"""JsonlSource: completed games from a RingRift JSONL game log, each shipped once.

A log is tailed: only whole lines are read (a partial last line waits), a file truncated
or replaced (RingRift's disk monitor rewrites ``games.jsonl`` with its last 500 lines)
is read again from the start, and every game is recognised by its id and by the hash of
its line, so a line seen again (in that rewrite, or in a ``.jsonl.gz`` archive of a file
already tailed) is never a new game. Reading a JSONL file with open() is safe: no SQLite
connection holds it, and no lock is ever taken on it.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import sqlite3
import threading
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from ringsync.protocol.batch import Column, GameBatch, TableSchema, build_batch
from ringsync.protocol.jsonl import (
    PREFIX_BYTES,
    JsonlGame,
    LineSplitter,
    Skip,
    TailState,
    line_hash,
    parse_game,
    resume_offset,
)
from ringsync.store._sqlite import stat_key
from ringsync.store.gamesource import SourceGame
from ringsync.store.ringrift_schema import SCHEMA_VERSION, create_schema

__all__ = ["MAX_LINE_BYTES", "JsonlIndex", "JsonlSource"]

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 16 * 1024 * 1024
_CHUNK = 1024 * 1024
_TABLES = ("games", "game_moves", "game_initial_state")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jsonl_files (
    key TEXT PRIMARY KEY, dev INTEGER NOT NULL, ino INTEGER NOT NULL, offset INTEGER NOT NULL,
    prefix_len INTEGER NOT NULL, prefix_hash TEXT NOT NULL, lines INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS jsonl_games (
    game_id TEXT PRIMARY KEY, line_hash TEXT NOT NULL, key TEXT NOT NULL,
    offset INTEGER NOT NULL, length INTEGER NOT NULL
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS jsonl_games_by_hash ON jsonl_games (line_hash);
CREATE INDEX IF NOT EXISTS jsonl_games_by_key ON jsonl_games (key, offset);
"""


@dataclass(frozen=True, slots=True)
class _Line:
    """Where a game's line is: (file key, byte offset in the decompressed stream, length)."""

    game_id: str
    line_hash: str
    key: str
    offset: int
    length: int


class JsonlIndex:
    """ringsync's durable record of JSONL logs: how far each was read, where each game's line is.

    Thread-safe (one connection, serialised), so sources may use it from worker threads.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self.columns = _v18_columns()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def state(self, key: str) -> TailState:
        with self._lock:
            row = self._db.execute("SELECT dev, ino, offset, prefix_len, prefix_hash, lines "
                                   "FROM jsonl_files WHERE key = ?", (key,)).fetchone()
        return TailState(*row) if row else TailState()

    def by_hash(self, digest: str) -> _Line | None:
        with self._lock:
            row = self._db.execute("SELECT game_id, line_hash, key, offset, length FROM jsonl_games "
                                   "WHERE line_hash = ?", (digest,)).fetchone()
        return _Line(*row) if row else None

    def has_game(self, game_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM jsonl_games WHERE game_id = ?",
                                    (game_id,)).fetchone() is not None

    def lines_of(self, key: str, game_ids: Sequence[str]) -> list[_Line]:
        out: list[_Line] = []
        with self._lock:
            for i in range(0, len(game_ids), 500):
                chunk = list(game_ids[i:i + 500])
                out += [_Line(*r) for r in self._db.execute(
                    "SELECT game_id, line_hash, key, offset, length FROM jsonl_games "
                    f"WHERE key = ? AND game_id IN ({','.join('?' * len(chunk))})", [key, *chunk])]
        return sorted(out, key=lambda line: line.offset)

    def save(self, key: str, state: TailState, lines: Sequence[_Line]) -> None:
        """Record the new read position and the lines found, in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR REPLACE INTO jsonl_games VALUES (?, ?, ?, ?, ?)",
                                     [(x.game_id, x.line_hash, x.key, x.offset, x.length)
                                      for x in lines])
                self._db.execute("INSERT OR REPLACE INTO jsonl_files VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 (key, state.dev, state.ino, state.offset, state.prefix_len,
                                  state.prefix_hash, state.lines))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")


class JsonlSource:
    """One JSONL game log; same calls as GameSource (scan, extract, changed, close), plus commit.

    ``scan()`` finds new games; ``commit()`` makes the read position durable and must be
    called after the games are recorded in the manifest (a crash in between re-reads them,
    and the manifest ignores games it knows).
    """

    def __init__(self, path: Path, key: str, index: JsonlIndex, *, node_id: str,
                 max_line: int = MAX_LINE_BYTES) -> None:
        self.path = Path(path)
        self.key = key
        self.skipped: Counter[str] = Counter()  # by reason, for the last scan
        self._index = index
        self._qualifier = f"{node_id}:{key.removesuffix('.gz')}"
        self._max_line = max_line
        self._gz = key.endswith(".gz")
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._pending: tuple[TailState, list[_Line]] | None = None

    def close(self) -> None:
        """Nothing is held open between calls."""

    def changed(self) -> bool:
        return stat_key(self.path) != self._stamp

    def scan(self) -> list[SourceGame]:
        """Games on whole lines not seen before (or seen before elsewhere: they moved)."""
        with self._lock:
            stamp = stat_key(self.path)
            self.skipped = Counter()
            try:
                found, state, lines = self._read()
            except FileNotFoundError:
                return []
            self._pending = (state, lines)
            self._stamp = stamp
            return found

    def commit(self) -> None:
        with self._lock:
            if self._pending is not None:
                self._index.save(self.key, *self._pending)
                self._pending = None

    def _read(self) -> tuple[list[SourceGame], TailState, list[_Line]]:
        with open(self.path, "rb") as raw:
            st = os.fstat(raw.fileno())
            prefix = raw.read(PREFIX_BYTES)
            state = self._index.state(self.key)
            start = resume_offset(state, st.st_dev, st.st_ino, st.st_size, prefix)
            found: list[SourceGame] = []
            lines: list[_Line] = []
            splitter = LineSplitter(start, self._max_line)
            seen_ids: set[str] = set()
            seen_hashes: set[str] = set()
            for offset, line in splitter.lines(self._chunks(raw, start)):
                self._take(offset, line, found, lines, seen_ids, seen_hashes)
        covered = st.st_size if self._gz else splitter.end
        prefix_len = min(len(prefix), covered)
        read = state.lines if start else 0
        new_state = TailState(st.st_dev, st.st_ino, splitter.end, prefix_len,
                              line_hash(prefix[:prefix_len]), read + len(lines))
        return found, new_state, lines

    def _take(self, offset: int, line: bytes | None, found: list[SourceGame], lines: list[_Line],
              seen_ids: set[str], seen_hashes: set[str]) -> None:
        if line is None:
            self.skipped[Skip.MALFORMED.value] += 1
            return
        game = parse_game(line, qualifier=self._qualifier)
        if isinstance(game, Skip):
            self.skipped[game.value] += 1
            return
        digest = line_hash(line)
        if digest in seen_hashes or game.game_id in seen_ids:
            self.skipped["duplicate"] += 1
            return
        known = self._index.by_hash(digest)
        if known is not None:
            if (known.key, known.offset) != (self.key, offset):  # the line moved: read it here
                seen_hashes.add(digest)
                seen_ids.add(known.game_id)
                lines.append(_Line(known.game_id, digest, self.key, offset, len(line)))
                found.append(SourceGame(known.game_id, game.config_key))
            return
        if self._index.has_game(game.game_id):  # same id, other content: the first one stands
            self.skipped["duplicate"] += 1
            return
        seen_hashes.add(digest)
        seen_ids.add(game.game_id)
        lines.append(_Line(game.game_id, digest, self.key, offset, len(line)))
        found.append(SourceGame(game.game_id, game.config_key))

    def _chunks(self, raw: IO[bytes], start: int) -> Iterator[bytes]:
        """The file's (decompressed) bytes from ``start``; a gzip still being written ends early."""
        raw.seek(0 if self._gz else start)
        stream: IO[bytes] | gzip.GzipFile = gzip.GzipFile(fileobj=raw, mode="rb") if self._gz else raw
        try:
            if self._gz:
                stream.seek(start)
            while chunk := stream.read(_CHUNK):
                yield chunk
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            log.debug("%s: compressed stream ends early (%s); reading what is whole", self.path, exc)

    # -- extraction ----------------------------------------------------------------------

    def extract(self, game_ids: Sequence[str], *, source_node: str) -> list[GameBatch]:
        """The games among ``game_ids`` whose lines are in this file, one batch per config."""
        wanted = self._index.lines_of(self.key, list(dict.fromkeys(game_ids)))
        if not wanted:
            return []
        groups: dict[str, list[tuple[JsonlGame, bytes]]] = {}
        with self._lock, open(self.path, "rb") as raw:
            for where, data in self._read_lines(raw, wanted):
                game = parse_game(data, qualifier=self._qualifier)
                if line_hash(data) != where.line_hash or isinstance(game, Skip):
                    continue  # rewritten since the scan: it stays queued until found again
                game = JsonlGame(where.game_id, game.config_key, game.record)
                groups.setdefault(game.config_key, []).append((game, data))
        return [self._batch(source_node, key, games) for key, games in groups.items()]

    def _read_lines(self, raw: IO[bytes], wanted: list[_Line]) -> Iterator[tuple[_Line, bytes]]:
        stream: IO[bytes] | gzip.GzipFile = gzip.GzipFile(fileobj=raw, mode="rb") if self._gz else raw
        try:
            for where in wanted:
                stream.seek(where.offset)
                yield where, stream.read(where.length)
        except (EOFError, gzip.BadGzipFile, zlib.error):
            return

    def _batch(self, source_node: str, config_key: str,
               games: list[tuple[JsonlGame, bytes]]) -> GameBatch:
        cols = self._index.columns
        rows: dict[str, list[tuple[Any, ...]]] = {t: [] for t in _TABLES}
        for game, line in games:
            for table, values in _game_rows(game, line, f"jsonl:{self.key}"):
                rows[table].append(tuple(values.get(c.name) for c in cols[table]))
        tables = [(TableSchema(t, cols[t]), rows[t]) for t in _TABLES if t == "games" or rows[t]]
        return build_batch(source_node, config_key, [g.game_id for g, _ in games], tables)


def _v18_columns() -> dict[str, tuple[Column, ...]]:
    """The columns RingRift's v18 schema gives the tables a JSONL game fills."""
    with closing(sqlite3.connect(":memory:")) as conn:
        create_schema(conn, triggers=False)
        return {t: tuple(Column(str(r[1]), str(r[2] or ""), int(r[5]), bool(r[3]))
                         for r in conn.execute(f'PRAGMA table_info("{t}")'))
                for t in _TABLES}


def _game_rows(game: JsonlGame, line: bytes, source: str) -> Iterator[tuple[str, dict[str, Any]]]:
    rec = game.record
    moves: list[Any] = rec["moves"]
    when = _text(rec.get("timestamp")) or datetime.now(UTC).isoformat(timespec="seconds")
    yield "games", {
        "game_id": game.game_id, "board_type": rec["board_type"], "num_players": rec["num_players"],
        "rng_seed": _int(rec.get("seed")), "created_at": when, "completed_at": when,
        "game_status": "completed", "winner": _scalar(rec.get("winner")),
        "termination_reason": _text(rec.get("termination_reason")),
        "total_moves": len(moves), "total_turns": len(moves),
        "duration_ms": _int(rec.get("duration_ms")), "source": source,
        "schema_version": SCHEMA_VERSION, "time_control_type": "none",
        "metadata_json": line.decode("utf-8", errors="replace"), "excluded_from_training": 0,
    }
    for n, move in enumerate(moves):
        m = move if isinstance(move, dict) else {}
        yield "game_moves", {
            "game_id": game.game_id, "move_number": n,
            "turn_number": _int(m.get("turnNumber", m.get("turn_number"))) or n,
            "player": _int(m.get("player")) or 0, "phase": _text(m.get("phase")) or "",
            "move_type": _text(m.get("type", m.get("moveType", m.get("move_type")))) or "",
            "move_json": json.dumps(move, separators=(",", ":")),
        }
    if rec.get("initial_state") is not None:
        yield "game_initial_state", {
            "game_id": game.game_id, "compressed": 0,
            "initial_state_json": json.dumps(rec["initial_state"], separators=(",", ":")),
        }


_INT64 = range(-(2**63), 2**63)  # SQLite's integers; a bigger JSON number cannot be bound


def _int(value: object) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value in _INT64
    return value if ok else None  # type: ignore[return-value]


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _scalar(value: object) -> object:
    if isinstance(value, int) and not isinstance(value, bool) and value not in _INT64:
        return str(value)
    if value is None or isinstance(value, int | float | str):
        return value
    return json.dumps(value)
