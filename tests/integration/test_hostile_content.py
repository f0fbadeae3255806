"""What an authenticated peer can do with the content of a batch, against a real `ringsync run`.

Each test pushes raw batches over loopback to a real node and checks what it answers,
what it logs and what it leaves on disk: a schema a first batch cannot fix for every later
one, images in another text encoding, forged log lines, and an unbounded number of config
DBs; and a status page that opens none of the merged DBs.
"""

from __future__ import annotations

import dataclasses
import io
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ringsync.localcluster import Cluster, Node, read_game_ids
from ringsync.protocol.batch import (
    Column,
    GameBatch,
    TableSchema,
    batch_rows,
    build_batch,
    content_digest,
    encode_batch,
)
from ringsync.store import ringrift_schema
from ringsync.store.gamedb import GameSource
from ringsync.transport.http import BATCH_CONTENT_TYPE, DIGEST_HEADER, GAMES_PATH, NODE_HEADER
from tests.conftest import TOKEN, write_games

NODE = "train-1"


@dataclasses.dataclass
class Games:
    """A RingRift-written source DB and batches of its games under any config key."""

    source: GameSource
    ids: list[str]

    def batch(self, ids: list[str], config_key: str, source_node: str = "selfplay-1") -> GameBatch:
        (batch,) = self.source.extract(ids, source_node=source_node)
        return dataclasses.replace(batch, config_key=config_key)


@pytest.fixture(scope="module")
def games(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Games]:
    db = tmp_path_factory.mktemp("source") / "selfplay.db"
    ids, _ = write_games(db, 40)
    source = GameSource(db)
    source.scan()
    try:
        yield Games(source, ids)
    finally:
        source.close()


def start(root: Path, **env: str) -> tuple[Cluster, Node]:
    cluster = Cluster(root, [(NODE, "gpu_training_primary"), ("selfplay-1", "gpu_selfplay")],
                      sync_interval=600.0)
    cluster.nodes[NODE].extra_env.update(env)
    return cluster, cluster.start(NODE)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Node]]:
    cluster, node = start(tmp_path_factory.mktemp("hostile"))
    try:
        yield cluster, node
    finally:
        cluster.stop_all()


def synced(node: Node) -> Path:
    return node.data_dir / "games" / "synced" / NODE


def listing(node: Node) -> list[str]:
    return sorted(p.name for p in synced(node).iterdir()) if synced(node).is_dir() else []


async def push(cluster: Cluster, node: Node, payload: bytes,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    hdrs = {"Authorization": f"Bearer {cluster.token}", DIGEST_HEADER: content_digest(payload),
            "Content-Type": BATCH_CONTENT_TYPE, NODE_HEADER: "selfplay-1", **(headers or {})}
    async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{node.port}{GAMES_PATH}", data=io.BytesIO(payload), headers=hdrs) as r:
        return r.status, await r.json(content_type=None)


async def status(cluster: Cluster, node: Node) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{node.port}/v1/status",
            headers={"Authorization": f"Bearer {cluster.token}"}) as r:
        assert r.status == 200
        body: dict[str, Any] = await r.json()
        return body


def with_image(batch: GameBatch, *statements: str) -> GameBatch:
    with closing(sqlite3.connect(":memory:", isolation_level=None)) as conn:
        conn.deserialize(batch.image)
        for sql in statements:
            conn.execute(sql)
        return dataclasses.replace(batch, image=conn.serialize())


def with_table(batch: GameBatch, table: TableSchema, rows: list[tuple[Any, ...]]) -> GameBatch:
    tables = [(t, batch_rows(batch, t.name)) for t in batch.tables] + [(table, rows)]
    return build_batch(batch.source_node, batch.config_key, batch.game_ids, tables)


def primary_key(db: Path, table: str) -> list[str]:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        info = conn.execute(f'PRAGMA table_info("{table}")').fetchall()
    return [r[1] for r in sorted(info, key=lambda r: r[5]) if r[5]]


# -- B4: the first batch for a table does not fix its schema forever ---------------------------


