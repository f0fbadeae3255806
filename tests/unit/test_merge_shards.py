"""Issue 7 A2: a config's merged games go into size-bounded shards, each game in one of them once."""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from ringsync.selfplay_sim import SelfplayWriter
from ringsync.store.gamedb import GameMerger, GameSource
from ringsync.store.received_configs import ReceivedConfigs
from ringsync.store.shards import (
    HeldFilter,
    config_keys,
    held_filter_path,
    parse_shard,
    shard_paths,
)
from tests.unit.test_gamedb import one_batch
from tests.unit.test_merge_scale import plan_problems

KEY = "hex8_2p"


def written(writer: SelfplayWriter, source: GameSource, n: int) -> list[str]:
    """``n`` completed games, seen by ``source``."""
    ids = [writer.write_game() for _ in range(n)]
    source.scan()
    return ids


@pytest.fixture
def synced(tmp_path: Path) -> Path:
    return tmp_path / "synced"


@pytest.fixture
def merger(synced: Path) -> Iterator[GameMerger]:
    """Every merged DB is full as soon as it exists: each merge with new games starts one."""
    m = GameMerger(synced, shard_bytes=1)
    yield m
    m.close()


def games_per_shard(synced: Path) -> dict[str, Counter[str]]:
    """Each shard's game ids, read with connections of this test's own."""
    held = {}
    for path in shard_paths(synced, KEY):
        with closing(sqlite3.connect(path)) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            held[path.name] = Counter(r[0] for r in conn.execute("SELECT game_id FROM games"))
    return held


def filter_built(merger: GameMerger) -> None:
    """Wait for the filter of the full shards' ids, built in a thread of its own."""
    for shards in merger._shards.values():
        if (builder := shards.building) is not None:
            builder.join(30)
    assert all(shards.held is not None for shards in merger._shards.values())


def every_game(held: dict[str, Counter[str]]) -> Counter[str]:
    return sum(held.values(), Counter())


def test_a_full_db_takes_no_new_games_and_each_game_stays_in_one_shard(
        writer: SelfplayWriter, source: GameSource, merger: GameMerger, synced: Path) -> None:
    ids = written(writer, source, 30)
    first = merger.merge(one_batch(source, ids[:10]))
    second = merger.merge(one_batch(source, ids[10:20]))
    # a resend of games in both full shards, with ten new ones
    third = merger.merge(one_batch(source, ids[5:30]))
    again = merger.merge(one_batch(source, ids))
    assert (first.inserted, second.inserted, third.inserted, again.inserted) == (10, 10, 10, 0)
    assert (third.duplicates, again.duplicates) == (15, 30)
    held = games_per_shard(synced)
    assert list(held) == [f"{KEY}.db", f"{KEY}+2.db", f"{KEY}+3.db"]
    assert set(held[f"{KEY}.db"]) == set(ids[:10])
    assert set(held[f"{KEY}+3.db"]) == set(ids[20:])
    assert every_game(held) == Counter(ids)  # each game exactly once over all shards


def test_late_rows_of_a_game_go_to_the_shard_that_holds_it(
        writer: SelfplayWriter, source: GameSource, merger: GameMerger, synced: Path) -> None:
    ids = written(writer, source, 4)
    merger.merge(one_batch(source, ids[:2]))
    writer.change_later(ids[0])  # RingRift's tools add feature rows to a finished game
    result = merger.merge(one_batch(source, ids))
    assert (result.inserted, result.duplicates) == (2, 2)
    assert result.rows_updated > 0
    with closing(sqlite3.connect(synced / f"{KEY}.db")) as conn:
        late = conn.execute("SELECT count(*) FROM game_nnue_features WHERE game_id = ? "
                            "AND player_perspective = 0", (ids[0],)).fetchone()[0]
    with closing(sqlite3.connect(synced / f"{KEY}+2.db")) as conn:
        in_new = conn.execute("SELECT count(*) FROM game_nnue_features WHERE game_id = ?",
                              (ids[0],)).fetchone()[0]
    assert late > 0
    assert in_new == 0
    assert every_game(games_per_shard(synced)) == Counter(ids)


