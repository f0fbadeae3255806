"""GameBatch: the wire format for a batch of completed games (msgpack header + SQLite image)."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
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
# The shape of a batch document, enforced while it is read (see _Reader).
_MAX_HEADER_FIELDS = 16
_MAX_TABLE_FIELDS = 8
_MAX_COLUMN_FIELDS = 8
_MAX_STR_BYTES = 4096
_READ_SIZE = 1024 * 1024  # longer than any id, name or declared type the format allows
_SCALAR_FIELDS = frozenset({"v", "source_node", "config_key"})
_KINDS: dict[int, str] = {
    **{b: "map" for b in (*range(0x80, 0x90), 0xDE, 0xDF)},
    **{b: "array" for b in (*range(0x90, 0xA0), 0xDC, 0xDD)},
    **{b: "ext" for b in (0xC7, 0xC8, 0xC9, *range(0xD4, 0xD9))},
}
_NAMES = {"map": "a map", "array": "an array", "ext": "an extension type", "scalar": "a scalar"}
_BIN_LENGTH_WIDTH = {0xC4: 1, 0xC5: 2, 0xC6: 4}


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
    doc = _unpack(data, max_games, max_image_bytes)
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


def _unpack(data: bytes, max_games: int, max_image_bytes: int) -> Mapping[str, Any]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BadInputError(f"batch payload must be bytes, got {type(data).__name__}")
    reader = _Reader(data, max_games=max_games, max_image_bytes=max_image_bytes)
    doc: dict[str, Any] = {}
    for _ in range(reader.map_header("batch payload", _MAX_HEADER_FIELDS)):
        key = reader.key("batch")
        if key in doc:
            raise BadInputError(f"batch field {key!r} appears twice")
        doc[key] = _read_field(reader, key, max_games)
        if key == "v" and doc[key] != BATCH_VERSION:
            # Checked at once: a later version may lay out the other fields differently.
            raise BadInputError(f"unsupported batch version {doc[key]!r} (expected {BATCH_VERSION})")
    reader.end()
    return doc


def _read_field(reader: _Reader, key: str, max_games: int) -> Any:
    if key == "game_ids":
        count = reader.array_header("batch field 'game_ids'", max_games, TooLargeError)
        return tuple(reader.scalar("a game id") for _ in range(count))
    if key == "tables":
        count = reader.array_header("batch field 'tables'", _MAX_TABLES)
        return tuple(_read_table(reader) for _ in range(count))
    if key == "image":
        return reader.binary("batch image")
    if key in _SCALAR_FIELDS:
        return reader.scalar(f"batch field {key!r}")
    reader.skip(f"batch field {key[:80]!r}")  # a field of a newer sender; never built
    return None


def _read_table(reader: _Reader) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for _ in range(reader.map_header("a table entry", _MAX_TABLE_FIELDS)):
        key = reader.key("table entry")
        if key == "columns":
            count = reader.array_header("a table's columns", _MAX_COLUMNS)
            table[key] = tuple(_read_column(reader) for _ in range(count))
        elif key == "name":
            table[key] = reader.scalar("a table name")
        else:
            reader.skip(f"table field {key[:80]!r}")
    return table


def _read_column(reader: _Reader) -> tuple[Any, ...]:
    count = reader.array_header("a column", _MAX_COLUMN_FIELDS)
    return tuple(reader.scalar("a column field") for _ in range(count))


class _Window:
    """A read-only file over a buffer, for msgpack.Unpacker (which copies what it reads)."""

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self._pos = 0

    def read(self, size: int) -> bytes:
        chunk = bytes(self._data[self._pos:self._pos + size])
        self._pos += len(chunk)
        return chunk


class _Reader:
    """Reads the batch document value by value, checking each one's kind from its first
    byte before msgpack builds it.

    ``msgpack.unpackb`` builds the whole document first: a 64 MiB array of empty maps is
    64 million dicts (5 GB, seconds with the GIL held) before any type is checked. Here
    only what the format allows is ever built: a map of a few fields, at most
    ``max_games`` short ids, 64 tables of 256 columns of 4 scalars, one bin image.
    Anything else is refused at its first byte or skipped without being built.
    """

    def __init__(self, data: bytes | bytearray | memoryview, *, max_games: int,
                 max_image_bytes: int) -> None:
        self._data = memoryview(data).cast("B")
        self._max_image_bytes = max_image_bytes
        self._at_end = False  # the image was taken from the end of the payload
        # Read through a window, not fed whole: feed() copies the entire payload before
        # the first byte is looked at.
        self._unpacker = msgpack.Unpacker(
            _Window(self._data), read_size=_READ_SIZE, raw=False, use_list=False, strict_map_key=True,
            max_buffer_size=max(len(self._data), _READ_SIZE), max_str_len=_MAX_STR_BYTES,
            max_bin_len=max_image_bytes, max_ext_len=0,
            max_array_len=max(max_games, _MAX_TABLES, _MAX_COLUMNS),
            max_map_len=max(_MAX_HEADER_FIELDS, _MAX_TABLE_FIELDS),
        )

    def _kind(self) -> str:
        at = self._offset()
        if at >= len(self._data):
            raise BadInputError("batch payload is truncated")
        return _KINDS.get(self._data[at], "scalar")

    def _expect(self, what: str, kind: str) -> None:
        found = self._kind()
        if found != kind:
            raise BadInputError(f"{what} must be {_NAMES[kind]}, got {_NAMES[found]}")

    def _call(self, what: str, read: Callable[[], Any]) -> Any:
        try:
            return read()
        except Exception as exc:  # msgpack raises many unrelated types for garbage input
            raise BadInputError(f"{what} is not valid msgpack "
                                f"({type(exc).__name__}: {str(exc)[:80]})") from None

    def map_header(self, what: str, limit: int) -> int:
        self._expect(what, "map")
        count: int = self._call(what, self._unpacker.read_map_header)
        if count > limit:
            raise BadInputError(f"{what} has {count} fields, limit is {limit}")
        return count

    def array_header(self, what: str, limit: int,
                     error: type[BadInputError] = BadInputError) -> int:
        self._expect(what, "array")
        count: int = self._call(what, self._unpacker.read_array_header)
        if count > limit:
            raise error(f"{what} has {count} entries, limit is {limit}")
        return count

    def scalar(self, what: str) -> Any:
        self._expect(what, "scalar")
        return self._call(what, self._unpacker.unpack)

    def key(self, where: str) -> str:
        key = self.scalar(f"a {where} field name")
        if not isinstance(key, str):
            raise BadInputError(f"{where} field names must be strings, got {type(key).__name__}")
        return key

    def binary(self, what: str) -> Any:
        span = self._bin_span()
        if span is None:
            return self.scalar(what)  # not a bin: refused by the caller's type check
        start, size = span
        if size > self._max_image_bytes:
            raise TooLargeError(f"{what} has {size} bytes, limit is {self._max_image_bytes}")
        if start + size != len(self._data):
            return self.scalar(what)
        # The image ends the payload (encode_batch writes it last): copied straight out
        # of it, not through the unpacker's buffer, which would hold the image twice.
        self._at_end = True
        return bytes(self._data[start:])

    def _bin_span(self) -> tuple[int, int] | None:
        """(start, size) of the bin value that comes next, None if the next is no bin."""
        at = self._offset()
        width = _BIN_LENGTH_WIDTH.get(self._data[at]) if at < len(self._data) else None
        if width is None or at + 1 + width > len(self._data):
            return None
        return at + 1 + width, int.from_bytes(self._data[at + 1:at + 1 + width], "big")

    def _offset(self) -> int:
        return len(self._data) if self._at_end else int(self._unpacker.tell())

    def skip(self, what: str) -> None:
        self._call(what, self._unpacker.skip)

    def end(self) -> None:
        extra = len(self._data) - self._offset()
        if extra:
            raise BadInputError(f"batch payload has {extra} bytes after its end")


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