async def test_a_batch_declaring_its_own_game_moves_key_does_not_lock_out_later_batches(
        node: tuple[Cluster, Node], games: Games) -> None:
    cluster, n = node
    key = "poison_moves_2p"
    # A DB made before (migrated: no game_moves yet, no insert trigger) where a batch
    # could create game_moves in its own shape: one row per game, keyed by game_id alone.
    synced(n).mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(synced(n) / f"{key}.db")) as conn:
        ringrift_schema.create_schema(conn, triggers=False)
        conn.execute("DROP TABLE game_moves")
        conn.commit()
    poison = with_image(games.batch(games.ids[:2], key), "DELETE FROM game_moves WHERE move_number > 0")
    poison = dataclasses.replace(poison, tables=tuple(
        dataclasses.replace(t, columns=tuple(dataclasses.replace(c, pk=int(c.name == "game_id"))
                                             for c in t.columns))
        if t.name == "game_moves" else t for t in poison.tables))
    code, _ = await push(cluster, n, encode_batch(poison))
    assert code == 200
    db = synced(n) / f"{key}.db"
    assert primary_key(db, "game_moves") == ["game_id", "move_number"]  # RingRift's, not the batch's
    code, body = await push(cluster, n, encode_batch(games.batch(games.ids[2:6], key)))
    assert (code, body["inserted"]) == (200, 4)
    assert sorted(read_game_ids(db)) == sorted(games.ids[:6])


async def test_a_table_named_like_a_receiver_index_is_refused_and_creates_nothing(
        node: tuple[Cluster, Node], games: Games) -> None:
    cluster, n = node
    key = "poison_index_2p"
    table = TableSchema("idx_games_board_type", (Column("game_id", "TEXT", 0, False),
                                                 Column("x", "INTEGER", 0, False)))
    before = listing(n)
    poison = with_table(games.batch(games.ids[6:8], key), table, [(games.ids[6], 1)])
    code, body = await push(cluster, n, encode_batch(poison))
    assert code == 400
    assert "idx_games_board_type" in body["error"]
    assert listing(n) == before  # not even the target DB was created
    code, body = await push(cluster, n, encode_batch(games.batch(games.ids[6:8], key)))
    assert (code, body["inserted"]) == (200, 2)


async def test_unknown_tables_never_take_a_key_from_a_peer(
        node: tuple[Cluster, Node], games: Games) -> None:
    cluster, n = node
    key = "poison_extra_2p"
    one_row = TableSchema("game_extra", (Column("game_id", "TEXT", 1, False),
                                         Column("seq", "INTEGER", 0, False)))
    first = with_table(games.batch(games.ids[8:10], key), one_row,
                       [(gid, 0) for gid in games.ids[8:10]])
    assert (await push(cluster, n, encode_batch(first)))[0] == 200
    # Another source keys the same table by (game_id, seq): two rows per game.
    two_rows = TableSchema("game_extra", (Column("game_id", "TEXT", 1, False),
                                          Column("seq", "INTEGER", 2, False)))
    later = with_table(games.batch(games.ids[10:12], key), two_rows,
                       [(gid, s) for gid in games.ids[10:12] for s in (0, 1)])
    code, body = await push(cluster, n, encode_batch(later))
    assert (code, body["inserted"]) == (200, 2)
    assert primary_key(synced(n) / f"{key}.db", "game_extra") == []


# -- B5: a UTF-16 image ------------------------------------------------------------------------


async def test_a_utf16_image_is_refused_before_anything_is_created(
        node: tuple[Cluster, Node], games: Games) -> None:
    cluster, n = node
    good = games.batch(games.ids[12:14], "utf16_2p")
    with closing(sqlite3.connect(":memory:", isolation_level=None)) as conn:
        conn.execute("PRAGMA encoding='UTF-16le'")
        for table in good.tables:
            cols = ", ".join(f'"{c.name}" {c.decl_type}'.rstrip() for c in table.columns)
            conn.execute(f'CREATE TABLE "{table.name}" ({cols})')
            rows = batch_rows(good, table.name)
            conn.executemany(f'INSERT INTO "{table.name}" VALUES ({",".join("?" * len(table.columns))})',
                             rows)
        utf16 = dataclasses.replace(good, image=conn.serialize())
    before = listing(n)
    code, body = await push(cluster, n, encode_batch(utf16))
    assert code == 400
    assert "UTF-16" in body["error"]
    assert "UTF-8" in body["error"]
    assert listing(n) == before


# -- B7: log injection -------------------------------------------------------------------------


FORGED = "2026-11-30 06:00:00,000 ERROR ringsync.fake: FORGED LINE"


async def test_a_source_node_cannot_forge_log_lines_or_flood_them(
        node: tuple[Cluster, Node], games: Games) -> None:
    cluster, n = node
    # Each batch is bad in another way too, so an unvalidated source_node would be logged.
    bad = with_image(games.batch(games.ids[14:16], "inject_2p"), "DELETE FROM games")
    forged = dataclasses.replace(bad, source_node=f"selfplay-1\n{FORGED}")
    code, body = await push(cluster, n, encode_batch(forged))
    assert code == 400
    assert "source_node" in body["error"]
    huge = dataclasses.replace(bad, source_node="A" * (8 * 1024 * 1024))
    code, body = await push(cluster, n, encode_batch(huge), headers={NODE_HEADER: "B" * 6000})
    assert code == 400
    assert "source_node" in body["error"]
    assert len(body["error"]) < 2000
    lines = n.log_path.read_text(errors="replace").splitlines()
    assert not any(line.startswith(FORGED) for line in lines)
    assert max(len(line) for line in lines) < 4000
    assert any("rejected a game batch" in line for line in lines)


