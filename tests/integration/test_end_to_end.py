"""Four `ringsync run` processes on loopback; a selfplay writer process; games flow exactly once."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from ringsync.localcluster import Cluster, held_game_ids, read_game_ids, wait_until
from ringsync.selfplay_sim import SelfplayWriter

pytestmark = pytest.mark.slow

NODES = [
    ("selfplay-1", "gpu_selfplay"),
    ("train-1", "gpu_training_primary"),
    ("train-2", "nn_training_primary"),
    ("coordinator", "coordinator"),
]
TRAINERS = ("train-1", "train-2")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, NODES, sync_interval=30.0)  # inotify must do the waking
    try:
        c.start_all()
        yield c
    finally:
        c.stop_all()


def per_game_rows(db: Path) -> dict[str, Counter[str]]:
    """Rows per game in every table that has a game_id column."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        out: dict[str, Counter[str]] = {}
        for table in tables:
            cols = [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')]
            if "game_id" in cols:
                out[table] = Counter(dict(conn.execute(
                    f'SELECT game_id, count(*) FROM "{table}" GROUP BY game_id').fetchall()))
        return out
    finally:
        conn.close()


def merged_rows(node_games: Path) -> dict[str, Counter[str]]:
    total: dict[str, Counter[str]] = {}
    for db in node_games.rglob("*.db"):
        for table, counts in per_game_rows(db).items():
            total.setdefault(table, Counter()).update(counts)
    return total


def test_games_flow_exactly_once_to_both_trainers_and_never_to_the_coordinator(cluster: Cluster) -> None:
    source = cluster.nodes["selfplay-1"].data_dir / "games" / "hex8_2p.db"
    late = SelfplayWriter(source, seed=99, moves_per_game=30)
    late_games = [late.start_game() for _ in range(5)]
    writer = subprocess.run(
        [sys.executable, "-m", "ringsync.selfplay_sim", str(source), "--games", "1000",
         "--in-progress", "20", "--seed", "7"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert "completed 1000" in writer.stdout
    completed = read_game_ids(source, "WHERE game_status = 'completed'")
    in_progress = read_game_ids(source, "WHERE game_status = 'active'")
    assert len(completed) == 1000
    assert len(in_progress) == 25

    def arrived() -> bool:
        return all(len(held_game_ids(cluster.nodes[t])) >= 1000 for t in TRAINERS)

    wait_until(arrived, 120, "1000 games at both trainers")
    source_rows = per_game_rows(source)
    for trainer in TRAINERS:
        node = cluster.nodes[trainer]
        held = held_game_ids(node)
        assert len(held) == len(set(held)), f"{trainer} holds duplicates"
        assert set(held) == set(completed), f"{trainer} holds a different set of games"
        rows = merged_rows(node.data_dir / "games")
        for table, counts in source_rows.items():
            expected = Counter({g: n for g, n in counts.items() if g in set(completed)})
            assert rows.get(table, Counter()) == expected, f"{trainer}: rows of {table} differ"
    assert held_game_ids(cluster.nodes["coordinator"]) == []

    # The games left in progress complete much later: each arrives exactly once.
    for game in late_games:
        late.add_moves(game, 30)
        late.complete_game(game)
    late.close()
    wait_until(lambda: all(len(held_game_ids(cluster.nodes[t])) >= 1005 for t in TRAINERS),
               60, "late-completed games at both trainers")
    for trainer in TRAINERS:
        held = held_game_ids(cluster.nodes[trainer])
        assert len(held) == len(set(held)) == 1005
        assert set(late_games) <= set(held)
        assert not set(in_progress) - set(late_games) & set(held)
    assert held_game_ids(cluster.nodes["coordinator"]) == []

    # Trainers never push received games on as if they had generated them.
    for trainer in TRAINERS:
        manifest = cluster.nodes[trainer].data_dir / ".ringsync" / trainer / "manifest.db"
        assert read_count(manifest, "local_games") == 0

    for name in cluster.nodes:
        assert cluster.terminate(name) == 0, cluster.nodes[name].log_tail()


def read_count(db: Path, table: str) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()
