"""RingRift's JSONL game logs: which lines are shippable games, and where a tail resumes (no I/O)."""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import xxhash

from ringsync.protocol.batch import config_key_for
from ringsync.protocol.ringrift import COMPLETED_STATUSES, MIN_MOVES_REQUIRED

__all__ = ["PREFIX_BYTES", "JsonlGame", "LineSplitter", "Skip", "TailState",
           "line_hash", "parse_game", "resume_offset"]

PREFIX_BYTES = 4096
_MAX_ID = 256


class Skip(enum.Enum):
    """Why a complete line is not shipped."""

    MALFORMED = "malformed"
    INCOMPLETE = "incomplete"
    TOO_SHORT = "too_short"


@dataclass(frozen=True, slots=True)
class JsonlGame:
    """A completed game from one line; ``record`` is the parsed line."""

    game_id: str
    config_key: str
    record: dict[str, Any]


_MAX_PLAYERS = 64


def line_hash(line: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(line)


def parse_game(line: bytes, *, qualifier: str) -> JsonlGame | Skip:
    """The game on ``line``, or why it is skipped.

    Completed means status completed/finished, a winner, not ``victory_type`` in_progress
    (GPU selfplay writes "completed" for unfinished games) and not a skipped soak attempt.
    Ids: a uuid (Gumbel: the same id as its DB row) is kept; anything else (GPU ``gpu_*``
    ids repeat across nodes and runs, soak lines have only an index) is qualified by
    ``qualifier`` (node and file).
    """
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: [[[[…
        return Skip.MALFORMED
    if not isinstance(record, dict):
        return Skip.MALFORMED
    board, players, moves = record.get("board_type"), record.get("num_players"), record.get("moves")
    if not isinstance(board, str) or not isinstance(players, int) or isinstance(players, bool):
        return Skip.MALFORMED
    if not 1 <= players <= _MAX_PLAYERS:
        return Skip.MALFORMED
    if not _completed(record):
        return Skip.INCOMPLETE
    if not isinstance(moves, list) or len(moves) < MIN_MOVES_REQUIRED:  # RingRift's trigger would refuse it
        return Skip.TOO_SHORT
    return JsonlGame(_game_id(record, line, qualifier), config_key_for(board, players), record)


def _completed(record: dict[str, Any]) -> bool:
    return (str(record.get("status", "")).lower() in COMPLETED_STATUSES
            and record.get("winner") is not None
            and record.get("victory_type") != "in_progress"
            and not record.get("skipped"))


def _game_id(record: dict[str, Any], line: bytes, qualifier: str) -> str:
    for name in ("game_id", "db_game_id"):
        value = record.get(name)
        if isinstance(value, str) and value:
            if _is_uuid(value):
                return value
            return _qualified(qualifier, value)
    index = record.get("index")
    if isinstance(index, int) and not isinstance(index, bool):
        # A soak run rewrites its log (mode "w") and counts from 0 again: the index alone
        # would make a new run's games look like the old run's. The line's hash stays the
        # same when the line moves (the last-500-lines rewrite, a .gz archive).
        return _qualified(qualifier, f"#{index}:h{xxhash.xxh3_64_hexdigest(line)}")
    return _qualified(qualifier, "h" + xxhash.xxh3_64_hexdigest(line))


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _qualified(qualifier: str, local_id: str) -> str:
    out = f"{qualifier}:{local_id}"
    if len(out) > _MAX_ID:
        out = f"{xxhash.xxh3_128_hexdigest(qualifier.encode())}:{local_id}"[:_MAX_ID]
    return out


# -- tailing -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TailState:
    """How far a file was read: its identity, the offset after the last whole line, and a
    hash of its first ``prefix_len`` raw bytes (to see a file rewritten in place)."""

    dev: int = 0
    ino: int = 0
    offset: int = 0
    prefix_len: int = 0
    prefix_hash: str = ""
    lines: int = 0


def resume_offset(state: TailState, dev: int, ino: int, size: int, prefix: bytes) -> int:
    """Where to resume reading: ``state.offset``, or 0 when the file was truncated or replaced.

    ``prefix`` is the file's first PREFIX_BYTES raw bytes now; ``size`` its raw size.
    """
    if (dev, ino) != (state.dev, state.ino) or size < state.prefix_len:
        return 0
    if line_hash(prefix[:state.prefix_len]) != state.prefix_hash:
        return 0
    return state.offset


class LineSplitter:
    """Whole lines from a stream of chunks; a partial last line waits, bounded in memory.

    Yields ``(offset, line)`` without the newline; ``line`` is None for a line longer than
    ``max_line`` (skipped without holding it). ``end`` is the offset after the last whole line.
    """

    def __init__(self, start: int, max_line: int) -> None:
        self.end = start
        self._max = max_line

    def lines(self, chunks: Iterable[bytes]) -> Iterator[tuple[int, bytes | None]]:
        buf = bytearray()
        start = self.end  # offset of the line in buf
        dropped = 0  # bytes of an over-long line already thrown away
        for chunk in chunks:
            buf += chunk
            while (nl := buf.find(b"\n")) >= 0:
                yield start, (None if dropped else bytes(buf[:nl]))
                start += dropped + nl + 1
                del buf[:nl + 1]
                dropped = 0
                self.end = start
            if len(buf) > self._max:
                dropped += len(buf)
                buf.clear()
