"""Issue 6: a Python open()/close() of a live DB drops this process's SQLite locks.

POSIX record locks belong to the process: closing ANY descriptor of the file releases the
SHARED lock our connection holds on it. RingRift's connection-per-operation writer then
believes its close is the last one, checkpoints the WAL into the DB file and deletes
-wal/-shm, and our connection keeps reading the old, unlinked wal-index: stale data, no error.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest

from ringsync.selfplay_sim import SelfplayWriter, simulate
from ringsync.store.gamesource import GameSource

LIVE_SUFFIXES = (".db", ".db-wal", ".db-shm")


def write_in_other_process(db: Path, games: int, seed: int) -> None:
    """RingRift's writer is another process: only then do POSIX locks decide 'last close'."""
    subprocess.run([sys.executable, "-m", "ringsync.selfplay_sim", str(db), "--games", str(games),
                    "--moves", "10", "--seed", str(seed), "--pattern", "per-op"],
                   check=True, capture_output=True, timeout=60)


def touch_file_like_a_header_check(db: Path) -> None:
    """What discovery used to do: read the header with Python's open(), then close it."""
    with db.open("rb") as fh:
        fh.read(20)


def count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM games WHERE game_status='completed'").fetchone()[0])


def test_the_hazard_exists_on_this_sqlite(tmp_path: Path) -> None:
    """Plain sqlite3: a held reader goes stale once the file is opened and closed next to it."""
    db = tmp_path / "selfplay.db"
    write_in_other_process(db, 3, seed=1)
    with closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as reader:
        assert count(reader) == 3
        write_in_other_process(db, 3, seed=2)
        assert count(reader) == 6  # the reader's lock kept the WAL alive
        assert db.with_name("selfplay.db-wal").exists()
        touch_file_like_a_header_check(db)
        write_in_other_process(db, 3, seed=3)  # its last close now checkpoints and deletes
        assert not db.with_name("selfplay.db-wal").exists()
        try:
            seen = count(reader)
        except sqlite3.DatabaseError:
            seen = -1  # "malformed": the other way this goes wrong
    assert seen != 9, "SQLite kept the reader's view: the hazard no longer reproduces here"
    with closing(sqlite3.connect(db)) as fresh:
        assert count(fresh) == 9  # the games are in the file; only the held view lost them


def test_game_source_heals_a_view_gone_stale_by_an_open_elsewhere_in_the_process(
        tmp_path: Path) -> None:
    """Defence in depth: if anything in the process drops our locks, the next scan reopens."""
    db = tmp_path / "selfplay.db"
    write_in_other_process(db, 3, seed=1)
    source = GameSource(db)
    try:
        assert len(source.scan()) == 3
        touch_file_like_a_header_check(db)
        write_in_other_process(db, 3, seed=2)  # deletes the WAL under the held connection
        assert len(source.scan()) == 3
        assert source.reconnects == 1
        write_in_other_process(db, 2, seed=3)
        assert len(source.scan()) == 2
        assert source.reconnects == 1
    finally:
        source.close()


def test_game_source_loses_nothing_next_to_a_per_operation_writer(tmp_path: Path) -> None:
    db = tmp_path / "selfplay.db"
    write_in_other_process(db, 2, seed=1)
    source = GameSource(db)
    seen: list[str] = []
    try:
        for seed in range(2, 8):
            seen += [g.game_id for g in source.scan()]
            write_in_other_process(db, 3, seed=seed)  # each close would be the last if we let go
            assert db.with_name("selfplay.db-wal").exists()  # our lock keeps the WAL
        seen += [g.game_id for g in source.scan()]
    finally:
        source.close()
    with closing(sqlite3.connect(db)) as conn:
        completed = {r[0] for r in conn.execute("SELECT game_id FROM games")}
    assert len(seen) == len(set(seen)) == len(completed) == 2 + 6 * 3


# -- the guard: no Python-level open of a live DB, its WAL or its shm ---------------------


class OpenRecorder:
    """Records Python-level opens (open(), os.open, Path.open) of DB files under a root."""

    def __init__(self) -> None:
        self.roots: list[Path] = []
        self.opened: list[str] = []

    def __call__(self, event: str, args: tuple[object, ...]) -> None:
        if event != "open" or not self.roots or not isinstance(args[0], (str, Path)):
            return
        path = str(args[0])
        if path.endswith(LIVE_SUFFIXES) and any(path.startswith(str(r)) for r in self.roots):
            self.opened.append(path)


_RECORDER = OpenRecorder()  # audit hooks cannot be removed: install one, arm it per test
sys.addaudithook(_RECORDER)


@pytest.fixture
def no_python_open(tmp_path: Path) -> Iterator[Callable[[], list[str]]]:
    """Fails the test if anything in this process open()s a DB file under tmp_path."""
    _RECORDER.roots.append(tmp_path)
    _RECORDER.opened.clear()
    try:
        yield lambda: list(_RECORDER.opened)
    finally:
        _RECORDER.roots.remove(tmp_path)
    assert not _RECORDER.opened, f"a live DB file was opened outside SQLite: {_RECORDER.opened}"


def test_the_guard_sees_a_python_open(tmp_path: Path,
                                      no_python_open: Callable[[], list[str]]) -> None:
    db = tmp_path / "x.db"
    SelfplayWriter(db, moves_per_game=5).close()
    assert no_python_open() == []
    touch_file_like_a_header_check(db)
    assert no_python_open() == [str(db)]
    _RECORDER.opened.clear()  # expected here; the fixture would fail the test otherwise


def test_scan_and_extract_never_open_the_live_files(
        tmp_path: Path, no_python_open: Callable[[], list[str]]) -> None:
    db = tmp_path / "games" / "selfplay.db"
    stop = threading.Event()
    writers = threading.Thread(target=simulate, args=(db, 60), kwargs=dict(
        writers=2, seed=4, moves_per_game=10, mode="incremental", stop=stop))
    SelfplayWriter(db, moves_per_game=10).close()
    writers.start()
    source = GameSource(db)
    shipped: list[str] = []
    try:
        while writers.is_alive():
            found = [g.game_id for g in source.scan()]
            shipped += [gid for b in source.extract(found, source_node="n") for gid in b.game_ids]
        writers.join()
        found = [g.game_id for g in source.scan()]
        shipped += [gid for b in source.extract(found, source_node="n") for gid in b.game_ids]
    finally:
        stop.set()
        source.close()
    assert len(shipped) == len(set(shipped)) == 60
