"""One journal per node: game outboxes and file-sync intents in one SQLite file, and the
one-time import of the files.db an older ringsync kept apart (ringsync.files.manifest)."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from contextlib import closing
from pathlib import Path

import pytest

import ringsync
from ringsync.errors import CorruptDataError
from ringsync.files.kinds import FileKind
from ringsync.files.manifest import LEGACY_NAME, FileManifest, FileRecord, Transfer
from ringsync.store.manifest import JOURNAL_NAME, DataManifest, LocalGame

pytestmark = pytest.mark.timeout(60)

M, T = FileKind.MODELS, FileKind.TRAINING_DATA
# The schema of files.db as ringsync wrote it before the journal held file sync's tables.
LEGACY_SCHEMA = """
CREATE TABLE files (kind TEXT NOT NULL, relpath TEXT NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, hash TEXT NOT NULL, link_target TEXT,
    PRIMARY KEY (kind, relpath)) WITHOUT ROWID;
CREATE INDEX files_by_hash ON files (hash);
CREATE TABLE gone (kind TEXT NOT NULL, relpath TEXT NOT NULL, hash TEXT NOT NULL,
    gone_at REAL NOT NULL, PRIMARY KEY (kind, relpath, hash)) WITHOUT ROWID;
CREATE TABLE transfers (kind TEXT NOT NULL, relpath TEXT NOT NULL, hash TEXT NOT NULL,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, done INTEGER NOT NULL,
    source TEXT NOT NULL, PRIMARY KEY (kind, relpath)) WITHOUT ROWID;
