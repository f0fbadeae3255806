"""Issue 7: kill -9 of a receiver whose merged DB holds a million games, during merges."""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest

from ringsync.localcluster import Cluster, read_game_ids, wait_until
from ringsync.protocol.batch import config_key_for
from tests.integration.bigdb import build_history_db
from tests.integration.test_crash import start_writer

pytestmark = pytest.mark.slow

SENDER, RECEIVER = "selfplay-1", "train-1"
HISTORY = int(os.environ.get("RINGSYNC_TEST_SCALE_GAMES", "1000000"))
KILLS = int(os.environ.get("RINGSYNC_TEST_SCALE_KILLS", "5"))
BACKLOG = 3000


def quick_check(db: Path) -> str:
    with closing(sqlite3.connect(db)) as conn:
        return str(conn.execute("PRAGMA quick_check").fetchone()[0])


def merged_counts(db: Path) -> tuple[int, int]:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        count, distinct = conn.execute("SELECT count(*), count(DISTINCT game_id) FROM games").fetchone()
        return int(count), int(distinct)


def test_kill_9_during_merges_into_a_million_game_db(tmp_path: Path) -> None:
    seed = int(os.environ.get("RINGSYNC_TEST_SEED", str(time.time_ns() % 100_000)))
    rng = random.Random(seed)
    print(f"crash-at-scale seed {seed} (RINGSYNC_TEST_SEED={seed} reproduces the schedule)")
    cluster = Cluster(tmp_path, [(SENDER, "gpu_selfplay"), (RECEIVER, "gpu_training_primary")],
                      sync_interval=2.0)
    merged = (cluster.nodes[RECEIVER].data_dir / "games" / "synced" / RECEIVER
              / f"{config_key_for('hex8', 2)}.db")
    build_history_db(merged, HISTORY)
    source = cluster.nodes[SENDER].data_dir / "games" / "hex8_2p.db"
    source.parent.mkdir(parents=True)
    # A backlog the receiver is merging when the kills come, then a live writer.
    subprocess.run([sys.executable, "-m", "ringsync.selfplay_sim", str(source), "--games",
                    str(BACKLOG), "--pattern", "long-lived", "--moves", "20", "--seed", "7"],
                   check=True, capture_output=True, timeout=120)
    writer = start_writer(source, rate=100)
    try:
        cluster.start(RECEIVER)
        cluster.start(SENDER)
        for kill in range(KILLS):
            time.sleep(rng.uniform(0.2, 1.5))
            cluster.kill(RECEIVER)
            assert quick_check(merged) == "ok", f"kill {kill}"
            time.sleep(rng.uniform(0.0, 0.3))
            cluster.start(RECEIVER)
            print(f"kill {kill}: receiver killed and restarted, {merged_counts(merged)[0]} games held")
        writer.terminate()
        writer.wait(30)
        sent = set(read_game_ids(source, "WHERE game_status = 'completed'"))
        assert len(sent) > BACKLOG
        wait_until(lambda: merged_counts(merged)[0] >= HISTORY + len(sent), 60,
                   f"{len(sent)} games merged after {KILLS} kills")
        cluster.kill(RECEIVER)
        with closing(sqlite3.connect(merged)) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            held = {r[0] for r in conn.execute("SELECT game_id FROM games WHERE source <> 'history' "
                                               "OR source IS NULL")}
        count, distinct = merged_counts(merged)
        assert count == distinct == HISTORY + len(sent), "a game is duplicated or one is missing"
        assert held == sent, f"{len(sent - held)} lost, {len(held - sent)} unexpected"
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        cluster.stop_all()
