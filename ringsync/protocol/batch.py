"""GameBatch: the wire format for a batch of completed games (msgpack header + SQLite image)."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import msgpack
import xxhash

from ringsync.errors import BadInputError, TooLargeError, UnsafePathError

__all__ = [
    "BATCH_VERSION",
    "MAX_IMAGE_BYTES",
    "Column",
    "GameBatch",
    "TableSchema",
    "batch_rows",
    "build_batch",
    "config_key_for",
    "content_digest",
    "decode_batch",
    "encode_batch",
    "image_table_sql",
    "is_safe_decl_type",
    "is_safe_identifier",
    "validate_config_key",
    "validate_source_node",
]

BATCH_VERSION = 2
MAX_IMAGE_BYTES = 512 * 1024 * 1024
GAMES_TABLE = "games"
GAME_ID = "game_id"

_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_DECL_TYPE_RE = re.compile(r"(?P<words>[A-Za-z][A-Za-z0-9 ]{0,40}?)\s*(\(\s*\d+\s*(,\s*\d+\s*)?\))?")
# Words that name a type. Anything else (UNIQUE, DEFAULT, REFERENCES, COLLATE, ...) would
# put a constraint from a peer into our CREATE TABLE; such a column is sent untyped instead.
_TYPE_WORDS = frozenset({
    "INT", "INTEGER", "TINYINT", "SMALLINT", "MEDIUMINT", "BIGINT", "UNSIGNED", "INT2", "INT8",
    "CHARACTER", "VARCHAR", "VARYING", "NCHAR", "NATIVE", "NVARCHAR", "CHAR", "TEXT", "CLOB",
    "BLOB", "REAL", "DOUBLE", "PRECISION", "FLOAT", "NUMERIC", "DECIMAL", "BOOLEAN", "BOOL",
    "DATE", "DATETIME", "TIMESTAMP", "TIME", "JSON", "UUID", "BIG", "STRING",
})
_CONFIG_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SQLITE_MAGIC = b"SQLite format 3\x00"
MAX_NODE_ID_CHARS = 253  # a DNS name's limit: inventory host names are host names
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
class TableSchema:
    """One per-game table of a batch: its name and the columns of the source table."""

    name: str
    columns: tuple[Column, ...]


@dataclass(frozen=True, slots=True)
class GameBatch:
    """Completed games of one config: the table schemas (games first) and a SQLite image.

    ``image`` is a serialized SQLite database holding exactly ``tables``, each created by
    ``image_table_sql`` (columns and declared types only: no keys, constraints or indexes),
    with the rows of ``game_ids`` only. The receiver verifies all of that before reading it.
    """

    source_node: str
    config_key: str
    game_ids: tuple[str, ...]
    tables: tuple[TableSchema, ...]
    image: bytes = field(repr=False)


def is_safe_identifier(name: object) -> bool:
    """True for a table/column name we are willing to quote into SQL."""
    return (
        isinstance(name, str)
        and _IDENT_RE.fullmatch(name) is not None
        and not name.lower().startswith("sqlite_")
    )


def is_safe_decl_type(decl_type: object) -> bool:
    """True for a declared column type we are willing to put in a CREATE TABLE ('' = none)."""
    if not isinstance(decl_type, str):
        return False
    if decl_type == "":
        return True
    match = _DECL_TYPE_RE.fullmatch(decl_type)
    return match is not None and all(w.upper() in _TYPE_WORDS for w in match["words"].split())


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


# -- the image -----------------------------------------------------------------------------


def image_table_sql(table: TableSchema, schema: str | None = None) -> str:
    """The CREATE TABLE of ``table`` inside a batch image (names must be safe identifiers).

    Without ``schema`` this is exactly the text SQLite keeps in sqlite_master, which is
    how a receiver checks that an image holds nothing but what the header declares.
    """
    prefix = f'"{schema}".' if schema else ""
    defs = ", ".join(f'"{c.name}" {c.decl_type}'.rstrip() for c in table.columns)
    return f'CREATE TABLE {prefix}"{table.name}" ({defs})'


def build_batch(source_node: str, config_key: str, game_ids: Sequence[str],
                tables: Sequence[tuple[TableSchema, Iterable[Sequence[Any]]]]) -> GameBatch:
    """A batch from rows held in Python (tests and tools; the sender copies inside SQLite)."""
    with closing(sqlite3.connect(":memory:")) as conn:
        for schema, rows in tables:
            conn.execute(image_table_sql(schema))
            conn.executemany(f'INSERT INTO "{schema.name}" VALUES '
                             f'({",".join("?" * len(schema.columns))})', rows)
        conn.commit()
        image = conn.serialize()
    return GameBatch(source_node, config_key, tuple(game_ids),
                     tuple(schema for schema, _ in tables), image)


def batch_rows(batch: GameBatch, table: str) -> list[tuple[Any, ...]]:
    """The rows of ``table`` in the image of ``batch``, in header column order."""
    schema = next((t for t in batch.tables if t.name == table), None)
    if schema is None:
        raise KeyError(f"batch has no table {table!r}")
    cols = ", ".join(f'"{c.name}"' for c in schema.columns)
    with closing(sqlite3.connect(":memory:")) as conn:
        conn.deserialize(batch.image)
        return conn.execute(f'SELECT {cols} FROM "{table}" ORDER BY rowid').fetchall()


# -- encoding ------------------------------------------------------------------------------


def encode_batch(batch: GameBatch) -> bytes:
    """Serialise a batch: a versioned msgpack map whose ``image`` is the SQLite image."""
    doc = {
        "v": BATCH_VERSION,
        "source_node": batch.source_node,
        "config_key": batch.config_key,
        "game_ids": list(batch.game_ids),
        "tables": [{"name": t.name, "columns": [[c.name, c.decl_type, c.pk, c.notnull]
                                                for c in t.columns]}
                   for t in batch.tables],
        "image": batch.image,
    }
    out: bytes = msgpack.packb(doc, use_bin_type=True)
    return out


def decode_batch(data: bytes, *, max_games: int = 100_000,
                 max_image_bytes: int = MAX_IMAGE_BYTES) -> GameBatch:
    """Decode and validate the header of a batch from an untrusted peer.

    Raises UnsafePathError for a config key that could escape the data dir,
    TooLargeError above ``max_games`` or ``max_image_bytes``, BadInputError for anything
    else malformed. The image itself is verified by the merge, inside SQLite.
    """
    doc = _unpack(data)
    if doc.get("v") != BATCH_VERSION:
        raise BadInputError(
            f"unsupported batch version {doc.get('v')!r} (expected {BATCH_VERSION})")
    source_node = validate_source_node(_field(doc, "source_node", str))
    config_key = validate_config_key(_field(doc, "config_key", str))
    game_ids = _check_game_ids(_field(doc, "game_ids", tuple), max_games)
    raw_tables = _field(doc, "tables", tuple)
    if not 1 <= len(raw_tables) <= _MAX_TABLES:
        raise BadInputError(f"batch must have 1..{_MAX_TABLES} tables, got {len(raw_tables)}")
    tables = tuple(_decode_table(t) for t in raw_tables)
    _check_tables(tables)
    image = _check_image(_field(doc, "image", bytes), max_image_bytes)
    return GameBatch(source_node, config_key, game_ids, tables, image)


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


def validate_source_node(name: object) -> str:
    """Return ``name`` if it can be a node id, else raise BadInputError.

    A node id names a directory (no '/', no leading '.') and appears in logs and answers:
    printable, one line, at most MAX_NODE_ID_CHARS characters. The error quotes only a
    bounded prefix of the bad value.
    """
    if (isinstance(name, str) and 0 < len(name) <= MAX_NODE_ID_CHARS and name.isprintable()
            and "/" not in name and not name.startswith(".")):
        return name
    shown = str(name)
    more = f"…(+{len(shown) - 40} chars)" if len(shown) > 40 else ""
    raise BadInputError(
        f"source_node {shown[:40]!r}{more} is not a node id: use 1..{MAX_NODE_ID_CHARS} "
        "printable characters without '/' and not starting with '.' (the sender's RINGRIFT_NODE_ID)")


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


def _decode_table(raw: object) -> TableSchema:
    if not isinstance(raw, dict):
        raise BadInputError(f"table entry must be a map, got {type(raw).__name__}")
    name = _field(raw, "name", str)
    if not is_safe_identifier(name):
        raise BadInputError(f"table name {name[:80]!r} is not a valid identifier")
    return TableSchema(name, _decode_columns(name, _field(raw, "columns", tuple)))


def _decode_columns(table: str, raw: tuple[Any, ...]) -> tuple[Column, ...]:
    if not 1 <= len(raw) <= _MAX_COLUMNS:
        raise BadInputError(f"table {table}: must have 1..{_MAX_COLUMNS} columns, got {len(raw)}")
    columns = tuple(_decode_column(table, c, len(raw)) for c in raw)
    if len({c.name.lower() for c in columns}) != len(columns):
        raise BadInputError(f"table {table}: duplicate column names")
    if not any(c.name == GAME_ID for c in columns):
        raise BadInputError(f"table {table} has no game_id column")
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


def _check_tables(tables: tuple[TableSchema, ...]) -> None:
    names = [t.name.lower() for t in tables]
    if len(set(names)) != len(names):
        raise BadInputError("batch contains duplicate tables")
    if names[0] != GAMES_TABLE:
        raise BadInputError("the first table of a batch must be 'games'")


def _check_image(image: bytes, max_bytes: int) -> bytes:
    if len(image) > max_bytes:
        raise TooLargeError(f"batch image has {len(image)} bytes, limit is {max_bytes}")
    if not image.startswith(_SQLITE_MAGIC):
        raise BadInputError("batch image is not an SQLite database")
    return image