"""
RECORDS = [FileRecord(M, "canonical_hex8_2p.pth", 4096, 11, 101, "a" * 64),
           FileRecord(M, "ringrift_best_hex8_2p.pth", 0, 12, 102, "", "canonical_hex8_2p.pth"),
           FileRecord(T, "hex8_2p.npz", 9000, 13, 103, "b" * 64)]
IN_FLIGHT = Transfer(M, "candidate_square19_4p.pth", "c" * 64, 300 << 20, 14, 160 << 20, "train-1")
GONE_HASH = "d" * 64


def write_legacy(path: Path) -> None:
    """files.db as an older ringsync left it when killed -9: rows still in its WAL."""
    script = textwrap.dedent(f"""
        import os, signal, sqlite3, sys, time
        db = sqlite3.connect(sys.argv[1], isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript({LEGACY_SCHEMA!r})
        db.executemany("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?)", {[
            (r.kind.value, r.relpath, r.size, r.mtime_ns, r.inode, r.hash, r.link_target)
            for r in RECORDS]!r})
        db.execute("INSERT INTO gone VALUES ('models', 'old.pth', ?, ?)", ({GONE_HASH!r}, time.time()))
        db.execute("INSERT INTO transfers VALUES (?, ?, ?, ?, ?, ?, ?)", {(
            IN_FLIGHT.kind.value, IN_FLIGHT.relpath, IN_FLIGHT.hash, IN_FLIGHT.size,
            IN_FLIGHT.mtime_ns, IN_FLIGHT.done, IN_FLIGHT.source)!r})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", script, str(path)], timeout=30)
    assert done.returncode == -signal.SIGKILL
    assert Path(f"{path}-wal").stat().st_size > 0  # the rows are only in the WAL


def assert_imported(journal: Path) -> None:
    m = FileManifest(journal)
    try:
        assert m.records() == sorted(RECORDS, key=lambda r: (r.kind.value, r.relpath))
        assert m.transfers() == [IN_FLIGHT]
        assert m.gone() == {(M, "old.pth", GONE_HASH)}
    finally:
        m.close()
    assert leftovers(journal) == []
    assert import_marks(journal) == [LEGACY_NAME]


def leftovers(journal: Path) -> list[str]:
    return sorted(p.name for p in journal.parent.iterdir() if p.name.startswith(LEGACY_NAME))


def import_marks(journal: Path) -> list[str]:
    with closing(sqlite3.connect(journal)) as db:
        return [r[0] for r in db.execute("SELECT name FROM journal_imports")]


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    write_legacy(state / LEGACY_NAME)
    return state / JOURNAL_NAME


def test_an_old_files_db_is_imported_with_its_in_flight_transfer_and_removed(
        journal: Path, caplog: pytest.LogCaptureFixture) -> None:
    games = DataManifest(journal)  # as a node starts: the game manifest opens the journal first
    try:
        games.record_discovered([LocalGame("g1", "sp.db", "hex8_2p")], ["train-1"])
        with caplog.at_level(logging.INFO, "ringsync.files.manifest"):
            assert_imported(journal)
        assert "transfers: 1 rows" in caplog.text
        assert [g.game_id for g in games.pending("train-1", 10)] == ["g1"]
    finally:
        games.close()


def test_the_import_runs_once_a_stale_files_db_found_later_is_only_removed(journal: Path) -> None:
    FileManifest(journal).close()
    m = FileManifest(journal)
    m.forget(M, "canonical_hex8_2p.pth")
    m.publish(RECORDS[0])
    m.forget(T, "hex8_2p.npz")
    m.close()
    write_legacy(journal.with_name(LEGACY_NAME))  # as if the removal had not happened
    m = FileManifest(journal)
    try:
        assert m.get(T, "hex8_2p.npz") is None  # not brought back by the old rows
        assert m.transfers() == [IN_FLIGHT]
    finally:
        m.close()
    assert leftovers(journal) == []


CRASH_AT = {
    # killed inside the import transaction, rows copied but not committed
    "before-commit": "orig = m._copy_legacy\n"
                     "def step(db, legacy):\n"
                     "    orig(db, legacy)\n"
                     "    os.kill(os.getpid(), signal.SIGKILL)\n"
                     "m._copy_legacy = step\n",
    # committed (rows and mark), the old file not yet removed
    "after-commit": "m._remove_legacy = lambda legacy: os.kill(os.getpid(), signal.SIGKILL)\n",
    # the old main file removed, its sidecars not
    "mid-removal": "def step(legacy):\n"
                   "    Path(f'{legacy}-wal').write_bytes(b'x' * 4096)\n"
                   "    legacy.unlink()\n"
                   "    os.kill(os.getpid(), signal.SIGKILL)\n"
                   "m._remove_legacy = step\n",
}


@pytest.mark.parametrize("step", sorted(CRASH_AT))
def test_a_kill_9_at_any_step_of_the_import_is_completed_by_the_next_open(
        journal: Path, step: str) -> None:
    script = ("import os, signal, sys\nfrom pathlib import Path\n"
              "import ringsync.files.manifest as m\n" + CRASH_AT[step] +
              "m.FileManifest(Path(sys.argv[1]))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(ringsync.__file__).parent.parent)}
    done = subprocess.run([sys.executable, "-c", script, str(journal)], env=env, timeout=30)
    assert done.returncode == -signal.SIGKILL
    marked = import_marks(journal)
    assert marked == ([] if step == "before-commit" else [LEGACY_NAME])
    left = leftovers(journal)
    assert (LEGACY_NAME in left) == (step != "mid-removal")
    assert left != []
    assert_imported(journal)


def test_an_unreadable_old_files_db_is_moved_aside_and_the_journal_opens(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    legacy = tmp_path / LEGACY_NAME
    legacy.write_bytes(b"not a database" * 500)
    with caplog.at_level(logging.ERROR, "ringsync.files.manifest"):
        m = FileManifest(tmp_path / JOURNAL_NAME)
    try:
        assert m.records() == []
        assert m.transfers() == []
    finally:
        m.close()
    assert "old file manifest" in caplog.text
    assert "moved it to" in caplog.text
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(f"{LEGACY_NAME}.corrupt-")]
    assert len(aside) == 1
    assert aside[0].read_bytes().startswith(b"not a database")
    assert not legacy.exists()
    assert import_marks(tmp_path / JOURNAL_NAME) == []


def test_a_corrupt_journal_is_refused_with_the_fix_and_left_alone(tmp_path: Path) -> None:
    journal = tmp_path / JOURNAL_NAME
    garbage = b"this is not a database" * 200
    journal.write_bytes(garbage)
    with pytest.raises(CorruptDataError) as err:
        FileManifest(journal)
    assert str(journal) in str(err.value)
    assert "move" in str(err.value)
    assert "aside" in str(err.value)
    assert journal.read_bytes() == garbage
    assert sorted(p.name for p in tmp_path.iterdir()) == [JOURNAL_NAME]
    # ...and a node start, which opens the game manifest first, moves it aside.
    DataManifest(journal).close()
    FileManifest(journal).close()
    assert any(p.name.startswith(f"{JOURNAL_NAME}.corrupt-") for p in tmp_path.iterdir())


def test_game_acks_and_file_checkpoints_write_the_one_journal_at_once(tmp_path: Path) -> None:
    journal = tmp_path / JOURNAL_NAME
    games, files = DataManifest(journal), FileManifest(journal)
    errors: list[BaseException] = []

    def acks() -> None:
        try:
            for i in range(300):
                gid = f"g{i:04d}"
                games.record_discovered([LocalGame(gid, "sp.db", "hex8_2p")], ["train-1"])
                games.ack("train-1", [gid])
        except BaseException as exc:  # reported by the assert below
            errors.append(exc)

    def checkpoints() -> None:
        try:
            for i in range(300):
                files.save_transfer(Transfer(M, f"m{i % 7}.pth", "e" * 64, 1 << 30, 1, i << 20, "p"))
                if i % 50 == 0:
                    files.publish(FileRecord(M, f"m{i % 7}.pth", 1 << 30, 1, i, "e" * 64))
        except BaseException as exc:  # reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=acks), threading.Thread(target=checkpoints)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        games.close()
        files.close()
    assert errors == []
    with closing(sqlite3.connect(journal)) as db:
        assert db.execute("SELECT count(*) FROM local_games WHERE held <> 0").fetchone()[0] == 300
        assert db.execute("SELECT count(*) FROM queue").fetchone()[0] == 0
        assert db.execute("SELECT max(done) FROM transfers").fetchone()[0] == 299 << 20
        assert db.execute("SELECT count(*) FROM files").fetchone()[0] >= 1
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(JOURNAL_NAME)) == []


def test_the_file_sync_daemon_and_the_file_server_opening_at_once_import_it_once(
        journal: Path) -> None:
    opened: list[FileManifest] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def open_it() -> None:
        start.wait()
        try:
            opened.append(FileManifest(journal))
        except BaseException as exc:  # reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for m in opened:
        m.close()
    assert errors == []
    assert len(opened) == 4
    assert_imported(journal)


def test_a_busy_journal_is_not_called_corrupt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = tmp_path / JOURNAL_NAME
    DataManifest(journal).close()
    monkeypatch.setattr("ringsync.files.manifest.BUSY_TIMEOUT", 0.1)
    with closing(sqlite3.connect(journal, isolation_level=None)) as writer:
        writer.execute("BEGIN IMMEDIATE")  # another writer holds the journal
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            FileManifest(journal)
        writer.execute("ROLLBACK")
    assert sorted(p.name for p in tmp_path.iterdir() if "corrupt" in p.name) == []
    FileManifest(journal).close()
