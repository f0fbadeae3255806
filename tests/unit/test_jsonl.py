"""JSONL game logs: whole lines only, truncation/replacement/gz archives, each game shipped once."""

from __future__ import annotations

import dataclasses
import gzip
import json
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from ringsync.daemons.auto_sync import AutoSyncDaemon
from ringsync.daemons.auto_sync.triggers import Trigger
from ringsync.inventory import Inventory
from ringsync.node import NodeContext
from ringsync.protocol.batch import batch_rows
from ringsync.protocol.jsonl import LineSplitter, Skip, parse_game
from ringsync.store.gamedb import game_ids
from ringsync.store.jsonl_source import JsonlIndex, JsonlSource
from ringsync.transport.http import HttpTransport
from tests.conftest import TOKEN, make_inventory


def gpu(idx: int, *, moves: int = 8, **extra: Any) -> dict[str, Any]:
    rec = {"game_id": f"gpu_hex8_2p_{idx}_1767225600", "board_type": "hex8", "num_players": 2,
           "winner": 1, "move_count": moves, "status": "completed", "victory_type": "territory",
           "termination_reason": "status:completed:territory",
           "moves": [{"type": "place_ring", "player": m % 2 + 1, "phase": "ring_placement",
                      "moveNumber": m + 1, "to": {"x": m, "y": 0}} for m in range(moves)],
           "initial_state": {"board": "hex8"}, "timestamp": "2026-01-01T00:00:00"}
    rec.update(extra)
    return rec


def line(rec: dict[str, Any]) -> bytes:
    return json.dumps(rec, ensure_ascii=False).encode() + b"\n"


@pytest.fixture
def index(tmp_path: Path) -> Iterator[JsonlIndex]:
    idx = JsonlIndex(tmp_path / "state" / "jsonl.db")
    yield idx
    idx.close()


def scan(src: JsonlSource) -> list[str]:
    found = [g.game_id for g in src.scan()]
    src.commit()
    return found


# -- pure ----------------------------------------------------------------------------------


def test_which_lines_are_games() -> None:
    q = "n1:selfplay/x.jsonl"
    assert parse_game(b"{not json", qualifier=q) is Skip.MALFORMED
    assert parse_game(b"[1]", qualifier=q) is Skip.MALFORMED
    assert parse_game(line(gpu(1, victory_type="in_progress", winner=0)), qualifier=q) is Skip.INCOMPLETE
    assert parse_game(line(gpu(1, status="active")), qualifier=q) is Skip.INCOMPLETE  # Gumbel cut off
    assert parse_game(line(gpu(1, moves=4)), qualifier=q) is Skip.TOO_SHORT
    game = parse_game(line(gpu(1)), qualifier=q)
    assert not isinstance(game, Skip)
    assert (game.game_id, game.config_key) == (f"{q}:gpu_hex8_2p_1_1767225600", "hex8_2p")
    gid = str(uuid.uuid4())
    gumbel = parse_game(line(gpu(2, game_id=gid)), qualifier=q)
    assert not isinstance(gumbel, Skip)
    assert gumbel.game_id == gid
    soak = gpu(3, index=7)
    del soak["game_id"]
    parsed = parse_game(line(soak), qualifier=q)
    assert not isinstance(parsed, Skip)
    assert parsed.game_id.startswith(f"{q}:#7:h")
    # A new soak run (log rewritten, index from 0 again) plays another game at index 7.
    other = parse_game(line({**soak, "seed": 12345}), qualifier=q)
    assert not isinstance(other, Skip)
    assert other.game_id != parsed.game_id
    assert parse_game(line(soak), qualifier=q) == parsed  # the same line: the same game


def test_line_splitter_waits_for_a_partial_line_and_bounds_a_huge_one() -> None:
    splitter = LineSplitter(100, max_line=10)
    got = list(splitter.lines([b"abc\nde", b"f\n" + b"x" * 25, b"y" * 5, b"\nok\npart"]))
    assert got == [(100, b"abc"), (104, b"def"), (108, None), (139, b"ok")]
    assert splitter.end == 142  # "part" waits


# -- one file ------------------------------------------------------------------------------


def test_tail_ships_whole_lines_once_and_survives_a_partial_line(tmp_path: Path, index: JsonlIndex) -> None:
    log = tmp_path / "games.jsonl"
    first, second = line(gpu(1)), line(gpu(2, winner=2))
    log.write_bytes(first + second[:40])  # the writer is mid-line
    src = JsonlSource(log, "selfplay/games.jsonl", index, node_id="n1")
    assert len(scan(src)) == 1
    assert not src.changed()
    with log.open("ab") as fh:
        fh.write(second[40:] + b"{broken\n" + "{\"ü\": \"unicode ✓\"}\n".encode())
    assert src.changed()
    found = scan(src)
    assert found == ["n1:selfplay/games.jsonl:gpu_hex8_2p_2_1767225600"]
    assert src.skipped["malformed"] == 2  # one broken line, one that is not a game record
    again = JsonlSource(log, "selfplay/games.jsonl", index, node_id="n1")  # a restart
    assert scan(again) == []


