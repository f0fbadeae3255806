"""A RingRift node's real mix of writers under four `ringsync run` nodes, also across kill -9.

The selfplay node's data dir is laid out as RingRift's ``ai-service/data``: a SelfplayRunner DB
in ``games/``, a P2P job DB under ``selfplay/p2p/<config>/<job>/`` written incrementally by two
concurrent GameWriters, a GPU selfplay JSONL log under ``selfplay/p2p_gpu/…`` and a Gumbel JSONL
log whose games are also rows of the job DB. Every DB writer opens a connection per operation,
so each close may checkpoint and delete the WAL under ringsync. Games are finished late,
aborted, truncated, left behind by a killed writer, or changed after completion.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ringsync.jsonl_sim import append_gumbel_line, gumbel_record
from ringsync.localcluster import Cluster, held_game_ids, wait_until
from tests.integration.test_crash import TRIALS, kill_9_trials
from tests.integration.test_end_to_end import NODES, TRAINERS, merged_rows, per_game_rows

pytestmark = pytest.mark.slow

JOB_DB = "selfplay/p2p/square8_2p/job-1/games.db"
RUNNER_DB = "games/hex8_2p.db"
GPU_DIR = "selfplay/p2p_gpu/hex8_2p/job-2"
GUMBEL_LOG = "selfplay/gumbel_square8_2p.jsonl"
JOB_MOVES = 12
# An ERROR line is a defect here; a WARNING may be expected (e.g. a peer killed mid-push).
ERROR_LINE = re.compile(r"^\S+ \S+ ERROR |^ERROR ", re.MULTILINE)


@dataclass
class Workload:
    """The writers of one selfplay node and what they say they wrote."""

    data: Path
    out: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    partial_id: str = ""
    partial_done: bool = False
    _rest: str = ""

    def start(self, *, paced: bool) -> None:
        sim = [sys.executable, "-m", "ringsync.selfplay_sim"]
        # Paced, the writers outlast the kill -9 trials (about 30 s).
        runner_rate = ["--rate", "5"] if paced else []
        job_rate = ["--rate", "1.5"] if paced else []
        gpu_rate = ["--rate", "3"] if paced else ["--rate", "300"]
        self.procs["runner"] = self._spawn(
            [*sim, str(self.data / RUNNER_DB), "--games", "150", "--moves", "20",
             "--in-progress", "2", "--p-late", "0.1", "--seed", "1", *runner_rate,
             "--summary", str(self.out / "runner.json")])
        self.procs["job"] = self._spawn(
            [*sim, str(self.data / JOB_DB), "--board-type", "square8", "--games", "40",
             "--moves", str(JOB_MOVES), "--mode", "incremental", "--writers", "2",
             "--p-aborted", "0.1", "--p-truncated", "0.1", "--p-killed", "0.05", "--p-late", "0.1",
             "--seed", "2", *job_rate, "--summary", str(self.out / "job.json")])
        self.procs["gpu"] = self._spawn(
            [sys.executable, "-m", "ringsync.jsonl_sim", str(self.data / GPU_DIR), "--games", "80",
             "--cut-off", "8", "--seed", "3", *gpu_rate, "--summary", str(self.out / "gpu.json")])

    def _spawn(self, cmd: list[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)

    def wait(self, timeout: float = 240) -> None:
        for name, proc in self.procs.items():
            _, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"writer {name} failed: {err.decode(errors='replace')}"

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def write_logs(self) -> None:
        """The JSONL logs of the job DB's games, as the Gumbel and soak scripts append them.

        Gumbel: one line per game (open/append/close, no lock), truncated games "active",
        a malformed line (counted, skipped). Soak: ``games.jsonl`` in the job dir, a line
        per attempt with ``db_game_id`` (the DB row's id) and failed attempts. Last, half
        of the line of a game only the Gumbel log has: a partial line must wait.
        """
        job = self.summary("job")
        rng = random.Random(4)
        log = self.data / GUMBEL_LOG
        for gid in job["completed"]:
            append_gumbel_line(log, gumbel_record(rng, gid, board="square8", moves=JOB_MOVES))
        for gid in job["truncated"]:
            append_gumbel_line(log, gumbel_record(rng, gid, board="square8", moves=JOB_MOVES,
                                                  truncated=True))
        with log.open("a") as fh:
            fh.write('{"game_id": "broken", "board_type": \n')
        soak = self.data / Path(JOB_DB).with_name("games.jsonl")
        with soak.open("a") as fh:
            for index, gid in enumerate(job["completed"]):
                fh.write(json.dumps(_soak_line(rng, index, gid, "completed")) + "\n")
            fh.write(json.dumps(_soak_line(rng, len(job["completed"]), None, "error")) + "\n")
        self.partial_id = str(uuid.uuid4())
        text = json.dumps(gumbel_record(rng, self.partial_id, board="square8", moves=JOB_MOVES))
        half = len(text) // 2
        with log.open("a") as fh:
            fh.write(text[:half])
        self._rest = text[half:] + "\n"

    def finish_partial_line(self) -> None:
        with (self.data / GUMBEL_LOG).open("a") as fh:
            fh.write(self._rest)
        self.partial_done = True

    def summary(self, name: str) -> dict[str, list[str]]:
        data: dict[str, list[str]] = json.loads((self.out / f"{name}.json").read_text())
        return data

    def gpu_ids(self, key: str) -> set[str]:
        gpu = json.loads((self.out / "gpu.json").read_text())
        rel = Path(gpu["file"]).relative_to(self.data).as_posix()
        return {f"selfplay-1:{rel}:{gid}" for gid in gpu[key]}

    def expected(self) -> set[str]:
        partial = {self.partial_id} if self.partial_done else set()
        return (set(self.summary("runner")["completed"]) | set(self.summary("job")["completed"])
                | self.gpu_ids("finished") | partial)

    def never(self) -> set[str]:
        runner, job = self.summary("runner"), self.summary("job")
        return (set(runner["in_progress"]) | set(job["aborted"]) | set(job["truncated"])
                | set(job["killed"]) | set(job["in_progress"]) | self.gpu_ids("cut_off"))


@pytest.fixture
def workload(tmp_path: Path) -> Iterator[Workload]:
    w = Workload(tmp_path / "selfplay-1" / "data", tmp_path)
    try:
        yield w
    finally:
        w.kill()


def _soak_line(rng: random.Random, index: int, db_game_id: str | None,
               status: str) -> dict[str, object]:
    """A line of run_self_play_soak.py --log-jsonl: an attempt, no game_id or timestamps."""
    failed = status != "completed"
    return {"index": index, "board_type": "square8", "num_players": 2, "seed": rng.randint(0, 9999),
            "length": 0 if failed else JOB_MOVES, "status": status,
            "winner": None if failed else 1, "termination_reason": status, "skipped": failed,
            "victory_type": None if failed else "territory",
            "moves": [] if failed else [{"type": "move_stack", "player": m % 2 + 1}
                                        for m in range(JOB_MOVES)],
            "initial_state": {}, "db_game_id": db_game_id}


def expected_rows(w: Workload) -> dict[str, Counter[str]]:
    """Rows per table per game that the trainers must hold: the DBs' rows, the GPU games' lines."""
    expected = w.expected()
    rows: dict[str, Counter[str]] = {}
    for db in (w.data / RUNNER_DB, w.data / JOB_DB):
        for table, counts in per_game_rows(db).items():
            keep = Counter({g: n for g, n in counts.items() if g in expected})
            rows.setdefault(table, Counter()).update(keep)
    gpu = w.gpu_ids("finished")
    for table, n in (("games", 1), ("game_moves", 40), ("game_initial_state", 1)):
        rows.setdefault(table, Counter()).update({g: n for g in gpu})
    if w.partial_done:
        for table, n in (("games", 1), ("game_moves", JOB_MOVES), ("game_initial_state", 1)):
            rows.setdefault(table, Counter())[w.partial_id] = n
    return {t: c for t, c in rows.items() if c}


def assert_delivered(cluster: Cluster, w: Workload) -> None:
    expected, never = w.expected(), w.never()
    rows = expected_rows(w)
    for trainer in TRAINERS:
        node = cluster.nodes[trainer]
        held = held_game_ids(node)
        dupes = [g for g, n in Counter(held).items() if n > 1]
        assert not dupes, f"{trainer} holds {len(dupes)} games twice, e.g. {dupes[:3]}"
        assert set(held) == expected, (
            f"{trainer}: {len(expected - set(held))} lost, {len(set(held) - expected)} unexpected")
        assert not set(held) & never
        got = merged_rows(node.data_dir / "games")
        for table, counts in rows.items():
            missing = counts - got.get(table, Counter())
            extra = got.get(table, Counter()) - counts
            assert not missing, (f"{trainer}: table {table}: {sum(missing.values())} rows "
                                 f"missing, e.g. for {list(missing)[:2]}")
            assert not extra, f"{trainer}: table {table}: {sum(extra.values())} rows too many"
    assert held_game_ids(cluster.nodes["coordinator"]) == []


def assert_no_error_lines(cluster: Cluster) -> None:
    for node in cluster.nodes.values():
        text = node.log_path.read_text(errors="replace") if node.log_path.exists() else ""
        errors = ERROR_LINE.findall(text)
        assert not errors, f"{node.name} logged errors:\n{node.log_tail(60)}"


def test_every_completed_game_of_a_ringrift_node_arrives_once_with_all_its_rows(
        tmp_path: Path, workload: Workload) -> None:
    cluster = Cluster(tmp_path, NODES, sync_interval=5.0)
    try:
        cluster.start_all()
        workload.start(paced=False)
        workload.wait()
        workload.write_logs()
        expected = workload.expected()
        assert len(expected) > 200
        job = workload.summary("job")
        for outcome in ("aborted", "truncated", "killed", "late"):
            assert job[outcome], f"the job writer should also leave {outcome} games"
        assert workload.summary("runner")["late"]
        wait_until(lambda: all(set(held_game_ids(cluster.nodes[t])) >= expected for t in TRAINERS),
                   120, f"{len(expected)} games at both trainers")
        assert_partial_line_waits(cluster, workload)
        # Late rows (feature caches added after completion) follow their games.
        wait_until(lambda: _late_rows_arrived(cluster, workload), 60, "late rows at both trainers")
        assert_delivered(cluster, workload)
        for name in cluster.nodes:
            assert cluster.terminate(name) == 0, cluster.nodes[name].log_tail()
        assert_no_error_lines(cluster)
    finally:
        cluster.stop_all()


def assert_partial_line_waits(cluster: Cluster, w: Workload) -> None:
    """The unterminated last line ships only once its writer finishes it."""
    time.sleep(1.5)  # several event-driven cycles, each would have shipped it
    for t in TRAINERS:
        assert w.partial_id not in held_game_ids(cluster.nodes[t])
    w.finish_partial_line()
    wait_until(lambda: all(w.partial_id in held_game_ids(cluster.nodes[t]) for t in TRAINERS),
               60, "the finished line's game at both trainers")


def _late_rows_arrived(cluster: Cluster, w: Workload) -> bool:
    want = expected_rows(w).get("game_nnue_features", Counter())
    return all(merged_rows(cluster.nodes[t].data_dir / "games").get("game_nnue_features", Counter())
               >= want for t in TRAINERS)


def test_the_same_across_kill_9_of_the_sender_and_the_receivers(
        tmp_path: Path, workload: Workload) -> None:
    seed = int(os.environ.get("RINGSYNC_TEST_SEED", str(time.time_ns() % 100_000)))
    rng = random.Random(seed)
    print(f"crash test seed {seed} (RINGSYNC_TEST_SEED={seed} reproduces the schedule)")
    cluster = Cluster(tmp_path, NODES, sync_interval=2.0)
    try:
        cluster.start_all()
        workload.start(paced=True)
        kill_9_trials(cluster, rng, [name for name, _ in NODES if name != "coordinator"], TRIALS)
        still_writing = [n for n, p in workload.procs.items() if p.poll() is None]
        print(f"writers still running after the trials: {still_writing}")
        workload.wait()
        workload.write_logs()
        expected = workload.expected()
        wait_until(lambda: all(set(held_game_ids(cluster.nodes[t])) >= expected for t in TRAINERS),
                   180, f"{len(expected)} games at both trainers after the crashes")
        assert_partial_line_waits(cluster, workload)
        wait_until(lambda: _late_rows_arrived(cluster, workload), 60, "late rows at both trainers")
        assert_delivered(cluster, workload)
    finally:
        for node in cluster.nodes.values():
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        cluster.stop_all()
