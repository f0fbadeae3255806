"""A training host frozen mid-push (SIGSTOP) holds only its own games: real `ringsync run`
processes on loopback; the other trainer keeps receiving fresh games within seconds, and
after the freeze every game arrives exactly once at both."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ringsync.localcluster import Cluster, held_game_ids, wait_until
from ringsync.selfplay_sim import SelfplayWriter

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

NODES = [("selfplay-1", "gpu_selfplay"), ("train-1", "gpu_training_primary"),
         ("train-2", "nn_training_primary")]
STALL_S = 15.0  # well under the push's 120 s read timeout: the frozen push resumes, not fails
FRESH_WITHIN_S = 5.0  # how soon a game committed during the stall must reach train-1


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, NODES, sync_interval=30.0)  # commits (inotify) do the waking
    try:
        c.start_all()
        yield c
    finally:
        proc = c.nodes["train-2"].process
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGCONT)  # never leave a stopped process behind
        c.stop_all()


def held(cluster: Cluster, node: str) -> list[str]:
    return held_game_ids(cluster.nodes[node])


def test_a_frozen_trainer_never_holds_fresh_games_to_the_other(cluster: Cluster) -> None:
    source = cluster.nodes["selfplay-1"].data_dir / "games" / "hex8_2p.db"
    source.parent.mkdir(parents=True, exist_ok=True)
    frozen = cluster.nodes["train-2"].process
    assert frozen is not None
    with SelfplayWriter(source, seed=5, moves_per_game=40) as writer:
        before = [writer.write_game() for _ in range(20)]
        wait_until(lambda: all(set(before) <= set(held(cluster, t)) for t in ("train-1", "train-2")),
                   60, "the first games at both trainers")

        os.killpg(frozen.pid, signal.SIGSTOP)  # its pushes hang: connected, never answered
        stall_began = time.monotonic()
        during: list[str] = []
        latencies: list[float] = []
        while time.monotonic() - stall_began < STALL_S:
            fresh = [writer.write_game() for _ in range(5)]
            committed = time.monotonic()
            wait_until(lambda: set(fresh) <= set(held(cluster, "train-1")), 30,  # noqa: B023
                       "games committed during the stall at train-1")
            latencies.append(time.monotonic() - committed)
            during += fresh
            time.sleep(0.5)
        assert time.monotonic() - stall_began < STALL_S + FRESH_WITHIN_S  # not after the stall
        assert max(latencies) < FRESH_WITHIN_S, latencies
        assert len(latencies) >= 5

        os.killpg(frozen.pid, signal.SIGCONT)
        everything = before + during
        wait_until(lambda: set(everything) <= set(held(cluster, "train-2")), 120,
                   "the games owed to train-2 after the stall")
    for trainer in ("train-1", "train-2"):
        got = held(cluster, trainer)
        assert len(got) == len(set(got)), f"{trainer} holds duplicates"
        assert set(got) == set(everything), f"{trainer} holds a different set of games"
    for name in cluster.nodes:
        assert cluster.terminate(name) == 0, cluster.nodes[name].log_tail()
