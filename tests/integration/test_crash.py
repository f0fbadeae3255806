"""kill -9 at random moments, restart: nothing lost, nothing duplicated, nothing partial."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from ringsync.localcluster import Cluster, held_game_ids, read_game_ids, wait_until
from tests.integration.test_end_to_end import merged_rows, per_game_rows

pytestmark = pytest.mark.slow

NODES = [("selfplay-1", "gpu_selfplay"), ("train-1", "gpu_training_primary"),
         ("train-2", "nn_training_primary")]
TRAINERS = ("train-1", "train-2")
TRIALS = int(os.environ.get("RINGSYNC_TEST_CRASH_TRIALS", "20"))


def start_writer(db: Path, *, rate: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "ringsync.selfplay_sim", str(db), "--games", "1000000",
         "--rate", str(rate), "--moves", "40", "--in-progress", "3"],
        stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )


def assert_databases_intact(cluster: Cluster, name: str) -> None:
    """After a crash every merged DB opens, passes integrity_check, and every game is whole."""
    for db in (cluster.nodes[name].data_dir / "games").rglob("*.db"):
        conn = sqlite3.connect(db)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok", db
        finally:
            conn.close()


def assert_converged(cluster: Cluster, source: Path) -> None:
    completed = set(read_game_ids(source, "WHERE game_status = 'completed'"))
    source_rows = per_game_rows(source)
    for trainer in TRAINERS:
        node = cluster.nodes[trainer]
        held = held_game_ids(node)
        assert len(held) == len(set(held)), f"{trainer}: duplicated games"
        assert set(held) == completed, (
            f"{trainer}: {len(completed - set(held))} lost, {len(set(held) - completed)} unexpected")
        rows = merged_rows(node.data_dir / "games")
        for table, counts in source_rows.items():
            expected = Counter({g: n for g, n in counts.items() if g in completed})
            assert rows.get(table, Counter()) == expected, f"{trainer}: partial/duplicated {table} rows"


def kill_9_trials(cluster: Cluster, rng: random.Random, victims: list[str], trials: int) -> None:
    """kill -9 a random victim at a random moment, check the receivers' DBs, restart it."""
    for trial in range(trials):
        victim = rng.choice(victims)
        time.sleep(rng.uniform(0.05, 0.6))
        cluster.kill(victim)
        if victim in TRAINERS:
            assert_databases_intact(cluster, victim)
        time.sleep(rng.uniform(0.0, 0.3))
        cluster.start(victim)
        print(f"trial {trial}: killed and restarted {victim}")


def test_random_kill_9_of_sender_and_receivers(tmp_path: Path) -> None:
    seed = int(os.environ.get("RINGSYNC_TEST_SEED", str(time.time_ns() % 100_000)))
    rng = random.Random(seed)
    print(f"crash test seed {seed} (RINGSYNC_TEST_SEED={seed} reproduces the schedule)")
    cluster = Cluster(tmp_path, NODES, sync_interval=2.0)
    # train-2 starts a new merged DB every MiB: kills land while shards fill up and start
    cluster.nodes["train-2"].extra_env["RINGRIFT_MERGED_SHARD_MB"] = "1"
    source = cluster.nodes["selfplay-1"].data_dir / "games" / "hex8_2p.db"
    source.parent.mkdir(parents=True)
    writer = start_writer(source, rate=150)
    try:
        cluster.start_all()
        kill_9_trials(cluster, rng, [name for name, _ in NODES], TRIALS)
        writer.send_signal(signal.SIGTERM)
        writer.wait(30)
        completed = len(read_game_ids(source, "WHERE game_status = 'completed'"))
        assert completed > 100, "the writer should have completed games during the trials"
        wait_until(lambda: all(len(held_game_ids(cluster.nodes[t])) >= completed for t in TRAINERS),
                   120, f"{completed} games at both trainers after the crashes")
        assert_converged(cluster, source)
        shards = list((cluster.nodes["train-2"].data_dir / "games" / "synced").rglob("*+*.db"))
        assert shards, "train-2 never started a second merged DB: the shard case went untested"
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        cluster.stop_all()


def test_sigterm_drains_within_the_bound_and_restart_resumes(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, NODES, sync_interval=2.0)
    source = cluster.nodes["selfplay-1"].data_dir / "games" / "hex8_2p.db"
    source.parent.mkdir(parents=True)
    # A backlog written before any node starts: nobody else holds the DB, so the writer
    # pattern changes nothing for ringsync, and a long-lived connection writes it 10x faster.
    subprocess.run([sys.executable, "-m", "ringsync.selfplay_sim", str(source), "--games", "3000",
                    "--pattern", "long-lived",
                    "--moves", "40", "--seed", "5"], check=True, capture_output=True, timeout=300)
    try:
        for trainer in TRAINERS:
            cluster.start(trainer)
        cluster.start("selfplay-1")
        time.sleep(0.3)  # mid-backlog
        started = time.monotonic()
        assert cluster.terminate("selfplay-1", timeout=30) == 0
        drain_bound = 10.0 + 5.0  # RINGRIFT_DRAIN_TIMEOUT default plus process exit
        assert time.monotonic() - started < drain_bound
        log = cluster.nodes["selfplay-1"].log_tail(200)
        assert "stopping: draining" in log
        assert "stopped:" in log
        cluster.start("selfplay-1")
        wait_until(lambda: all(len(held_game_ids(cluster.nodes[t])) >= 3000 for t in TRAINERS),
                   120, "3000 games at both trainers after the restart")
        assert_converged(cluster, source)
    finally:
        cluster.stop_all()
