"""Property tests: whatever bytes a peer sends, the receiver merges them correctly or
refuses them with a typed error and changes nothing.

Inputs are arbitrary bytes, arbitrary msgpack documents, and valid batches (written by
RingRift's writer pattern) mutated in their image, their header or both. The receiver is
the real one, over a merged DB that already holds games. A last test throws the same
inputs at a real `ringsync run` node over HTTP: never a 5xx, never a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from ringsync.errors import BadInputError, CorruptDataError
from ringsync.localcluster import Cluster, Node
from ringsync.protocol.batch import (
    Column,
    GameBatch,
    batch_rows,
    build_batch,
    content_digest,
    decode_batch,
    encode_batch,
    image_table_sql,
)
from ringsync.store.gamedb import GameSource
from ringsync.store.receiver import GameReceiver
from ringsync.transport.http import BATCH_CONTENT_TYPE, DIGEST_HEADER, GAMES_PATH
from tests.conftest import write_games

CONFIG = "hex8_2p"
REFUSALS = (BadInputError, CorruptDataError)  # TooLargeError, UnsafePathError are BadInputErrors
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "60")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@dataclasses.dataclass
class World:
    """Valid batches (new games, and games the template DB holds) and a merged DB template."""

    new: list[GameBatch]
    held: GameBatch
    template: Path  # a synced dir whose hex8_2p.db holds the games of ``held``


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("fuzz")
    ids, _ = write_games(root / "selfplay.db", 9)
    source = GameSource(root / "selfplay.db")
    try:
        source.scan()
        batches = [source.extract(ids[i:i + 3], source_node="selfplay-1")[0] for i in (0, 3, 6)]
    finally:
        source.close()
    template = root / "synced"
    receiver = GameReceiver(template)
    try:
        payload = encode_batch(batches[0])
        assert receiver.receive(payload, content_digest(payload)).inserted == 3
    finally:
        receiver.close()
    return World(new=batches[1:], held=batches[0], template=template)


# -- the state the receiver may change ---------------------------------------------------------


def db_state(db: Path) -> str:
    """A hash of every row of every table (sorted), or '' for a DB without tables."""
    digest = hashlib.sha256()
    with closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        for table in tables:
            digest.update(table.encode())
            rows = sorted(repr(r) for r in conn.execute(f'SELECT * FROM "{table}"'))
            digest.update("\n".join(rows).encode())
    return digest.hexdigest() if tables else ""


def state(synced: Path) -> dict[str, str]:
    """Per merged DB its content; a DB with no table counts as absent (see below)."""
    out = {p.name: db_state(p) for p in sorted(synced.glob("*.db"))}
    return {name: s for name, s in out.items() if s}


def check_merged(synced: Path, batch: GameBatch, refused: tuple[str, ...]) -> None:
    db = synced / f"{batch.config_key}.db"
    with closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        ids = [r[0] for r in conn.execute("SELECT game_id FROM games")]
    assert len(ids) == len(set(ids))  # each game exactly once
    assert set(batch.game_ids) - set(refused) <= set(ids)


def note(outcome: str) -> None:
    """An outcome for --hypothesis-show-statistics (how many inputs got how far)."""
    if currently_in_test_context():
        event(outcome)


def throw(world: World, payload: bytes, digest: str | None = None) -> None:
    """Receive ``payload`` on a fresh copy of the template: merged correctly, or refused
    with a typed error and no change to any merged DB."""
    with tempfile.TemporaryDirectory(prefix="ringsync-fuzz-") as tmp:
        synced = Path(tmp) / "synced"
        shutil.copytree(world.template, synced)
        before = state(synced)
        receiver = GameReceiver(synced)
        try:
            result = receiver.receive(payload, digest or content_digest(payload))
        except REFUSALS as exc:
            note(f"refused: {type(exc).__name__}")
            receiver.close()  # before reading the state: the merger's WAL is checkpointed
            # A refused first batch for a new config may leave an empty DB file (no table):
            # GameMerger opens the target before the merge transaction. Nothing else.
            assert state(synced) == before
            return
        finally:
            receiver.close()  # also when something else was raised: no leaked connection
        note("merged")
        check_merged(synced, decode_batch(payload), result.refused)


# -- strategies --------------------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(),
                    st.text(max_size=20), st.binary(max_size=40))
msgpack_docs = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=20)
# Documents shaped like a batch, with any field replaced by anything.
FIELDS = ("v", "source_node", "config_key", "game_ids", "tables", "image")


@st.composite
def header_mutations(draw: st.DrawFn, batch: GameBatch) -> bytes:
    doc: dict[str, Any] = msgpack.unpackb(encode_batch(batch), raw=False)
    tables: list[dict[str, Any]] = doc["tables"]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from((*FIELDS, "swap_tables", "drop_table", "column", "ids")))
        if kind in FIELDS:
            doc[kind] = draw(st.one_of(msgpack_docs, st.sampled_from(
                ["../x", "hex8_2p", "other_3p", "a\nb", "", 2, "A" * 300])))
        elif kind == "swap_tables":
            i, j = draw(st.integers(0, len(tables) - 1)), draw(st.integers(0, len(tables) - 1))
            tables[i], tables[j] = tables[j], tables[i]
        elif kind == "drop_table" and len(tables) > 1:
            tables.pop(draw(st.integers(0, len(tables) - 1)))
        elif kind == "column":
            columns = draw(st.sampled_from(tables))["columns"]
            column = columns[draw(st.integers(0, len(columns) - 1))]
            column[draw(st.integers(0, 3))] = draw(st.one_of(
                scalars, st.sampled_from(["INTEGER", "TEXT PRIMARY KEY", "", "game_id"])))
        elif kind == "ids":
            ids = list(batch.game_ids)
            doc["game_ids"] = draw(st.sampled_from([ids[:-1], [*ids, "ghost"], ids * 2, ["x"]]))
    return bytes(msgpack.packb(doc, use_bin_type=True))


IMAGE_EDITS = [
    "DELETE FROM games",
    "DELETE FROM game_moves",
    "DELETE FROM game_moves WHERE move_number > 2",
    "INSERT INTO game_moves SELECT * FROM game_moves LIMIT 1",
    "INSERT INTO games SELECT * FROM games LIMIT 1",
    "UPDATE games SET game_id = 'other'",
    "UPDATE game_moves SET game_id = NULL",
    "UPDATE games SET game_status = 'completed', total_moves = 1",
    "UPDATE game_moves SET move_json = x'00ff'",
    "UPDATE games SET num_players = 'many'",
    "CREATE TABLE extra (game_id TEXT)",
    "CREATE INDEX i ON games(game_id)",
    "CREATE VIEW v AS SELECT 1",
    "CREATE TRIGGER t AFTER INSERT ON games BEGIN SELECT 1; END",
    "DROP TABLE game_players",
    "ALTER TABLE game_moves ADD COLUMN z INTEGER",
    "PRAGMA user_version = 7",
]


def edited(batch: GameBatch, statements: list[str]) -> GameBatch:
    with closing(sqlite3.connect(":memory:", isolation_level=None)) as conn:
        conn.deserialize(batch.image)
        for sql in statements:
            with contextlib.suppress(sqlite3.Error):  # one that does not apply to this image
                conn.execute(sql)
        return dataclasses.replace(batch, image=conn.serialize())


def utf16(batch: GameBatch) -> GameBatch:
    """The same tables and rows in a UTF-16 image."""
    with closing(sqlite3.connect(":memory:", isolation_level=None)) as conn:
        conn.execute("PRAGMA encoding='UTF-16le'")
        for table in batch.tables:
            conn.execute(image_table_sql(table))
            conn.executemany(f'INSERT INTO "{table.name}" VALUES ({",".join("?" * len(table.columns))})',
                             batch_rows(batch, table.name))
        return dataclasses.replace(batch, image=conn.serialize())


# Names a peer table might take: the receiver's own objects, and plain new ones.
NEW_NAMES = ["idx_games_winner", "schema_metadata", "enforce_moves_on_insert", "orphaned_games",
             "ringsync_extra", "game_moves_v2"]


def renamed(batch: GameBatch, old: str, new: str) -> GameBatch:
    """Table ``old`` renamed to ``new`` in the header and in the image alike."""
    tables = [(dataclasses.replace(t, name=new if t.name == old else t.name), batch_rows(batch, t.name))
              for t in batch.tables]
    return build_batch(batch.source_node, batch.config_key, batch.game_ids, tables)


@st.composite
def image_mutations(draw: st.DrawFn, batch: GameBatch) -> bytes:
    if draw(st.booleans()):
        old = draw(st.sampled_from([t.name for t in batch.tables[1:]]))
        taken = {t.name for t in batch.tables}
        batch = renamed(batch, old, draw(st.sampled_from([n for n in NEW_NAMES if n not in taken])))
    if draw(st.integers(0, 9)) == 0:
        batch = utf16(batch)
    batch = edited(batch, draw(st.lists(st.sampled_from(IMAGE_EDITS), max_size=3)))
    image = bytearray(batch.image)
    for _ in range(draw(st.integers(0, 4))):
        image[draw(st.integers(0, len(image) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        image = image[:draw(st.integers(0, len(image)))]
    return encode_batch(dataclasses.replace(batch, image=bytes(image)))


def batches(world: World) -> st.SearchStrategy[GameBatch]:
    return st.sampled_from([world.held, *world.new])


def any_input(world: World) -> st.SearchStrategy[bytes]:
    mixed = st.tuples(batches(world), batches(world)).map(
        lambda ab: encode_batch(dataclasses.replace(ab[0], image=ab[1].image)))
    return st.one_of(
        st.binary(max_size=300),
        msgpack_docs.map(lambda d: bytes(msgpack.packb(d, use_bin_type=True))),
        batches(world).flatmap(lambda b: header_mutations(b)),
        batches(world).flatmap(lambda b: image_mutations(b)),
        mixed,
        batches(world).map(encode_batch),
    )


# -- the properties ----------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_any_input_is_merged_correctly_or_refused_without_change(world: World, data: st.DataObject) -> None:
    throw(world, data.draw(any_input(world)))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_images_are_merged_correctly_or_refused(world: World, data: st.DataObject) -> None:
    throw(world, data.draw(batches(world).flatmap(lambda b: image_mutations(b))))


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(min_size=1, max_size=200), digest=st.text(max_size=80))
def test_a_wrong_digest_is_refused_without_change(world: World, payload: bytes, digest: str) -> None:
    throw(world, payload, digest or "xxh3-128:0")


def test_the_oracle_sees_a_change() -> None:
    """db_state must tell two DBs apart (else the 'no change' checks prove nothing)."""
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "x.db"
        with closing(sqlite3.connect(db)) as conn:
            conn.execute("CREATE TABLE games (game_id TEXT)")
            conn.commit()
            first = db_state(db)
            conn.execute("INSERT INTO games VALUES ('a')")
            conn.commit()
        assert db_state(db) != first


def test_valid_batches_merge(world: World) -> None:
    for batch in world.new:
        throw(world, encode_batch(batch))


def test_a_header_column_type_change_is_refused_or_merged(world: World) -> None:
    batch = world.new[0]
    odd = dataclasses.replace(batch, tables=tuple(
        dataclasses.replace(t, columns=(*t.columns[:-1], Column(t.columns[-1].name, "BLOB", 0, False)))
        for t in batch.tables))
    throw(world, encode_batch(odd))


# -- over HTTP, against a real node ------------------------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Node]]:
    cluster = Cluster(tmp_path_factory.mktemp("fuzz-node"),
                      [("train-1", "gpu_training_primary"), ("selfplay-1", "gpu_selfplay")],
                      sync_interval=600.0)
    try:
        yield cluster, cluster.start("train-1")
    finally:
        cluster.stop_all()


def post(cluster: Cluster, node: Node, payload: bytes) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
    try:
        conn.request("POST", GAMES_PATH, body=payload, headers={
            "Authorization": f"Bearer {cluster.token}", DIGEST_HEADER: content_digest(payload),
            "Content-Type": BATCH_CONTENT_TYPE})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_the_real_node_answers_2xx_or_4xx_never_5xx(
        world: World, node: tuple[Cluster, Node], data: st.DataObject) -> None:
    cluster, n = node
    status = post(cluster, n, data.draw(any_input(world)))
    assert 200 <= status < 500, status
    assert "Traceback" not in n.log_path.read_text(errors="replace")
