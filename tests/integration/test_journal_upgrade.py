"""A node upgraded from a ringsync that kept file sync's journal in its own files.db: the
journal is imported once, the interrupted download resumes from its journalled bytes, and
games and files are then recorded in the node's one journal (issue 8 §4)."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from ringsync.localcluster import Cluster, held_game_ids, read_game_ids, wait_until
from ringsync.selfplay_sim import SelfplayWriter
from tests.integration.test_file_sync import (
    MIB,
    digest,
    journal_done,
    make_cluster,
    metric,
    models,
    old_file,
    start,
)
from tests.unit.test_journal import LEGACY_SCHEMA

__all__ = ["make_cluster"]  # the fixture, shared with test_file_sync
pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


def as_an_older_node_kept_it(state: Path) -> int:
    """Move file sync's tables out of the journal into files.db, as ringsync kept them
    before the one journal; returns the bytes its transfer journal says are on disk."""
    legacy = state / "files.db"
    with closing(sqlite3.connect(legacy, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(LEGACY_SCHEMA)
        db.execute("ATTACH ? AS journal", (str(state / "manifest.db"),))
        db.execute("BEGIN")
        for table in ("files", "gone", "transfers"):
            db.execute(f"INSERT INTO main.{table} SELECT * FROM journal.{table}")
        for table in ("files", "gone", "transfers", "journal_imports"):
            db.execute(f"DROP TABLE journal.{table}")
        db.execute("COMMIT")
        return int(db.execute("SELECT max(done) FROM main.transfers").fetchone()[0])


def test_an_upgraded_node_imports_files_db_and_resumes_its_download_from_it(
        make_cluster: type[Cluster]) -> None:
    cluster = make_cluster([("train-1", "gpu_training_primary"), ("selfplay-1", "gpu_selfplay")])
    size = 120 * MIB
    model = models(cluster, "train-1") / "candidate_hex8_4p.pth"
    expected = old_file(model, size)
    games = cluster.nodes["selfplay-1"].data_dir / "games" / "hex8_2p.db"
    games.parent.mkdir(parents=True, exist_ok=True)
    with SelfplayWriter(games, moves_per_game=6, seed=5) as writer:
        for _ in range(20):
            writer.write_game()
    completed = set(read_game_ids(games, "WHERE game_status = 'completed'"))
    cluster.nodes["train-1"].extra_env["RINGRIFT_BANDWIDTH_LIMIT_MBPS"] = "240"  # 30 MB/s: ~4 s
    start(cluster, "train-1", "selfplay-1")
    wait_until(lambda: journal_done(cluster, "selfplay-1") >= 32 * MIB, 30, "a quarter downloaded")
    cluster.kill("selfplay-1")
    state = cluster.nodes["selfplay-1"].data_dir / ".ringsync" / "selfplay-1"
    done = as_an_older_node_kept_it(state)
    assert 32 * MIB <= done < size

    start(cluster, "selfplay-1")
    received = models(cluster, "selfplay-1") / model.name
    wait_until(received.is_file, 30, "the resumed download published")
    assert digest(received) == expected
    assert metric(cluster, "selfplay-1", "ringsync_file_bytes_fetched_total") == size - done
    log = cluster.nodes["selfplay-1"].log_path.read_text()
    assert "into the node journal (files: " in log
    assert sorted(p.name for p in state.iterdir() if p.name.startswith("files.db")) == []

    wait_until(lambda: set(held_game_ids(cluster.nodes["train-1"])) >= completed, 30,
               "the games at train-1")
    with closing(sqlite3.connect(f"file:{state / 'manifest.db'}?mode=ro", uri=True)) as db:
        def acked() -> int:
            return int(db.execute("SELECT count(*) FROM local_games WHERE held <> 0").fetchone()[0])
        wait_until(lambda: acked() == len(completed), 10, "the games acknowledged in the journal")
        assert db.execute("SELECT hash FROM files WHERE relpath = ?",
                          (model.name,)).fetchone() is not None
        assert db.execute("SELECT count(*) FROM transfers").fetchone()[0] == 0
        assert [r[0] for r in db.execute("SELECT name FROM journal_imports")] == ["files.db"]
