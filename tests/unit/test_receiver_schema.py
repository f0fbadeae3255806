"""The receiver's schema and messages under batches a peer shaped: details of the
hostile-content rules (the real-node reproductions are in tests/integration/test_hostile_content.py)."""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import msgpack
import pytest

from ringsync.errors import BadInputError, StorageBusyError
from ringsync.ops.logsafe import bounded, quoted
from ringsync.protocol.batch import (
    MAX_NODE_ID_CHARS,
    Column,
    GameBatch,
    TableSchema,
    build_batch,
    decode_batch,
    encode_batch,
    is_safe_identifier,
    validate_source_node,
)
from ringsync.store import ringrift_schema
from ringsync.store.gamemerge import MAX_TARGET_COLUMNS, GameMerger, _game_id_index
from ringsync.store.receiver import _merge_error

GAMES = (Column("game_id", "TEXT", 1, False), Column("board_type", "TEXT", 0, False))


def games_batch(ids: tuple[str, ...], *extra: tuple[TableSchema, list[tuple[object, ...]]],
                games: tuple[Column, ...] = GAMES, key: str = "cfg_2p") -> GameBatch:
    rows = [(gid, "hex8", *([None] * (len(games) - 2))) for gid in ids]
    return build_batch("node-a", key, ids, [(TableSchema("games", games), rows), *extra])


@pytest.fixture
def merger(tmp_path: Path) -> Iterator[GameMerger]:
    m = GameMerger(tmp_path / "synced")
    yield m
    m.close()


# -- names ------------------------------------------------------------------------------------


def test_our_index_names_can_never_be_a_peer_table_name() -> None:
    assert not is_safe_identifier(_game_id_index("game_extra"))
    assert all(is_safe_identifier(name) for name in ringrift_schema.OBJECT_NAMES)


@pytest.mark.parametrize("name", ["schema_metadata", "idx_moves_game_turn", "enforce_moves_on_insert",
                                  "IDX_GAMES_WINNER"])
def test_tables_taking_receiver_names_are_refused_before_any_file(
        merger: GameMerger, tmp_path: Path, name: str) -> None:
    table = TableSchema(name, (Column("game_id", "TEXT", 0, False), Column("key", "TEXT", 0, False)))
    with pytest.raises(BadInputError, match=name):
        merger.merge(games_batch(("a",), (table, [("a", "schema_version")])))
    assert not (tmp_path / "synced").exists() or list((tmp_path / "synced").iterdir()) == []


def test_a_table_named_like_an_existing_index_of_the_target_is_refused_with_its_name(
        merger: GameMerger, tmp_path: Path) -> None:
    assert merger.merge(games_batch(("a",))).inserted == 1
    db = tmp_path / "synced" / "cfg_2p.db"
    with closing(sqlite3.connect(db)) as conn:  # an index an older ringsync named this way
        conn.execute("CREATE INDEX idx_legacy_game_id ON games(board_type)")
        conn.commit()
    table = TableSchema("idx_legacy_game_id", (Column("game_id", "TEXT", 0, False),))
    with pytest.raises(BadInputError, match=r"idx_legacy_game_id.*index of that name"):
        merger.merge(games_batch(("b",), (table, [("b",)])))
    assert merger.merge(games_batch(("b",))).inserted == 1  # the next batch is fine


def test_a_missing_ringrift_table_gets_ringrifts_shape_whatever_the_batch_declares(
        merger: GameMerger, tmp_path: Path) -> None:
    assert merger.merge(games_batch(("a",))).inserted == 1
    db = tmp_path / "synced" / "cfg_2p.db"
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("DROP TABLE game_players")
        conn.commit()
    own = TableSchema("game_players", (Column("game_id", "TEXT", 1, False),
                                       Column("player_number", "INTEGER", 0, False),
                                       Column("player_type", "TEXT", 0, False)))
    assert merger.merge(games_batch(("b",), (own, [("b", 1, "ai")]))).inserted == 1
    with closing(sqlite3.connect(db)) as conn:
        pk = sorted((r[5], r[1]) for r in conn.execute("PRAGMA table_info(game_players)") if r[5])
        indexes = {r[1] for r in conn.execute("PRAGMA index_list(game_players)")}
    assert [name for _, name in pk] == ["game_id", "player_number"]
    assert not any(i.startswith("ringsync:") for i in indexes)
    two = [("c", 1, "ai"), ("c", 2, "ai")]  # two players: refused had the batch's key been kept
    assert merger.merge(games_batch(("c",), (own, two))).inserted == 1