def test_replaced_by_its_last_lines_and_archived_to_gz_ships_nothing_twice(
        tmp_path: Path, index: JsonlIndex) -> None:
    log = tmp_path / "games.jsonl"
    lines = [line(gpu(i)) for i in range(6)]
    log.write_bytes(b"".join(lines[:4]))
    src = JsonlSource(log, "selfplay/games.jsonl", index, node_id="n1")
    assert len(scan(src)) == 4
    # disk_monitor: old lines to games_archived.jsonl.gz, games.jsonl replaced by its tail.
    with gzip.open(tmp_path / "games_archived.jsonl.gz", "wb") as gz:
        gz.write(b"".join(lines[:3]))
    (tmp_path / "new").write_bytes(b"".join(lines[3:]))
    (tmp_path / "new").replace(log)
    new = scan(src)  # game 3 moved (same id: the manifest knows it), 4 and 5 are new
    assert new == [f"n1:selfplay/games.jsonl:gpu_hex8_2p_{i}_1767225600" for i in (3, 4, 5)]
    archive = JsonlSource(tmp_path / "games_archived.jsonl.gz", "selfplay/games_archived.jsonl.gz",
                          index, node_id="n1")
    moved = scan(archive)  # known lines: reported as moved (same ids), never new ids
    assert set(moved) <= {f"n1:selfplay/games.jsonl:gpu_hex8_2p_{i}_1767225600" for i in range(3)}
    # Truncated in place (--continuous) and rewritten with other games: read from 0.
    log.write_bytes(line(gpu(9)))
    assert scan(src) == ["n1:selfplay/games.jsonl:gpu_hex8_2p_9_1767225600"]


def test_extract_builds_ringrift_rows_with_moves(tmp_path: Path, index: JsonlIndex) -> None:
    log = tmp_path / "gumbel_hex8_2p.jsonl"
    gid = str(uuid.uuid4())
    log.write_bytes(line(gpu(1, game_id=gid, moves=6)) + line(gpu(2)))
    src = JsonlSource(log, "selfplay/gumbel_hex8_2p.jsonl", index, node_id="n1")
    ids = scan(src)
    (batch,) = src.extract(ids, source_node="n1")
    assert batch.config_key == "hex8_2p"
    assert set(batch.game_ids) == set(ids)
    games = {r[0]: r for r in batch_rows(batch, "games")}
    cols = [c.name for c in batch.tables[0].columns]
    row = dict(zip(cols, games[gid], strict=True))
    assert (row["game_status"], row["winner"], row["total_moves"], row["schema_version"]) == (
        "completed", 1, 6, 18)
    assert json.loads(row["metadata_json"])["game_id"] == gid
    moves = [r for r in batch_rows(batch, "game_moves") if r[0] == gid]
    assert [r[1] for r in moves] == list(range(6))


def test_hostile_lines_are_malformed_or_shipped_never_fatal(tmp_path: Path, index: JsonlIndex) -> None:
    log = tmp_path / "selfplay" / "games.jsonl"
    log.parent.mkdir(parents=True)
    deep = b"[" * 200_000 + b"\n"  # json.loads raises RecursionError
    huge = line(gpu(1, seed=2**64, duration_ms=-(2**70), winner=2**65))  # beyond SQLite's int64
    players = line(gpu(2, num_players=2**70))
    log.write_bytes(deep + huge + players)
    src = JsonlSource(log, "selfplay/games.jsonl", index, node_id="n1")
    ids = [g.game_id for g in src.scan()]
    assert src.skipped.get("malformed") == 2
    src.commit()
    assert parse_game(deep, qualifier="q") is Skip.MALFORMED
    assert parse_game(players, qualifier="q") is Skip.MALFORMED
    assert len(ids) == 1
    (batch,) = src.extract(ids, source_node="n1")
    cols = [c.name for c in batch.tables[0].columns]
    row = dict(zip(cols, batch_rows(batch, "games")[0], strict=True))
    assert row["rng_seed"] is None  # no int64: not bound as an integer (OverflowError before)
    assert row["winner"] == float(2**65)  # bound as text; the INTEGER column makes it a number
    src.close()


# -- end to end ----------------------------------------------------------------------------


async def test_jsonl_games_arrive_once_with_their_moves(
        node_factory: Callable[..., NodeContext], served: Callable[..., Any]) -> None:
    train1 = node_factory("train-1")
    train2 = node_factory("train-2")
    port1, port2 = train1.settings.p2p_port, train2.settings.p2p_port
    hosts = dict(make_inventory().hosts)
    hosts["train-1"] = dataclasses.replace(hosts["train-1"], p2p_port=port1)
    hosts["train-2"] = dataclasses.replace(hosts["train-2"], p2p_port=port2)
    sender = node_factory("selfplay-1", inventory=Inventory(hosts=hosts))
    await served(train1)
    await served(train2)
    data = sender.settings.data_dir
    job = data / "selfplay/p2p_gpu/hex8_2p/job-1"
    job.mkdir(parents=True)
    gumbel_id = str(uuid.uuid4())
    recs = [gpu(i) for i in range(3)] + [gpu(3, game_id=gumbel_id), gpu(4, moves=3)]
    (job / "games_hex8_2p_11.jsonl").write_bytes(b"".join(line(r) for r in recs) + b'{"part')
    (data / "selfplay/gumbel_hex8_2p.jsonl").write_bytes(line(recs[3]))  # the same Gumbel game
    daemon = AutoSyncDaemon(sender, HttpTransport("selfplay-1", TOKEN))
    await daemon.sync_once()
    await daemon.sync_once(Trigger.INTERVAL)
    for node in (train1, train2):
        merged = node.settings.synced_dir / "hex8_2p.db"
        got = game_ids(merged)
        assert len(got) == 4
        assert gumbel_id in got
        with closing(sqlite3.connect(merged)) as conn:
            assert conn.execute("SELECT count(*) FROM game_moves").fetchone()[0] == 4 * 8
    assert sender.metrics.jsonl_games_skipped.labels(reason="too_short")._value.get() == 1
    await daemon.close()
