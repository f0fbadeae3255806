"""Tests for the GameBatch wire format: round trips and strict rejection of malformed headers.

The image inside a batch is verified by the merge; those cases live in test_gamedb.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringsync.errors import BadInputError, TooLargeError, UnsafePathError
from ringsync.protocol.batch import (
    Column,
    GameBatch,
    TableSchema,
    batch_rows,
    build_batch,
    config_key_for,
    content_digest,
    decode_batch,
    encode_batch,
    image_table_sql,
    is_safe_decl_type,
)

GAMES_COLS = (
    Column("game_id", "TEXT", 1, True),
    Column("board_type", "TEXT", 0, True),
    Column("num_players", "INTEGER", 0, True),
    Column("quality_score", "REAL", 0, False),
)
MOVES_COLS = (
    Column("game_id", "TEXT", 1, True),
    Column("move_number", "INTEGER", 2, True),
    Column("move_json", "VARCHAR(255)", 0, True),
    Column("features", "BLOB", 0, False),
)


def make_batch(ids: tuple[str, ...] = ("g1", "g2")) -> GameBatch:
    games = [(g, "hex8", 2, 0.5) for g in ids]
    moves = [(g, m, '{"x": 1}', bytes(range(256)) if m else None) for g in ids for m in range(3)]
    return build_batch("node-a", "hex8_2p", ids, [(TableSchema("games", GAMES_COLS), games),
                                                  (TableSchema("game_moves", MOVES_COLS), moves)])


def valid_doc() -> dict[str, Any]:
    doc: dict[str, Any] = msgpack.unpackb(encode_batch(make_batch()), raw=False)
    return doc


def test_round_trip_keeps_everything_including_blobs_and_nulls() -> None:
    batch = make_batch()
    decoded = decode_batch(encode_batch(batch))
    assert decoded == batch
    assert decoded.tables == (TableSchema("games", GAMES_COLS),
                              TableSchema("game_moves", MOVES_COLS))
    moves = batch_rows(decoded, "game_moves")
    assert len(moves) == 6
    assert moves[0] == ("g1", 0, '{"x": 1}', None)
    assert moves[1] == ("g1", 1, '{"x": 1}', bytes(range(256)))
    assert batch_rows(decoded, "games") == [("g1", "hex8", 2, 0.5), ("g2", "hex8", 2, 0.5)]


def test_encoding_is_versioned_and_carries_no_rows_in_the_header() -> None:
    doc = valid_doc()
    assert doc["v"] == 2
    assert set(doc) == {"v", "source_node", "config_key", "game_ids", "tables", "image"}
    assert all(set(t) == {"name", "columns"} for t in doc["tables"])
    assert doc["image"].startswith(b"SQLite format 3\x00")


def test_image_tables_carry_types_but_no_constraints() -> None:
    sql = image_table_sql(TableSchema("game_moves", MOVES_COLS))
    assert sql == ('CREATE TABLE "game_moves" ("game_id" TEXT, "move_number" INTEGER, '
                   '"move_json" VARCHAR(255), "features" BLOB)')
    assert image_table_sql(TableSchema("t", (Column("a", "", 1, True),)), "out") == \
        'CREATE TABLE "out"."t" ("a")'


values = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.binary(max_size=40),
)


@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=5, unique=True),
    extra=st.lists(st.tuples(values, values), max_size=6),
)
def test_round_trip_property(ids: list[str], extra: list[tuple[Any, Any]]) -> None:
    # Columns without affinity: SQLite must hand back exactly the values that went in.
    cols = (Column("game_id", "TEXT", 1, True), Column("a", "", 0, False),
            Column("b", "BLOB", 0, False))
    games = [(g, *extra[0]) if extra else (g, None, None) for g in ids]
    child = [(ids[i % len(ids)], a, b) for i, (a, b) in enumerate(extra)]
    batch = build_batch("n", "cfg", ids, [(TableSchema("games", cols), games),
                                          (TableSchema("game_x", cols), child)])
    decoded = decode_batch(encode_batch(batch))
    assert decoded == batch
    assert batch_rows(decoded, "games") == games
    assert batch_rows(decoded, "game_x") == child


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        target: Any = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


def _delete(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc.pop(key) and None


MALFORMED: dict[str, Callable[[dict[str, Any]], None]] = {
    "wrong version": _set(("v",), 1),
    "no version": _delete("v"),
    "missing game_ids": _delete("game_ids"),
    "missing tables": _delete("tables"),
    "source_node not str": _set(("source_node",), 5),
    "game_ids not list": _set(("game_ids",), "g1"),
    "empty game_ids": _set(("game_ids",), []),
    "duplicate game_ids": _set(("game_ids",), ["g1", "g1"]),
    "game_ids not strings": _set(("game_ids",), ["g1", 2]),
    "no tables": _set(("tables",), []),
    "table not a map": _set(("tables", 1), [1, 2]),
    "bad table name": _set(("tables", 1, "name"), "moves; DROP TABLE games"),
    "sqlite_ table name": _set(("tables", 1, "name"), "sqlite_master"),
    "long table name": _set(("tables", 1, "name"), "t" * 65),
    "bad column name": _set(("tables", 1, "columns", 2, 0), 'x" TEXT, "y'),
    "column not 4 fields": _set(("tables", 1, "columns", 2), ["a", "TEXT", 0]),
    "bad decl_type": _set(("tables", 1, "columns", 2, 1), "TEXT DEFAULT (x)"),
    "pk not int": _set(("tables", 1, "columns", 2, 2), "1"),
    "pk out of range": _set(("tables", 1, "columns", 2, 2), 99),
    "notnull not bool": _set(("tables", 1, "columns", 2, 3), 1),
    "duplicate column": _set(("tables", 1, "columns", 3, 0), "move_json"),
    "columns not list": _set(("tables", 1, "columns"), "game_id"),
    "no columns": _set(("tables", 1, "columns"), []),
    "games not first": lambda d: d["tables"].reverse(),
    "duplicate tables": lambda d: d["tables"].append(d["tables"][1]),
    "games without game_id": _set(("tables", 0, "columns", 0, 0), "gid"),
    "child without game_id": _set(("tables", 1, "columns", 0, 0), "gid"),
    "missing image": _delete("image"),
    "image not bytes": _set(("image",), "SQLite format 3"),
    "image not sqlite": _set(("image",), b"\0" * 4096),
    "empty image": _set(("image",), b""),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_batch_is_rejected(name: str) -> None:
    doc = valid_doc()
    MALFORMED[name](doc)
    with pytest.raises(BadInputError):
        decode_batch(msgpack.packb(doc, use_bin_type=True))


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"not msgpack at all", b"\x93\x01",
                                     msgpack.packb([1, 2]), encode_batch(make_batch())[:-5],
                                     msgpack.packb({"v": 1, "x": msgpack.ExtType(1, b"x")})])
def test_garbage_is_rejected(payload: bytes) -> None:
    with pytest.raises(BadInputError):
        decode_batch(payload)


@pytest.mark.parametrize("key", ["../x", "a/b", "..", "/etc", "a..b", "", ".hidden", "x" * 65,
                                 "a\\b", "con\x00"])
def test_path_escaping_config_key_is_unsafe(key: str) -> None:
    doc = valid_doc()
    doc["config_key"] = key
    with pytest.raises(UnsafePathError):
        decode_batch(msgpack.packb(doc, use_bin_type=True))


def test_too_many_games() -> None:
    with pytest.raises(TooLargeError):
        decode_batch(encode_batch(make_batch(("a", "b", "c"))), max_games=2)


def test_image_too_large() -> None:
    payload = encode_batch(make_batch())
    size = len(make_batch().image)
    assert decode_batch(payload, max_image_bytes=size).image == make_batch().image
    with pytest.raises(TooLargeError):
        decode_batch(payload, max_image_bytes=size - 1)


def test_content_digest_format() -> None:
    digest = content_digest(b"abc")
    assert re.fullmatch(r"xxh3-128:[0-9a-f]{32}", digest)
    assert digest != content_digest(b"abd")


@pytest.mark.parametrize(("board", "players", "expected"), [
    ("hex8", 2, "hex8_2p"),
    ("square19", 4, "square19_4p"),
    (None, 2, "unknown"),
    ("hex8", None, "unknown"),
    ("", 3, "unknown"),
    ("../../etc", 2, "etc_2p"),
    ("a/b..c", "3", "a_b_c_3p"),
])
def test_config_key_for(board: object, players: object, expected: str) -> None:
    assert config_key_for(board, players) == expected


@settings(max_examples=100, deadline=None)
@given(board=st.one_of(st.none(), st.text(), st.integers()),
       players=st.one_of(st.none(), st.integers(), st.text()))
def test_config_key_for_is_always_safe(board: object, players: object) -> None:
    key = config_key_for(board, players)
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", key)
    assert ".." not in key


@pytest.mark.parametrize("decl_type", ["TEXT UNIQUE", "TEXT DEFAULT 5", "INTEGER PRIMARY KEY",
                                       "TEXT COLLATE NOCASE", "INTEGER REFERENCES games",
                                       "TEXT NOT NULL", "BLOB CHECK"])
def test_decl_types_carrying_constraints_are_refused(decl_type: str) -> None:
    assert not is_safe_decl_type(decl_type)


@pytest.mark.parametrize("decl_type", ["", "TEXT", "integer", "VARCHAR(255)", "DECIMAL(10, 2)",
                                       "DOUBLE PRECISION", "BIG INT", "TIMESTAMP"])
def test_plain_decl_types_are_accepted(decl_type: str) -> None:
    assert is_safe_decl_type(decl_type)