# -- columns -----------------------------------------------------------------------------------


def test_columns_beyond_the_bound_are_not_added_and_never_block_a_batch(
        merger: GameMerger, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert merger.merge(games_batch(("a",))).inserted == 1
    # RingRift's 26 columns of games, and more than the bound leaves room for.
    wide = (*GAMES, *(Column(f"c{i}", "TEXT", 0, False) for i in range(MAX_TARGET_COLUMNS - 2)))
    assert merger.merge(games_batch(("b",), games=wide)).inserted == 1
    more = (*GAMES, *(Column(f"d{i}", "TEXT", 0, False) for i in range(10)))
    with caplog.at_level(logging.WARNING):
        assert merger.merge(games_batch(("c",), games=more)).inserted == 1
        assert merger.merge(games_batch(("d",), games=more)).inserted == 1
    with closing(sqlite3.connect(tmp_path / "synced" / "cfg_2p.db")) as conn:
        assert len(conn.execute("PRAGMA table_info(games)").fetchall()) == MAX_TARGET_COLUMNS
    assert len([r for r in caplog.records if "the most batches may create" in r.message]) == 1


# -- source_node -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lambda-gh200-1", "vast-29031161", "mac-studio.local",
                                  "n" * MAX_NODE_ID_CHARS, "gpu_box:2"])
def test_node_ids_are_valid_source_nodes(name: str) -> None:
    assert validate_source_node(name) == name


@pytest.mark.parametrize("name", ["", "a\nb", "a\rb", "tab\there", "x\x1b[31m", "a/b", ".hidden",
                                  "n" * (MAX_NODE_ID_CHARS + 1), "line\u2028sep"])
def test_other_source_nodes_are_refused_with_a_bounded_message(name: str) -> None:
    with pytest.raises(BadInputError, match="RINGRIFT_NODE_ID") as info:
        validate_source_node(name)
    assert "\n" not in str(info.value)
    assert len(str(info.value)) < 400


def test_decode_refuses_an_8_mib_source_node_quoting_only_its_start() -> None:
    batch = dataclasses.replace(games_batch(("a",)), source_node="A" * (8 * 1024 * 1024))
    with pytest.raises(BadInputError) as info:
        decode_batch(encode_batch(batch))
    assert len(str(info.value)) < 400
    doc = msgpack.unpackb(encode_batch(batch), raw=False)
    doc["source_node"] = "ok-node"
    assert decode_batch(msgpack.packb(doc, use_bin_type=True)).source_node == "ok-node"


# -- messages and SQLite errors ----------------------------------------------------------------


def test_logged_peer_text_is_one_bounded_line() -> None:
    assert quoted("a\nFORGED") == "'a\\nFORGED'"
    assert len(quoted("x" * 10_000)) < 250
    assert "\n" not in bounded("ours: " + "a\nb" * 10_000)
    assert len(bounded("y" * 10_000)) < 450


def test_sqlite_errors_left_by_a_merge_are_typed() -> None:
    batch = games_batch(("a",))
    busy = sqlite3.OperationalError("database is locked")
    busy.sqlite_errorcode = sqlite3.SQLITE_BUSY  # type: ignore[attr-defined]
    assert isinstance(_merge_error(batch, busy), StorageBusyError)
    odd = sqlite3.OperationalError("no such column: x\nFORGED")
    odd.sqlite_errorcode = sqlite3.SQLITE_ERROR  # type: ignore[attr-defined]
    refused = _merge_error(batch, odd)
    assert isinstance(refused, BadInputError)
    assert "\n" not in str(refused)


@pytest.mark.parametrize("bad", ["tab\there", "n" * (MAX_NODE_ID_CHARS + 1)])
def test_a_node_id_peers_would_refuse_stops_start_up(tmp_path: Path, bad: str) -> None:
    from ringsync.errors import ConfigError
    from ringsync.settings import load_settings

    env = {"RINGRIFT_NODE_ID": bad, "RINGRIFT_DATA_DIR": str(tmp_path), "RINGRIFT_ENV_FILE": "/dev/null"}
    with pytest.raises(ConfigError, match="RINGRIFT_NODE_ID"):
        load_settings(env, cwd=tmp_path)
    env["RINGRIFT_NODE_ID"] = "gpu-node-1"
    assert load_settings(env, cwd=tmp_path).node_id == "gpu-node-1"
