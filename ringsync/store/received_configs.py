"""ReceivedConfigs: the config DBs a receiver holds, bounded in number, with their game
counts kept beside them so that status never opens a merged DB."""

from __future__ import annotations

import logging
import sqlite3
import threading
from contextlib import closing
from pathlib import Path

from ringsync.errors import TooLargeError
from ringsync.ops.metrics import Metrics
from ringsync.store.shards import config_keys, shard_paths

log = logging.getLogger(__name__)

DEFAULT_MAX_CONFIGS = 256


class TooManyConfigsError(TooLargeError):
    """A batch would make one config DB more than RINGRIFT_MAX_CONFIGS allows (logged once)."""

_LEDGER = """
CREATE TABLE IF NOT EXISTS configs (
    config_key TEXT PRIMARY KEY,
    games INTEGER NOT NULL,
    exact INTEGER NOT NULL  -- 0 while a process merges into it: recounted after a crash
)
"""


class ReceivedConfigs:
    """Which configs the receiver holds merged DBs of (``<config_key>.db`` and its shards,
    ringsync/store/shards.py), and how many games each config has.

    Config keys come from peers: each one is a file of its own, so their number is
    bounded (``max_configs``, RINGRIFT_MAX_CONFIGS). Counts are kept here as merges
    report them, in ``ledger`` (a small SQLite file in the node's state dir) when given;
    reading a merged DB for status would cost a scan per DB and, read-only, would leave
    its -wal and -shm files behind. A key is marked inexact on disk before this process
    first merges into it; counts are written, exact, on close(). After a crash only the
    DBs merged into since the last clean stop are counted again, once, at start.
    """

    def __init__(self, synced_dir: Path, *, max_configs: int = DEFAULT_MAX_CONFIGS,
                 ledger: Path | None = None, metrics: Metrics | None = None) -> None:
        self._dir = Path(synced_dir)
        self._max = max_configs
        self._metrics = metrics
        self._lock = threading.Lock()
        self._db = sqlite3.connect(ledger or ":memory:", isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_LEDGER)
        self._counts: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._warned = False
        self._closed = False
        self._load()

    # -- start-up

    def _load(self) -> None:
        stored = {str(k): (int(n), bool(exact)) for k, n, exact in
                  self._db.execute("SELECT config_key, games, exact FROM configs")}
        for key in self._files():
            games, exact = stored.get(key, (0, False))
            if not exact:
                games = sum(_count(path) for path in shard_paths(self._dir, key))
                self._db.execute("INSERT OR REPLACE INTO configs VALUES (?, ?, 1)", (key, games))
            self._counts[key] = games
        self._gauge()

    def _files(self) -> set[str]:
        return config_keys(self._dir)

    # -- the bound

    def admit(self, key: str) -> None:
        """Raise TooLargeError if ``key`` would be one config DB more than the bound allows.

        Called before anything of the batch touches the disk; marks the key inexact.
        """
        with self._lock:
            if key not in self._counts and len(self._counts) >= self._max:
                self._forget_deleted()
            if key not in self._counts and len(self._counts) >= self._max:
                self._refuse(key)
            self._counts.setdefault(key, 0)
            if key not in self._dirty:
                self._db.execute("INSERT INTO configs VALUES (?, ?, 0) ON CONFLICT (config_key) "
                                 "DO UPDATE SET exact = 0", (key, self._counts[key]))
                self._dirty.add(key)
        self._gauge()

    def _forget_deleted(self) -> None:
        """Keys whose DB is gone (an operator removed it, or its first batch was refused)."""
        files = self._files()
        for key in [k for k in self._counts if k not in files]:
            del self._counts[key]
            self._dirty.discard(key)
            self._db.execute("DELETE FROM configs WHERE config_key = ?", (key,))

    def _refuse(self, key: str) -> None:
        if self._metrics is not None:
            self._metrics.received_configs_refused.inc()
        message = (f"config_key {key!r} refused: this node already holds {len(self._counts)} "
                   f"config DBs, the most RINGRIFT_MAX_CONFIGS={self._max} allows; raise "
                   "RINGRIFT_MAX_CONFIGS on the receiver if the cluster really has more configs")
        if not self._warned:  # once: a peer may send many keys, each one a refusal
            self._warned = True
            log.warning("%s (further refusals counted in ringsync_received_configs_refused_total)",
                        message)
        raise TooManyConfigsError(message)

    # -- counts

    def merged(self, key: str, inserted: int) -> None:
        """A merge into ``key`` committed ``inserted`` new games."""
        if not inserted:
            return
        with self._lock:  # kept in memory: a key merged into is inexact on disk until close()
            self._counts[key] = self._counts.get(key, 0) + inserted

    def held(self) -> dict[str, int]:
        """Games per config DB present now (one directory listing, no DB opened)."""
        files = self._files()
        with self._lock:
            return {k: n for k, n in sorted(self._counts.items()) if k in files}

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.received_configs.set(len(self._counts))

    def close(self) -> None:
        """Every count is exact now (call after the merges have stopped); idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT OR REPLACE INTO configs VALUES (?, ?, 1)",
                                     self._counts.items())
            self._db.close()


def _count(path: Path) -> int:
    """Games in a merged DB, read once at start after a crash (0 if unreadable, logged).

    A read-write connection: as the last one to close, it removes the -wal and -shm.
    """
    try:
        with closing(sqlite3.connect(path, timeout=30.0)) as conn:
            if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'games'").fetchone() is None:
                return 0
            return int(conn.execute('SELECT count(*) FROM "games"').fetchone()[0])
    except sqlite3.Error as exc:
        log.warning("%s: cannot count its games for status (%s); shown as 0", path, exc)
        return 0
