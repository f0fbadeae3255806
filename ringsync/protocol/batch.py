"""GameBatch: the msgpack wire format for a batch of completed games, with strict decoding."""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import msgpack
import xxhash

from ringsync.errors import BadInputError, TooLargeError, UnsafePathError

__all__ = [
    "BATCH_VERSION",
    "Column",
    "GameBatch",
    "TableRows",
    "config_key_for",
    "content_digest",
    "decode_batch",
    "encode_batch",
    "is_safe_decl_type",
    "is_safe_identifier",
    "validate_config_key",
]

BATCH_VERSION = 1
GAMES_TABLE = "games"
GAME_ID = "game_id"

_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_DECL_TYPE_RE = re.compile(r"[A-Za-z][A-Za-z0-9 ]{0,40}(\(\s*\d+\s*(,\s*\d+\s*)?\))?")
_CONFIG_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_VALUE_TYPES: frozenset[type] = frozenset({type(None), int, float, str, bytes, bool})
_MAX_TABLES = 64
_MAX_COLUMNS = 256


@dataclass(frozen=True, slots=True)
class Column:
    """One column as PRAGMA table_info describes it (pk = 1-based position in the PK, 0 = not)."""

    name: str
    decl_type: str
    pk: int
    notnull: bool


@dataclass(frozen=True, slots=True)
class TableRows:
    """The rows of one table that belong to the games of a batch."""

    name: str
    columns: tuple[Column, ...]
    rows: list[tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class GameBatch:
    """Completed games of one config, with their rows from every per-game table (games first)."""

    source_node: str
    config_key: str
    game_ids: tuple[str, ...]
    tables: tuple[TableRows, ...]


def is_safe_identifier(name: object) -> bool:
    """True for a table/column name we are willing to quote into SQL."""
    return (
        isinstance(name, str)
        and _IDENT_RE.fullmatch(name) is not None
        and not name.lower().startswith("sqlite_")
    )


def is_safe_decl_type(decl_type: object) -> bool:
    """True for a declared column type we are willing to put in a CREATE TABLE ('' = none)."""
    return isinstance(decl_type, str) and (
        decl_type == "" or _DECL_TYPE_RE.fullmatch(decl_type) is not None
    )


def content_digest(data: bytes) -> str:
    """The content hash used to verify a payload end to end."""
    return "xxh3-128:" + xxhash.xxh3_128_hexdigest(data)


def config_key_for(board_type: object, num_players: object) -> str:
    """The config key of a game, e.g. ('hex8', 2) -> 'hex8_2p'; always a safe file stem."""
    if board_type is None or num_players is None or isinstance(num_players, bool):
        return "unknown"
    board = re.sub(r"[^A-Za-z0-9_]+", "_", str(board_type)).strip("_")[:40]
    players = re.sub(r"[^0-9]+", "", str(num_players))[:4]
    if not board or not players:
        return "unknown"
    return f"{board}_{players}p"


def encode_batch(batch: GameBatch) -> bytes:
    """Serialise a batch to versioned msgpack; bytes values stay bytes."""
    doc = {
        "v": BATCH_VERSION,
        "source_node": batch.source_node,
        "config_key": batch.config_key,
        "game_ids": list(batch.game_ids),
        "tables": [_encode_table(t) for t in batch.tables],
    }
    out: bytes = msgpack.packb(doc, use_bin_type=True)
    return out


def _encode_table(table: TableRows) -> dict[str, Any]:
    columns = [[c.name, c.decl_type, c.pk, c.notnull] for c in table.columns]
    return {"name": table.name, "columns": columns, "rows": table.rows}


def decode_batch(data: bytes, *, max_games: int = 100_000) -> GameBatch:
    """Decode and validate a batch from an untrusted peer.

    Raises UnsafePathError for a config key that could escape the data dir,
    TooLargeError above ``max_games``, BadInputError for anything else malformed.
    """
    doc = _unpack(data)
    if doc.get("v") != BATCH_VERSION:
        raise BadInputError(
            f"unsupported batch version {doc.get('v')!r} (expected {BATCH_VERSION})")
    source_node = _field(doc, "source_node", str)
    config_key = validate_config_key(_field(doc, "config_key", str))
    game_ids = _check_game_ids(_field(doc, "game_ids", tuple), max_games)
    raw_tables = _field(doc, "tables", tuple)
    if not 1 <= len(raw_tables) <= _MAX_TABLES:
        raise BadInputError(f"batch must have 1..{_MAX_TABLES} tables, got {len(raw_tables)}")
    tables = tuple(_decode_table(t) for t in raw_tables)
    _check_tables(tables, game_ids)
    return GameBatch(source_node, config_key, game_ids, tables)


def _unpack(data: bytes) -> Mapping[str, Any]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BadInputError(f"batch payload must be bytes, got {type(data).__name__}")
    try:
        doc = msgpack.unpackb(data, raw=False, use_list=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many unrelated types for garbage input
        raise BadInputError(f"batch payload is not valid msgpack: {type(exc).__name__}") from exc
    if not isinstance(doc, dict):
        raise BadInputError(f"batch payload must be a map, got {type(doc).__name__}")
    return doc


def _field(doc: Mapping[str, Any], key: str, kind: type) -> Any:
    if key not in doc:
        raise BadInputError(f"batch field {key!r} is missing")
    value = doc[key]
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise BadInputError(
            f"batch field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def validate_config_key(key: object) -> str:
    """Return ``key`` if it is a safe file stem, else raise UnsafePathError."""
    if not isinstance(key, str) or _CONFIG_KEY_RE.fullmatch(key) is None or ".." in key:
        raise UnsafePathError(f"config_key {str(key)[:80]!r} is not a safe name")
    return key


def _check_game_ids(ids: tuple[Any, ...], max_games: int) -> tuple[str, ...]:
    if len(ids) > max_games:
        raise TooLargeError(f"batch has {len(ids)} games, limit is {max_games}")
    if not ids:
        raise BadInputError("batch has no game_ids")
    if not all(isinstance(i, str) and 0 < len(i) <= 256 for i in ids):
        raise BadInputError("game_ids must be non-empty strings of at most 256 characters")
    if len(set(ids)) != len(ids):
        raise BadInputError("game_ids contains duplicates")
    return ids


def _decode_table(raw: object) -> TableRows:
    if not isinstance(raw, dict):
        raise BadInputError(f"table entry must be a map, got {type(raw).__name__}")
    name = _field(raw, "name", str)
    if not is_safe_identifier(name):
        raise BadInputError(f"table name {name[:80]!r} is not a valid identifier")
    columns = _decode_columns(name, _field(raw, "columns", tuple))
    rows = _check_rows(name, _field(raw, "rows", tuple), len(columns))
    return TableRows(name, columns, rows)


def _decode_columns(table: str, raw: tuple[Any, ...]) -> tuple[Column, ...]:
    if not 1 <= len(raw) <= _MAX_COLUMNS:
        raise BadInputError(f"table {table}: must have 1..{_MAX_COLUMNS} columns, got {len(raw)}")
    columns = tuple(_decode_column(table, c, len(raw)) for c in raw)
    if len({c.name.lower() for c in columns}) != len(columns):
        raise BadInputError(f"table {table}: duplicate column names")
    return columns


def _decode_column(table: str, raw: object, ncols: int) -> Column:
    if not isinstance(raw, tuple) or len(raw) != 4:
        raise BadInputError(f"table {table}: a column must be [name, decl_type, pk, notnull]")
    name, decl_type, pk, notnull = raw
    if not is_safe_identifier(name):
        raise BadInputError(
            f"table {table}: column name {str(name)[:80]!r} is not a valid identifier")
    if not is_safe_decl_type(decl_type):
        raise BadInputError(
            f"table {table}.{name}: declared type {str(decl_type)[:80]!r} is not allowed")
    if not isinstance(pk, int) or isinstance(pk, bool) or not 0 <= pk <= ncols:
        raise BadInputError(f"table {table}.{name}: pk must be an int in 0..{ncols}")
    if not isinstance(notnull, bool):
        raise BadInputError(f"table {table}.{name}: notnull must be a bool")
    return Column(name, decl_type, pk, notnull)


def _check_rows(table: str, rows: tuple[Any, ...], ncols: int) -> list[tuple[Any, ...]]:
    if rows and (set(map(type, rows)) != {tuple} or set(map(len, rows)) != {ncols}):
        raise BadInputError(f"table {table}: every row must be an array of {ncols} values")
    # One C-level pass over all values; cheap enough for 100k-row batches.
    found = set(map(type, itertools.chain.from_iterable(rows)))
    if not found <= _VALUE_TYPES:
        bad = sorted(t.__name__ for t in found - _VALUE_TYPES)
        raise BadInputError(f"table {table}: values must be null/int/float/str/bytes, got {bad}")
    return list(rows)


def _check_tables(tables: tuple[TableRows, ...], game_ids: tuple[str, ...]) -> None:
    names = [t.name.lower() for t in tables]
    if len(set(names)) != len(names):
        raise BadInputError("batch contains duplicate tables")
    if names[0] != GAMES_TABLE:
        raise BadInputError("the first table of a batch must be 'games'")
    wanted = frozenset(game_ids)
    games_ids = _game_id_values(tables[0])
    unique = frozenset(games_ids)
    if len(unique) != len(games_ids) or unique != wanted:
        raise BadInputError("game_ids do not match the rows of the games table")
    for table in tables[1:]:
        if not frozenset(_game_id_values(table)) <= wanted:
            raise BadInputError(f"table {table.name}: rows reference games not in this batch")


def _game_id_values(table: TableRows) -> Sequence[Any]:
    index = next((i for i, c in enumerate(table.columns) if c.name == GAME_ID), None)
    if index is None:
        raise BadInputError(f"table {table.name} has no game_id column")
    return list(map(itemgetter(index), table.rows))
