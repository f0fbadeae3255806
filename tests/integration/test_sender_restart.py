"""kill -9 of a sender queueing and shipping a backlog in chunks: nothing lost or duplicated,
and a restart resumes from the saved scan cursor instead of reading the history again."""

from __future__ import annotations

import os
import random
import re
import time
import urllib.request
from pathlib import Path

import pytest

from ringsync.localcluster import Cluster, held_game_ids, read_game_ids, wait_until
from ringsync.selfplay_sim import SelfplayWriter

pytestmark = pytest.mark.slow

NODES = [("selfplay-1", "gpu_selfplay"), ("train-1", "gpu_training_primary"),
         ("train-2", "nn_training_primary")]
TRAINERS = ("train-1", "train-2")


def write(db: Path, n: int, seed: int, pattern: str = "per-op") -> None:
    with SelfplayWriter(db, moves_per_game=6, seed=seed, pattern=pattern) as writer:
        for _ in range(n):
            writer.write_game()


def metric(cluster: Cluster, node: str, name: str) -> float:
    port = cluster.nodes[node].port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def converged(cluster: Cluster, completed: set[str]) -> bool:
    return all(set(held_game_ids(cluster.nodes[t])) >= completed for t in TRAINERS)


def test_kill_9_of_a_sender_during_a_chunked_backlog_loses_nothing(tmp_path: Path) -> None:
    seed = int(os.environ.get("RINGSYNC_TEST_SEED", str(time.time_ns() % 100_000)))
    rng = random.Random(seed)
    print(f"seed {seed} (RINGSYNC_TEST_SEED={seed} reproduces the schedule)")
    cluster = Cluster(tmp_path, NODES, sync_interval=1.0)
    sender = cluster.nodes["selfplay-1"]
    sender.extra_env["RINGRIFT_SCAN_CHUNK_ROWS"] = "100"  # the backlog is read in ~10 chunks
    source = sender.data_dir / "games" / "hex8_2p.db"
    source.parent.mkdir(parents=True)
    write(source, 1000, seed, pattern="long-lived")
    try:
        for trainer in TRAINERS:
            cluster.start(trainer)
        for trial in range(4):
            cluster.start("selfplay-1")
            time.sleep(rng.uniform(0.1, 1.5))
            cluster.kill("selfplay-1")
            write(source, rng.randint(0, 40), seed + trial + 1)  # games made while it is down
        cluster.start("selfplay-1")
        completed = set(read_game_ids(source, "WHERE game_status = 'completed'"))
        wait_until(lambda: converged(cluster, completed), 180, "every game at both trainers")
        for trainer in TRAINERS:
            held = held_game_ids(cluster.nodes[trainer])
            assert len(held) == len(set(held)), f"{trainer}: duplicated games"
            assert set(held) == completed, f"{trainer}: games it should not have"

        # A clean restart resumes at the saved cursor: only the rows added since are read.
        assert cluster.terminate("selfplay-1") == 0
        write(source, 7, seed + 100)
        cluster.start("selfplay-1")
        completed = set(read_game_ids(source, "WHERE game_status = 'completed'"))
        wait_until(lambda: converged(cluster, completed), 60, "the new games at both trainers")
        assert metric(cluster, "selfplay-1", "ringsync_source_rows_scanned_total") == 7
        assert metric(cluster, "selfplay-1", "ringsync_source_rows_rescanned_total") == 0
    finally:
        cluster.stop_all()
