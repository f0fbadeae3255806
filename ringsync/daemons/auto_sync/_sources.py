"""The local generators' source files: found, scanned into the manifest, read for batches.

Blocking SQLite and file work runs in worker threads, the manifest's calls included
(a million-game manifest must not stall the event loop; it serialises its own calls).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Mapping
from pathlib import Path

from ringsync.errors import CorruptDataError
from ringsync.node import NodeContext
from ringsync.policy.sources import SourceKind
from ringsync.store.discovery import SourceFile, discover_sources
from ringsync.store.gamedb import GameSource
from ringsync.store.gamesource import Scan, ScanState
from ringsync.store.jsonl_source import JsonlIndex, JsonlSource
from ringsync.store.manifest import LocalGame

log = logging.getLogger(__name__)

# Shipped games checked for deletion at the source per forced scan: a few tenths of a ms
# (500 cost 4 ms of the idle cycle's 10 ms budget); 100 a minute cover 144,000 games a day.
DELETED_CHECK_SLICE = 100
MIN_CHUNK_ROWS = 500  # a source due for a scan reads at least this many rows when it gets a turn
# A backlog's chunks double from RINGRIFT_SCAN_CHUNK_ROWS up to this many times it: each
# chunk is delivered in game-id order, so fewer, larger chunks keep a receiver's index
# writes local (a 200k backlog in fixed 10k-row chunks cost the receivers 73 CPU-s against
# 53 in one pass, one loaded run), while the rows held at once stay bounded (~600 bytes
# each while they are queued).
MAX_CHUNK_GROWTH = 5
Source = GameSource | JsonlSource
# Any failure of one source is that source's problem: counted, logged once, retried each
# cycle, while the other sources go on (a daemon restart would only meet it again).
_READ_ERRORS = (Exception,)


class LocalSources:
    """The source DBs and JSONL logs under the data dir, keyed by their path relative to it.

    An unreadable source is loud once (log, ``sources_unreadable``, ``errors``) and
    ``on_change`` is called whenever ``errors`` changes, so the owner can update its health.
    ``on_games_changed`` hears of shipped games that gained rows before they are queued
    again (deliveries in flight may hold their old rows).
    """

    def __init__(self, ctx: NodeContext, on_change: Callable[[], None],
                 on_games_changed: Callable[[list[str]], None] = lambda ids: None) -> None:
        self._ctx = ctx
        self._on_change = on_change
        self._on_games_changed = on_games_changed
        self._open: dict[str, Source] = {}
        self._inodes: dict[str, int] = {}
        self._jsonl: JsonlIndex | None = None
        self._rescan = True
        self._errors: dict[str, str] = {}  # source key -> why its last read failed
        self._saved_states: dict[str, dict[str, object]] = {}
        self._more: set[str] = set()  # sources whose scan stopped at its chunk
        # New games rows read per source and cycle: a first scan of a large backlog ships
        # its first chunk (10,000 rows: ≈ 0.5 s) while the rest waits for the next cycles,
        # and the games found at once stay bounded in memory.
        self.scan_chunk_rows = ctx.settings.scan_chunk_rows
        self._budget = self.scan_chunk_rows  # rows this cycle may read (grows in a backlog)
        self._dirty: set[str] = set()  # sources inotify saw change since the last scan
        self._patterns = ctx.settings.source_patterns  # compiled once, not on every rescan
        self._deleted_after: dict[str, str] = {}  # source key -> game id the next check starts after
        self._deleted_seen: set[str] = set()
        self._missing_reported: set[str] = set()
        self._queued = 0  # games queued by the discover() running

    @property
    def errors(self) -> Mapping[str, str]:
        """Why each unreadable source's last read failed, by source key."""
        return self._errors

    @property
    def scanning(self) -> bool:
        """A source has rows left that the next cycle's scan reads (a large first scan)."""
        return bool(self._more)

    def request_rescan(self) -> None:
        """Look for new, moved and replaced source files before the next scan."""
        self._rescan = True

    def on_file_event(self, database: Path | None) -> None:
        # A new job dir or file: look for new sources (only paths the patterns select).
        s = self._ctx.settings
        if database is None:
            self._rescan = True
        elif database.is_relative_to(s.data_dir):
            key = database.relative_to(s.data_dir).as_posix()
            if key in self._open:
                # Scanned whatever its stat says: a commit can leave the WAL's size and
                # mtime as they were (a reset WAL rewritten within one timestamp tick).
                self._dirty.add(key)
            elif self._patterns.classify(key) is not None:
                self._rescan = True

    async def close(self) -> None:
        for source in self._open.values():
            await asyncio.to_thread(source.close)
        self._open.clear()
        if self._jsonl is not None:
            await asyncio.to_thread(self._jsonl.close)
            self._jsonl = None

    # -- discovery ---------------------------------------------------------------------------

    async def discover(self, *, force: bool) -> int:
        """Scan sources that changed; on the interval (``force``) scan them all. Returns the
        games queued for the targets (found, or queued again because they changed).

        A source is scanned when inotify saw its DB, WAL or log change, or when its stat
        changed; the stat check alone can miss a commit that leaves the WAL the same size
        within one timestamp tick (without inotify the periodic forced scan bounds that).
        """
        s = self._ctx.settings
        if self._rescan:
            self._rescan = False
            await self._forget_replaced()
            found = await asyncio.to_thread(discover_sources, s.data_dir, self._patterns,
                                            exclude=(s.received_root,))
            for file in found:  # keys: paths under the data dir, stable across restarts
                if file.key not in self._open:
                    inode = _inode(file.path)
                    self._open[file.key] = await asyncio.to_thread(self._open_saved, file, inode)
                    self._inodes[file.key] = inode
        names = [h.name for h in self._ctx.router.game_targets()]
        dirty, self._dirty = self._dirty, set()  # events from now on mark sources again
        more, self._more = self._more, set()
        due = [key for key, source in self._open.items()
               if force or key in dirty or key in more or source.changed()]
        # Fresh changes first, backlogs after: all share one budget of rows per cycle, so
        # a first start with many large sources still delivers after one chunk's reading.
        budget, self._queued = self._budget, 0
        for key in sorted(due, key=lambda k: k in more):
            source = self._open.get(key)
            if source is None:
                continue
            if budget <= 0:
                self._more.add(key)  # read next cycle
                continue
            budget -= await self._scan(key, source, names, force=force,
                                       max_rows=max(budget, min(MIN_CHUNK_ROWS, self.scan_chunk_rows)))
        self._ctx.metrics.source_scan_backlog.set(len(self._more))
        grown = min(2 * self._budget, MAX_CHUNK_GROWTH * self.scan_chunk_rows)
        self._budget = grown if self._more else self.scan_chunk_rows
        return self._queued

    def _open_saved(self, file: SourceFile, inode: int) -> Source:
        """Open a source where the saved scan of this very file (not of one it replaced) stopped."""
        manifest = self._ctx.manifest
        state, cursors = None, None
        saved = manifest.scan_cursor(file.key)
        if saved is not None and saved.get("inode") == inode and isinstance(saved.get("scan"), dict):
            state = ScanState.from_json(saved["scan"])
            if state is not None:
                self._saved_states[file.key] = saved
        if state is None:  # a manifest from before the games cursor was saved
            cursors = manifest.child_cursors(file.key)
            if cursors is not None and cursors.pop(_INODE, None) != inode:
                cursors = None
        return self._open_source(file, cursors, state)

    def _open_source(self, file: SourceFile, cursors: dict[str, int] | None,
                     state: ScanState | None = None) -> Source:
        if file.kind is SourceKind.DB:
            return GameSource(file.path, active_timeout=self._ctx.settings.active_game_timeout,
                              child_cursors=cursors, resume=state)
        if self._jsonl is None:
            self._jsonl = JsonlIndex(self._ctx.settings.state_dir / "jsonl.db")
        return JsonlSource(file.path, file.key, self._jsonl, node_id=self._ctx.settings.node_id)

    async def _forget_replaced(self) -> None:
        """Close sources whose file was removed, renamed away or replaced by a new file."""
        data_dir = self._ctx.settings.data_dir
        for key in list(self._open):
            if _inode(data_dir / key) != self._inodes.get(key):
                source = self._open.pop(key)
                self._inodes.pop(key, None)
                if self._errors.pop(key, None) is not None:
                    self._errors_changed()
                self._saved_states.pop(key, None)
                self._more.discard(key)
                self._deleted_after.pop(key, None)
                self._missing_reported.discard(key)
                await asyncio.to_thread(source.close)
                log.info("source %s was moved or replaced; rescanning", key)

    async def _scan(self, key: str, source: Source, targets: list[str], *, force: bool,
                    max_rows: int) -> int:
        """Scan one source and queue what it found; returns the games rows it read."""
        reconnects = source.reconnects if isinstance(source, GameSource) else 0
        rescanned = source.rows_below_cursor if isinstance(source, GameSource) else 0
        try:
            if isinstance(source, GameSource):
                scan = await asyncio.to_thread(source.scan_all, max_rows)
                if force:
                    await self._check_deleted(key, source)
            else:
                scan = Scan(await asyncio.to_thread(source.scan), [], 0)
        except _READ_ERRORS as exc:
            await self._failed(key, source, exc)
            return 0
        self._recovered(key)
        m = self._ctx.metrics
        if isinstance(source, GameSource):
            m.source_lost_locks.inc(source.reconnects - reconnects)
            m.source_rows_scanned.inc(source.last_scan_rows)
            m.source_rows_rescanned.inc(source.rows_below_cursor - rescanned)
            if scan.more:
                self._more.add(key)
        if scan.changed:
            self._on_games_changed([g.game_id for g in scan.changed])
        self._queued += await asyncio.to_thread(self._record, key, scan, targets)
        if isinstance(source, GameSource):
            await asyncio.to_thread(self._save_state, key, source)
            return source.last_scan_rows
        self._jsonl_scanned(source)
        return 0

    def _record(self, key: str, scan: Scan, targets: list[str]) -> int:
        """Queue the scan's new games for every target, and its changed games again;
        returns how many games it recorded (found again elsewhere included)."""
        m, manifest = self._ctx.metrics, self._ctx.manifest
        found = scan.completed + scan.changed  # a changed game the manifest lacks is new to it
        queued = 0
        if found:
            # A game received from a peer, wherever it was copied to here, is not ours to push.
            received = manifest.received_filter([g.game_id for g in found])
            games = [LocalGame(g.game_id, key, g.config_key) for g in found
                     if g.game_id not in received]
            m.games_discovered.inc(manifest.record_discovered(games, targets))
            queued = len(games)
        if scan.changed:  # rows added to shipped games: their holders get them merged by key
            queued += manifest.requeue([g.game_id for g in scan.changed])
            m.source_games_changed.inc(len(scan.changed))
        m.source_games_given_up.inc(scan.given_up)
        return queued

    def _jsonl_scanned(self, source: JsonlSource) -> None:
        """Count what the scan skipped; its read position is durable only now, after the manifest."""
        m = self._ctx.metrics
        for reason, n in source.skipped.items():
            if reason == "malformed":
                m.jsonl_malformed_lines.inc(n)
            else:
                m.jsonl_games_skipped.labels(reason=reason).inc(n)
        source.commit()

    def _save_state(self, key: str, source: GameSource) -> None:
        """Durable only after the scan's games were queued (a crash before re-finds them):
        a restart reads neither the file's history again nor misses later rows."""
        saved = saved_scan(self._inodes[key], source.state())
        if saved != self._saved_states.get(key):
            self._ctx.manifest.save_scan_cursor(key, saved)
            self._saved_states[key] = saved

    async def _check_deleted(self, key: str, source: GameSource) -> None:
        """Look for a slice of this source's shipped games that were deleted there since."""
        after = self._deleted_after.get(key, "")
        ids = await asyncio.to_thread(self._ctx.manifest.delivered_from, key, DELETED_CHECK_SLICE,
                                      after=after)
        self._deleted_after[key] = ids[-1] if len(ids) == DELETED_CHECK_SLICE else ""
        gone = [g for g in await asyncio.to_thread(source.missing, ids)
                if g not in self._deleted_seen]
        if gone:
            self._deleted_seen.update(gone)
            self._ctx.metrics.source_games_deleted.inc(len(gone))
            log.warning("%d games shipped from %s were deleted there since (first %s); their "
                        "copies at the targets stay", len(gone), key, gone[0])

    def note_missing(self, source: str, ids: tuple[str, ...], found: set[str], target: str) -> None:
        """Games not found where the manifest says they are stay queued, never dropped.

        A rotated or renamed DB is found again by the next rescan, which points the
        manifest at the new path; a busy or broken source is retried next cycle.
        """
        missing = len(ids) - len(found)
        if missing and source not in self._missing_reported:
            self._missing_reported.add(source)
            log.error("%d games owed to %s are not readable in source %s now; they stay queued "
                      "and ship when the file is found again", missing, target, source)
        elif not missing:
            self._missing_reported.discard(source)

    # -- failing and recovered ---------------------------------------------------------------

    def source(self, key: str) -> Source | None:
        """The open source under ``key`` (a path under the data dir), if it is open."""
        return self._open.get(key)

    async def read_failed(self, key: str, exc: Exception) -> None:
        """Reading games owed from ``key`` failed: loud once, the games stay queued."""
        src = self._open.get(key)
        if src is not None:
            await self._failed(key, src, exc)

    async def _failed(self, key: str, source: Source, exc: Exception) -> None:
        """An unreadable source is loud: one log line when it starts failing, metrics, health."""
        kind = ("busy" if isinstance(exc, sqlite3.OperationalError) else
                "corrupt" if isinstance(exc, CorruptDataError | OSError | sqlite3.Error) else
                type(exc).__name__)
        self._ctx.metrics.source_read_errors.labels(kind=kind).inc()
        # A view gone stale (e.g. its WAL deleted under it) heals with a fresh connection;
        # the cursor stays, so nothing already found is reported again.
        await asyncio.to_thread(source.close)
        if key not in self._errors:
            log.error("cannot read source %s (%s); its games are not shipped until it reads "
                      "again, retried every cycle: %s", key, kind, exc)
        self._errors[key] = f"source {key} unreadable ({kind}): {exc}"
        self._errors_changed()

    def _recovered(self, key: str) -> None:
        if self._errors.pop(key, None) is not None:
            log.info("source %s is readable again", key)
            self._errors_changed()

    def _errors_changed(self) -> None:
        self._ctx.metrics.sources_unreadable.set(len(self._errors))
        self._on_change()

_INODE = ""  # saved beside the child cursors; no table has an empty name


def saved_scan(inode: int, state: ScanState) -> dict[str, object]:
    """What the manifest keeps per source: the scan state, with the file's inode (a file
    that replaces it under the same name starts afresh, not from the old file's rowids)."""
    return {"inode": inode, "scan": state.to_json()}


def _inode(path: Path) -> int:
    try:
        return path.stat().st_ino
    except OSError:
        return -1
