"""Source discovery: RingRift's class-a paths found, class b never, no Python open() of a DB."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import uuid
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

from ringsync.daemons.auto_sync import AutoSyncDaemon
from ringsync.daemons.watcher import watch_sources
from ringsync.errors import ConfigError
from ringsync.node import NodeContext
from ringsync.policy.sources import SourceKind, SourcePatterns
from ringsync.settings import load_settings
from ringsync.store.discovery import discover_sources
from ringsync.store.gamedb import GameSource
from ringsync.store.ringrift_schema import create_schema
from ringsync.transport.memory import MemoryTransport
from tests.conftest import make_settings, write_games

CLASS_A = [
    "games/hex8_2p.db", "games/square8_4.db", "games/selfplay.db",
    "selfplay/p2p/hex8_2p/job-1/games.db", "selfplay/p2p/square8_2p_cpu/job-2/games.db",
    "selfplay/p2p_hybrid/hex8_3p/job-3/games.db", "selfplay/p2p_gpu/hex_2p/job-4/games.db",
    "selfplay/gumbel/hex8_2p/run/games.db", "selfplay/slurm_17/a/games.db",
    "selfplay/unified_x/b/games.db",
    "selfplay/p2p_gpu/hex8_2p/job-5/games_hex8_2p_4242.jsonl",
    "selfplay/p2p/hex8_2p/job-1/games.jsonl", "selfplay/gumbel_hex8_2p.jsonl",
    "selfplay/gpu/games_square8_2p_77.jsonl.gz", "games/games_hex8_2p_9.jsonl",
    "logs/selfplay/soak.hex8_2p.jsonl",
]
CLASS_B = [
    "games/synced/train-1/hex8_2p.db", "games/fetched/x.db", "games/s3_downloads/y.db",
    "games/cluster_sync/z.db", "games/cluster_synced.db", "games/jsonl_converted_hex8_2p.db",
    "games/selfplay_hex8_2p.db", "games/tournament_a.db", "games/gauntlet_b.db",
    "games/baseline_calibration_c.db", "games/canonical_hex8_2p.db",
    "selfplay/canonical_hex8_2p.db", "training/hex8_2p/harvested_games.db",
    "games/owc_imports/old.db", "games/hex8_2p.db.tmp", "selfplay/p2p/a/b/games.db-wal",
    "selfplay/p2p/a/b/.games.db", "games/games.jsonl.lock", "games/x.writing",
    "games/old.jsonl.archived_1700000000", "models/canonical_hex8_2p.pth",
    "training/hex8_2p.npz", "unified_elo.db", ".ringsync/manifest.db",
]


def _tree(root: Path, paths: list[str]) -> None:
    for rel in paths:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")


def test_class_a_is_found_and_class_b_never(tmp_path: Path) -> None:
    _tree(tmp_path, CLASS_A + CLASS_B)
    (tmp_path / "games/jsonl_aggregated.db").symlink_to("cluster_synced.db")
    found = discover_sources(tmp_path, SourcePatterns(), exclude=[tmp_path / "games/synced"])
    assert [s.key for s in found] == sorted(CLASS_A)
    kinds = {s.key: s.kind for s in found}
    assert kinds["games/hex8_2p.db"] is SourceKind.DB
    assert kinds["selfplay/gpu/games_square8_2p_77.jsonl.gz"] is SourceKind.JSONL


def test_a_symlink_to_an_excluded_file_and_a_file_reached_twice(tmp_path: Path) -> None:
    _tree(tmp_path, ["games/hex8_2p.db", "elsewhere/cluster_synced.db"])
    # Excluded by name: its target is excluded with it, even under an included name.
    (tmp_path / "games/jsonl_aggregated.db").symlink_to(tmp_path / "elsewhere/cluster_synced.db")
    (tmp_path / "games/renamed.db").symlink_to(tmp_path / "elsewhere/cluster_synced.db")
    (tmp_path / "games/alias.db").symlink_to("hex8_2p.db")
    found = discover_sources(tmp_path, SourcePatterns(), exclude=[])
    assert [s.key for s in found] == ["games/hex8_2p.db"]


def test_the_exclude_dir_is_never_read_whatever_the_patterns(tmp_path: Path) -> None:
    _tree(tmp_path, ["games/received/n/hex8_2p.db", "games/hex8_2p.db"])
    found = discover_sources(tmp_path, SourcePatterns(("games/**/*.db",), ()),
                             exclude=[tmp_path / "games/received"])
    assert [s.key for s in found] == ["games/hex8_2p.db"]


def test_discovery_creates_and_opens_nothing(tmp_path: Path) -> None:
    (tmp_path / "games").mkdir()
    (tmp_path / "games/garbage.db").write_bytes(b"x" * 4096)
    write_games(tmp_path / "games/hex8_2p.db", 1)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with _python_opens() as opened:
        found = discover_sources(tmp_path, SourcePatterns(), exclude=[])
    assert [s.key for s in found] == ["games/garbage.db", "games/hex8_2p.db"]
    assert opened == []
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(("var", "value", "problem"), [
    ("RINGRIFT_GAME_SOURCES", "games/*.db,../other/*.db", r"leaves the data dir"),
    ("RINGRIFT_GAME_SOURCES", "/mnt/games/*.db", r"is absolute"),
    ("RINGRIFT_GAME_SOURCES_EXCLUDE", "games/../../x", r"leaves the data dir"),
])
def test_patterns_outside_the_data_dir_are_refused(
        tmp_path: Path, var: str, value: str, problem: str) -> None:
    env = {"RINGRIFT_DATA_DIR": str(tmp_path), var: value}
    with pytest.raises(ConfigError, match=f"{var}.*{problem}.*RINGRIFT_DATA_DIR"):
        load_settings(env, cwd=tmp_path)


def test_configured_patterns_replace_includes_but_never_class_b(tmp_path: Path) -> None:
    env = {"RINGRIFT_DATA_DIR": str(tmp_path), "RINGRIFT_GAME_SOURCES": " mine/**/*.db ,",
           "RINGRIFT_GAME_SOURCES_EXCLUDE": "mine/old/"}
    patterns = load_settings(env, cwd=tmp_path).source_patterns
    assert patterns.classify("mine/a/b.db") is SourceKind.DB
    assert patterns.classify("mine/old/b.db") is None
    assert patterns.classify("mine/synced/b.db") is None  # built-in class b stays excluded
    assert patterns.classify("games/hex8_2p.db") is None


# -- no Python-level open of a live DB -----------------------------------------------------

_OPENED: list[str] | None = None


def _audit(event: str, args: tuple[object, ...]) -> None:
    if event == "open" and _OPENED is not None and args and isinstance(args[0], str | bytes | Path):
        name = str(args[0] if not isinstance(args[0], bytes) else args[0].decode(errors="replace"))
        if name.endswith((".db", "-wal", "-shm", "-journal")):
            _OPENED.append(name)


class _python_opens:
    """Collect the .db/-wal/-shm paths opened at Python level (open(), os.open()) in the block."""

    installed = False

    def __enter__(self) -> list[str]:
        global _OPENED
        if not _python_opens.installed:
            sys.addaudithook(_audit)  # hooks cannot be removed: one for the whole session
            _python_opens.installed = True
        _OPENED = []
        return _OPENED

    def __exit__(self, *exc: object) -> None:
        global _OPENED
        _OPENED = None


def _write_game_per_connection(db: Path) -> str:
    """One game the way RingRift's GameReplayDB does: a new connection per operation."""
    gid = uuid.uuid4().hex
    ops = [
        ("INSERT INTO games (game_id, board_type, num_players, created_at, game_status, "
         "total_moves, total_turns, schema_version) VALUES (?, 'hex8', 2, 'now', 'active', 0, 0, 18)",
         (gid,)),
        *[("INSERT INTO game_moves (game_id, move_number, turn_number, player, phase, move_type, "
           "move_json) VALUES (?, ?, ?, 1, 'p', 't', '{}')", (gid, m, m)) for m in range(5)],
        ("UPDATE games SET game_status = 'completed', total_moves = 5, winner = 1 "
         "WHERE game_id = ?", (gid,)),
    ]
    for sql, args in ops:
        with closing(sqlite3.connect(db, timeout=30)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(sql, args)
            conn.commit()
    return gid


def test_discovery_and_scans_never_open_a_live_db_outside_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "selfplay/p2p/hex8_2p/job-1/games.db"
    db.parent.mkdir(parents=True)
    with closing(sqlite3.connect(db)) as conn:
        create_schema(conn)
        conn.commit()
    written, seen = [], []
    sources: dict[str, GameSource] = {}
    try:
        with _python_opens() as opened:
            for _ in range(5):
                written.append(_write_game_per_connection(db))
                for found in discover_sources(tmp_path, SourcePatterns(), exclude=[]):
                    source = sources.setdefault(found.key, GameSource(found.path))
                    if source.changed():
                        seen += [g.game_id for g in source.scan()]
        assert opened == []
        assert sorted(seen) == sorted(written)
    finally:
        for source in sources.values():
            source.close()


# -- through the daemon --------------------------------------------------------------------


def _daemon(ctx: NodeContext, transport: MemoryTransport) -> AutoSyncDaemon:
    return AutoSyncDaemon(ctx, transport, retry_initial=0.0)


async def test_games_received_from_peers_are_never_pushed_as_ours(
        node_factory: Callable[..., NodeContext]) -> None:
    ctx = node_factory("selfplay-1")
    ours, _ = write_games(ctx.settings.data_dir / "selfplay/p2p/hex8_2p/j1/games.db", 3, seed=1)
    theirs, _ = write_games(ctx.settings.data_dir / "games/hex8_2p.db", 4, seed=2)
    ctx.manifest.record_received(theirs)  # e.g. an operator copied a received DB into games/
    daemon = _daemon(ctx, MemoryTransport())
    await daemon.sync_once()
    assert ctx.manifest.summary()["games"] == len(ours)
    assert ctx.manifest.received_filter(ours + theirs) == set(theirs)
    await daemon.close()


async def test_a_db_that_is_not_sqlite_is_logged_once_and_counted(
        node_factory: Callable[..., NodeContext], caplog: pytest.LogCaptureFixture) -> None:
    ctx = node_factory("selfplay-1")
    bad = ctx.settings.games_dir / "hex8_2p.db"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"not a database" * 300)
    good, _ = write_games(ctx.settings.games_dir / "square8_2p.db", 2)
    daemon = _daemon(ctx, MemoryTransport())
    for _ in range(3):
        await daemon.sync_once()
    errors = [r for r in caplog.records if "games/hex8_2p.db" in r.getMessage()]
    assert len(errors) == 1
    assert ctx.metrics.sources_unreadable._value.get() == 1
    assert ctx.manifest.summary()["games"] == len(good)
    await daemon.close()


async def test_the_watcher_follows_new_job_dirs(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, "selfplay-1")
    settings.synced_dir.mkdir(parents=True)
    changed: asyncio.Queue[Path | None] = asyncio.Queue()
    task = asyncio.create_task(watch_sources(settings, changed.put_nowait))
    try:
        await asyncio.sleep(0.05)  # let the watches be added
        job = settings.data_dir / "selfplay/p2p_gpu/hex8_2p/job-9"
        job.mkdir(parents=True)
        (settings.synced_dir / "hex8_2p.db").write_bytes(b"")  # received games: not watched
        async with asyncio.timeout(5):
            while await changed.get() is not None:
                pass
            # Created before its watch existed, or after: either way it is reported.
            await asyncio.sleep(0.05)
            (job / "games_hex8_2p_1.jsonl").write_text("{}\n")
            while (path := await changed.get()) != job / "games_hex8_2p_1.jsonl":
                assert path is None or path.parent != settings.synced_dir
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
