"""DataManifest: the outbox never loses a game and never owes one twice."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringsync.store.manifest import DataManifest, LocalGame


@pytest.fixture
def manifest(tmp_path: Path) -> Iterator[DataManifest]:
    m = DataManifest(tmp_path / "manifest.db")
    yield m
    m.close()


def games(*ids: str) -> list[LocalGame]:
    return [LocalGame(i, "selfplay.db", "hex8_2p") for i in ids]


def test_discovered_games_are_owed_to_every_target(manifest: DataManifest) -> None:
    assert manifest.record_discovered(games("a", "b"), ["t1", "t2"]) == 2
    assert {p.game_id for p in manifest.pending("t1", 10)} == {"a", "b"}
    assert {p.game_id for p in manifest.pending("t2", 10)} == {"a", "b"}


def test_ack_moves_games_from_outbox_to_deliveries(manifest: DataManifest) -> None:
    manifest.record_discovered(games("a", "b"), ["t1"])
    manifest.ack("t1", ["a"])
    assert [p.game_id for p in manifest.pending("t1", 10)] == ["b"]
    assert manifest.holders("a") == ["t1"]


def test_rediscovery_after_delivery_does_not_queue_again(manifest: DataManifest) -> None:
    manifest.record_discovered(games("a"), ["t1"])
    manifest.ack("t1", ["a"])
    assert manifest.record_discovered(games("a"), ["t1"]) == 0
    assert manifest.pending("t1", 10) == []


def test_new_target_gets_the_whole_backlog(manifest: DataManifest) -> None:
    manifest.record_discovered(games("a", "b", "c"), ["t1"])
    manifest.ack("t1", ["a", "b", "c"])
    assert manifest.ensure_targets(["t1", "t3"]) == 3
    assert manifest.pending("t1", 10) == []
    assert len(manifest.pending("t3", 10)) == 3


def test_state_survives_reopen(tmp_path: Path) -> None:
    m = DataManifest(tmp_path / "m.db")
    m.record_discovered(games("a", "b"), ["t1"])
    m.ack("t1", ["a"])
    m.close()
    again = DataManifest(tmp_path / "m.db")
    try:
        assert [p.game_id for p in again.pending("t1", 10)] == ["b"]
        assert again.summary() == {"games": 2, "delivered": {"t1": 1}, "pending": {"t1": 1},
                                   "shared": {}}
    finally:
        again.close()


def test_corrupt_manifest_is_moved_aside_and_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "manifest.db"
    path.write_bytes(b"this is not a database" * 200)
    m = DataManifest(path)
    try:
        assert m.summary()["games"] == 0
    finally:
        m.close()
    aside = list(tmp_path.glob("manifest.db.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes().startswith(b"this is not a database")


def test_failed_transaction_changes_nothing(manifest: DataManifest) -> None:
    manifest.record_discovered(games("a"), ["t1"])
    with pytest.raises(sqlite3.ProgrammingError):
        manifest.ack("t1", ["a", object()])  # type: ignore[list-item]
    assert [p.game_id for p in manifest.pending("t1", 10)] == ["a"]
    assert manifest.holders("a") == []


ops = st.lists(
    st.one_of(
        st.tuples(st.just("discover"), st.lists(st.sampled_from("abcdefgh"), max_size=4)),
        st.tuples(st.just("ack"), st.sampled_from(["t1", "t2"]), st.integers(0, 5)),
        st.tuples(st.just("reopen")),
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_every_discovered_game_is_owed_or_delivered_exactly_once(tmp_path_factory: pytest.TempPathFactory,
                                                                  script: list[tuple[object, ...]]) -> None:
    path = tmp_path_factory.mktemp("prop") / "m.db"
    targets = ["t1", "t2"]
    m = DataManifest(path)
    seen: set[str] = set()
    try:
        for op in script:
            if op[0] == "discover":
                ids = list(dict.fromkeys(op[1]))  # type: ignore[call-overload]
                m.record_discovered(games(*ids), targets)
                seen.update(ids)
            elif op[0] == "ack":
                target, n = str(op[1]), int(op[2])  # type: ignore[call-overload]
                m.ack(target, [p.game_id for p in m.pending(target, n)])
            else:
                m.close()
                m = DataManifest(path)
        for target in targets:
            owed = [p.game_id for p in m.pending(target, 1000)]
            held = [g for g in seen if target in m.holders(g)]
            assert len(owed) == len(set(owed))
            assert set(owed).isdisjoint(held)
            assert set(owed) | set(held) == seen
    finally:
        m.close()


def test_a_game_found_in_a_new_file_is_read_from_there(manifest: DataManifest) -> None:
    manifest.record_discovered(games("a"), ["t1"])
    moved = [LocalGame("a", "archive/selfplay-1.db", "hex8_2p")]
    assert manifest.record_discovered(moved, ["t1"]) == 0
    assert [p.source for p in manifest.pending("t1", 10)] == ["archive/selfplay-1.db"]


def test_a_game_known_from_a_jsonl_line_is_read_from_its_db_row_once_one_appears(
        manifest: DataManifest) -> None:
    line = [LocalGame("g", "selfplay/gumbel_hex8_2p.jsonl", "hex8_2p")]
    row = [LocalGame("g", "selfplay/p2p/hex8_2p/j1/games.db", "hex8_2p")]
    manifest.record_discovered(line, ["t1"])
    manifest.ack("t1", ["g"])  # t1 holds the line's rows only
    manifest.record_discovered(row, ["t1"])
    pending = manifest.pending("t1", 10)
    assert [(p.game_id, p.source) for p in pending] == [("g", row[0].source)]
    manifest.ack("t1", ["g"])
    # Found in the log again (e.g. a rescan): the DB stays the source and nothing is re-sent.
    manifest.record_discovered(line, ["t1"])
    manifest.record_discovered(row, ["t1"])
    assert manifest.pending("t1", 10) == []


def test_a_game_found_in_a_db_first_is_never_moved_to_its_jsonl_line(manifest: DataManifest) -> None:
    row = [LocalGame("g", "games/hex8_2p.db", "hex8_2p")]
    manifest.record_discovered(row, ["t1"])
    manifest.record_discovered([LocalGame("g", "selfplay/x.jsonl.gz", "hex8_2p")], ["t1"])
    assert [p.source for p in manifest.pending("t1", 10)] == ["games/hex8_2p.db"]