def test_concurrent_resends_across_a_shard_change_never_duplicate(
        writer: SelfplayWriter, source: GameSource, synced: Path) -> None:
    """Pushes of overlapping batches from several threads while DBs fill up and new ones
    start: every game ends up held exactly once."""
    ids = written(writer, source, 60)
    batches = [one_batch(source, ids[i:i + 15]) for i in range(0, 50, 5)]
    merger = GameMerger(synced, shard_bytes=200_000)
    errors: list[BaseException] = []

    def push(order: list[int]) -> None:
        try:
            for i in order:
                merger.merge(batches[i])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=push, args=(list(range(len(batches)))[::step],))
               for step in (1, -1, 2, -2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        merger.close()
    assert not errors
    held = games_per_shard(synced)
    assert len(held) >= 2, "the bound never started a second shard: the test proves nothing"
    assert every_game(held) == Counter(ids[:60])


def test_a_restarted_merger_finds_its_shards_and_an_operator_may_remove_one(
        writer: SelfplayWriter, source: GameSource, synced: Path) -> None:
    ids = written(writer, source, 12)
    merger = GameMerger(synced, shard_bytes=1)
    merger.merge(one_batch(source, ids[:4]))
    merger.merge(one_batch(source, ids[4:8]))
    merger.close()

    merger = GameMerger(synced, shard_bytes=1)
    try:
        assert merger.merge(one_batch(source, ids[:8])).duplicates == 8
        (synced / f"{KEY}.db").unlink()  # an operator archived the oldest shard
        result = merger.merge(one_batch(source, ids))
    finally:
        merger.close()
    # its games count as new again (they are no longer held here); nothing recreates the file
    assert (result.inserted, result.duplicates) == (8, 4)
    held = games_per_shard(synced)
    assert f"{KEY}.db" not in held
    assert every_game(held) == Counter(ids)


def test_status_counts_every_shard_of_a_config(
        writer: SelfplayWriter, source: GameSource, merger: GameMerger, synced: Path) -> None:
    ids = written(writer, source, 9)
    for i in range(0, 9, 3):
        merger.merge(one_batch(source, ids[i:i + 3]))
    assert config_keys(synced) == {KEY}
    # a ledger with no exact count (as after a crash) counts the games of every shard
    configs = ReceivedConfigs(synced)
    try:
        assert configs.held() == {KEY: 9}
    finally:
        configs.close()


def test_full_shards_are_looked_up_only_for_ids_that_may_be_there_and_by_key(
        writer: SelfplayWriter, source: GameSource, merger: GameMerger, synced: Path) -> None:
    ids = written(writer, source, 8)
    merger.merge(one_batch(source, ids[:3]))
    merger.merge(one_batch(source, ids[7:]))  # the first DB is full: a second one starts
    filter_built(merger)  # ... and the filter of the first one's ids is built meanwhile
    full = merger._target(synced / f"{KEY}.db")
    statements: list[str] = []
    full.conn.set_trace_callback(statements.append)
    try:
        merger.merge(one_batch(source, ids[3:6]))  # new games only: the filter says so
        new_only = list(statements)
        merger.merge(one_batch(source, [ids[0], ids[6]]))  # one of them is held there
    finally:
        full.conn.set_trace_callback(None)
    lookups = [s for s in statements if "json_each" in s]
    assert lookups, statements
    assert not [s for s in new_only if "json_each" in s]
    # its ids were read once, for the filter, before: not again
    assert not [s for s in statements if s.startswith("SELECT") and "json_each" not in s
                and 'main."games"' in s]
    assert not {s: p for s in lookups if (p := plan_problems(full.conn, s))}
    # new games never write a full shard (a held game's late rows do, in the second merge)
    assert not any(s.startswith(("BEGIN", "INSERT")) for s in new_only)
    assert every_game(games_per_shard(synced)) == Counter(ids)


def test_a_db_found_full_stays_full_so_the_filter_never_misses_its_games(
        writer: SelfplayWriter, source: GameSource, merger: GameMerger, synced: Path) -> None:
    """Its size may drop below the bound again (the WAL file goes away when the last
    connection closes): games merged into it then would be missing from the filter."""
    ids = written(writer, source, 9)
    merger.merge(one_batch(source, ids[:3]))
    merger.merge(one_batch(source, ids[:3]))  # all held: found full, no new DB started
    filter_built(merger)  # the filter holds the first three
    merger._shard_bytes = 10 ** 12  # ... and under the bound again
    merger.merge(one_batch(source, ids[3:6]))
    merger._shard_bytes = 1
    merger.merge(one_batch(source, ids))  # a resend of everything, with three new games
    held = games_per_shard(synced)
    assert set(held[f"{KEY}.db"]) == set(ids[:3])
    assert every_game(held) == Counter(ids)


def test_the_held_filter_never_misses_and_rarely_says_maybe() -> None:
    held = HeldFilter(20_000)
    ids = [uuid.uuid4().hex for _ in range(20_000)]
    held.add(ids)
    assert all(held.may_hold(i) for i in ids)
    others = [uuid.uuid4().hex for _ in range(20_000)]
    false_positives = sum(held.may_hold(i) for i in others)
    assert false_positives < 200  # 16 bits and 4 probes per id: about 0.24 % expected


def test_a_restart_reads_the_saved_filter_instead_of_every_id(
        writer: SelfplayWriter, source: GameSource, merger: GameMerger, synced: Path) -> None:
    ids = written(writer, source, 9)
    merger.merge(one_batch(source, ids[:3]))
    merger.merge(one_batch(source, ids[3:6]))  # the first DB is full: its filter is built
    filter_built(merger)
    merger.close()
    assert held_filter_path(synced, KEY).is_file()

    again = GameMerger(synced, shard_bytes=1)
    try:
        full = again._target(synced / f"{KEY}.db")
        statements: list[str] = []
        full.conn.set_trace_callback(statements.append)
        result = again.merge(one_batch(source, ids))
        full.conn.set_trace_callback(None)
        assert again._shards[KEY].building is None  # nothing was rebuilt
    finally:
        again.close()
    assert (result.inserted, result.duplicates) == (3, 6)
    assert not [s for s in statements if s.startswith('SELECT "game_id" FROM main."games"')]
    assert every_game(games_per_shard(synced)) == Counter(ids)


def test_prepare_filter_builds_and_saves_it_before_any_merge(
        writer: SelfplayWriter, source: GameSource, merger: GameMerger, synced: Path) -> None:
    assert not merger.prepare_filter(KEY)  # no DB yet: nothing to filter
    ids = written(writer, source, 6)
    merger.merge(one_batch(source, ids[:3]))
    merger.merge(one_batch(source, ids[3:]))
    merger.close()
    held_filter_path(synced, KEY).unlink(missing_ok=True)
    fresh = GameMerger(synced, shard_bytes=1)
    try:
        assert fresh.prepare_filter(KEY)
    finally:
        fresh.close()
    saved = HeldFilter.load(held_filter_path(synced, KEY))
    assert saved is not None
    assert set(saved.covered) == {synced / f"{KEY}.db", synced / f"{KEY}+2.db"}
    assert all(saved.may_hold(i) for i in ids)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other-inode"])
def test_a_damaged_or_stale_saved_filter_is_rebuilt_and_nothing_is_duplicated(
        writer: SelfplayWriter, source: GameSource, merger: GameMerger, synced: Path,
        damage: str) -> None:
    ids = written(writer, source, 9)
    merger.merge(one_batch(source, ids[:3]))
    merger.merge(one_batch(source, ids[3:6]))
    filter_built(merger)
    merger.close()
    saved = held_filter_path(synced, KEY)
    if damage == "garbage":
        saved.write_bytes(b"\x00not a filter\n" * 10)
    elif damage == "truncated":
        saved.write_bytes(saved.read_bytes()[:-100])
    else:  # the first DB restored from a backup: another file, the same name
        first = synced / f"{KEY}.db"
        copy = first.with_name("copy")
        copy.write_bytes(first.read_bytes())
        copy.replace(first)

    again = GameMerger(synced, shard_bytes=1)
    try:
        result = again.merge(one_batch(source, ids))
        filter_built(again)
        assert (again.merge(one_batch(source, ids))).inserted == 0
    finally:
        again.close()
    assert (result.inserted, result.duplicates) == (3, 6)
    assert every_game(games_per_shard(synced)) == Counter(ids)
    assert HeldFilter.load(saved) is not None  # saved whole again


def test_a_db_taking_games_again_after_a_restart_is_no_longer_covered(
        writer: SelfplayWriter, source: GameSource, merger: GameMerger, synced: Path) -> None:
    """An operator raises RINGRIFT_MERGED_SHARD_MB: the newest DB, found full before, takes
    games again; the saved filter must stop claiming to cover it."""
    ids = written(writer, source, 9)
    merger.merge(one_batch(source, ids[:3]))
    merger.merge(one_batch(source, ids[:3]))  # found full, covered, saved
    filter_built(merger)
    merger.close()
    raised = GameMerger(synced, shard_bytes=10 ** 12)
    try:
        raised.merge(one_batch(source, ids[3:6]))  # into the first DB again
    finally:
        raised.close()
    lowered = GameMerger(synced, shard_bytes=1)
    try:
        result = lowered.merge(one_batch(source, ids))
    finally:
        lowered.close()
    assert (result.inserted, result.duplicates) == (3, 6)
    held = games_per_shard(synced)
    assert set(held[f"{KEY}.db"]) == set(ids[:6])
    assert every_game(held) == Counter(ids)


@pytest.mark.parametrize(("name", "parsed"), [
    ("hex8_2p.db", ("hex8_2p", 1)), ("hex8_2p+2.db", ("hex8_2p", 2)),
    ("sq.19_3p-x.db", ("sq.19_3p-x", 1)), ("hex8_2p+0.db", None), ("hex8_2p+x.db", None),
    (".hex8_2p.db.creating", None), (".hidden.db", None), ("notes.txt", None),
])
def test_shard_names(name: str, parsed: tuple[str, int] | None) -> None:
    assert parse_shard(name) == parsed