# -- B8: a bound on config keys, and a status that opens no merged DB --------------------------


async def test_config_keys_are_bounded_and_status_opens_no_merged_db(
        tmp_path: Path, games: Games) -> None:
    cluster, n = start(tmp_path, RINGRIFT_MAX_CONFIGS="3")
    try:
        answers = [await push(cluster, n, encode_batch(games.batch(games.ids[i:i + 1], f"key{i}_2p")))
                   for i in range(6)]
        assert [code for code, _ in answers] == [200, 200, 200, 400, 400, 400]
        assert all("RINGRIFT_MAX_CONFIGS=3" in body["error"] for _, body in answers[3:])
        assert [p for p in listing(n) if p.endswith(".db")] == ["key0_2p.db", "key1_2p.db", "key2_2p.db"]
        # A key it holds already still merges at the bound.
        code, body = await push(cluster, n, encode_batch(games.batch(games.ids[20:22], "key1_2p")))
        assert (code, body["inserted"]) == (200, 2)

        assert cluster.terminate(NODE) == 0  # the merged DBs are closed: no -wal/-shm left
        files = listing(n)
        assert files == ["key0_2p.db", "key1_2p.db", "key2_2p.db"]
        cluster.start(NODE)
        for _ in range(3):
            st = await status(cluster, n)
        assert st["received_games"] == {"key0_2p": 1, "key1_2p": 3, "key2_2p": 1}
        assert st["received_total"] == 5
        assert listing(n) == files  # status created no -wal/-shm beside DBs it only reads
        log = n.log_path.read_text()
        assert log.count("RINGRIFT_MAX_CONFIGS=3 allows") == 1  # logged once, then counted
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{n.port}/metrics") as r:
            text = await r.text()
        assert "ringsync_received_configs 3.0" in text

        # After a crash, the DBs merged into since the last clean stop are counted again.
        await push(cluster, n, encode_batch(games.batch(games.ids[22:25], "key2_2p")))
        cluster.kill(NODE)
        cluster.start(NODE)
        st = await status(cluster, n)
        assert st["received_games"] == {"key0_2p": 1, "key1_2p": 3, "key2_2p": 4}
    finally:
        cluster.stop_all()


def test_refused_keys_are_counted(tmp_path: Path) -> None:
    """The counter behind the bound, without a node (a unit-level companion of the above)."""
    from ringsync.errors import TooLargeError
    from ringsync.ops.metrics import Metrics
    from ringsync.store.received_configs import ReceivedConfigs

    (tmp_path / "synced").mkdir()
    for held in ("a_2p", "b_2p"):
        (tmp_path / "synced" / f"{held}.db").touch()
    metrics = Metrics()
    configs = ReceivedConfigs(tmp_path / "synced", max_configs=2, metrics=metrics)
    configs.admit("a_2p")
    for key in ("c_2p", "d_2p"):
        with pytest.raises(TooLargeError, match="RINGRIFT_MAX_CONFIGS=2"):
            configs.admit(key)
    assert metrics.received_configs_refused._value.get() == 2
    configs.close()


# -- the HTTP mapping of storage that cannot take a batch now --------------------------------


async def test_storage_that_cannot_take_a_batch_now_is_503_with_retry_after(
        node_factory: Any, served: Any, games: Games, monkeypatch: pytest.MonkeyPatch) -> None:
    """Busy or failing storage is not the batch's fault: the sender backs off and retries."""
    from ringsync.errors import StorageBusyError
    from ringsync.transport.http import BATCH_CONTENT_TYPE as CT

    ctx = node_factory()
    await served(ctx)

    def busy(payload: bytes, digest: str) -> Any:
        raise StorageBusyError("batch cfg from 'x' not merged, this node's storage cannot take it now")

    monkeypatch.setattr(ctx.receiver, "receive", busy)
    payload = encode_batch(games.batch(games.ids[30:31], "busy_2p"))
    async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{ctx.settings.p2p_port}{GAMES_PATH}", data=payload,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": CT,
                     DIGEST_HEADER: content_digest(payload)}) as r:
        assert r.status == 503
        assert r.headers["Retry-After"] == "10"
        assert "storage" in (await r.json())["error"]
