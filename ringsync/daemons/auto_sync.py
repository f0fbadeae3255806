"""AutoSyncDaemon: push freshly completed games from local generators to their targets."""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ringsync.daemons.base import Daemon, DaemonType, Health, HealthState
from ringsync.daemons.watcher import watch_games_dir
from ringsync.errors import CorruptDataError, PeerRejectedError, TransportError
from ringsync.inventory import Host
from ringsync.node import NodeContext
from ringsync.ops.fsdetect import is_network_filesystem
from ringsync.protocol.batch import content_digest, encode_batch
from ringsync.store.gamedb import GameSource, discover_sources
from ringsync.store.manifest import DiscoveredGame
from ringsync.transport.base import GameTransport
from ringsync.transport.http import HttpTransport

log = logging.getLogger(__name__)

PUSHES_IN_FLIGHT = 2
DELETED_CHECK_SLICE = 500  # shipped games checked for deletion at the source per forced scan
_BATCH_SPECIFIC = frozenset({400, 413})  # refusals of this batch, not of us
Prepared = list[tuple[bytes, str, tuple[str, ...]]]  # (payload, digest, game ids) per config


CacheKey = tuple[str, tuple[str, ...]]  # (source, game ids)


@dataclass
class _PreparedCache:
    """The last few batches extracted in a cycle, shared by the targets that owe them.

    Targets walk their outboxes in the same order, so they usually ask for the same
    batch moments apart; a window of ``capacity`` keeps memory bounded when they drift
    apart (a late target then extracts again, which costs time, not correctness).
    """

    capacity: int = 2
    done: OrderedDict[CacheKey, Prepared] = field(default_factory=OrderedDict)
    locks: dict[CacheKey, asyncio.Lock] = field(default_factory=dict)

    async def get(self, key: CacheKey, make: Callable[[], Awaitable[Prepared]]) -> Prepared:
        async with self.locks.setdefault(key, asyncio.Lock()):
            if key not in self.done:
                self.done[key] = await make()
                while len(self.done) > self.capacity:
                    evicted, _ = self.done.popitem(last=False)
                    self.locks.pop(evicted, None)
            return self.done[key]


class _PeerBackoff:
    """Per-peer retry pacing so one dead peer never stalls the others' cycles."""

    def __init__(self, initial: float, maximum: float) -> None:
        self._initial, self._max = initial, maximum
        self._retry_at: dict[str, float] = {}
        self._delay: dict[str, float] = {}

    def ready(self, peer: str) -> bool:
        return time.monotonic() >= self._retry_at.get(peer, 0.0)

    def failed(self, peer: str) -> float:
        delay = min(self._max, self._delay.get(peer, self._initial / 2) * 2)
        self._delay[peer] = delay
        self._retry_at[peer] = time.monotonic() + delay
        return delay

    def succeeded(self, peer: str) -> None:
        self._retry_at.pop(peer, None)
        self._delay.pop(peer, None)


class AutoSyncDaemon(Daemon):
    """Wakes on a generator's commit (inotify, /v1/notify) or every RINGRIFT_SYNC_INTERVAL.

    Each cycle finds newly completed games in the local selfplay DBs, records them
    in the manifest's outbox for every target, and delivers each target's outbox in
    batches, acknowledging a batch only after the target merged it.
    """

    daemon_type = DaemonType.AUTO_SYNC
    depends_on = (DaemonType.DATA_SERVER,)

    def __init__(
        self, ctx: NodeContext, transport: GameTransport | None = None, *,
        mountinfo: str | None = None, retry_initial: float = 1.0,
    ) -> None:
        s = ctx.settings
        self._ctx = ctx
        self._transport = transport or HttpTransport(s.node_id, s.auth_token, read_timeout=s.push_timeout)
        self._mountinfo = mountinfo
        self._sources: dict[str, GameSource] = {}
        self._rescan_sources = True
        self._stopping = False
        self._cycle_lock = asyncio.Lock()
        self._backoff = _PeerBackoff(retry_initial, max(1.0, min(60.0, s.sync_interval)))
        self._health = Health(HealthState.STARTING)
        self._failing: dict[str, str] = {}
        self._missing_reported: set[str] = set()
        self._inodes: dict[str, int] = {}
        self._acked_in_cycle = 0
        self._rejected_in_cycle: set[str] = set()
        self._source_errors: dict[str, str] = {}  # source key -> why its last read failed
        self._deleted_after: dict[str, str] = {}  # source key -> game id the next check starts after
        self._deleted_seen: set[str] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, ready: Callable[[], None]) -> None:
        try:
            shared, fstype = is_network_filesystem(self._ctx.settings.data_dir, mountinfo=self._mountinfo)
            if shared and self._ctx.settings.skip_nfs_sync:
                await self._run_shared_storage(ready, fstype)
                return
            targets = [h.name for h in self._ctx.router.game_targets()]
            queued = self._ctx.manifest.ensure_targets(targets)
            log.info("auto-sync targets: %s (%d games re-queued)", ", ".join(targets) or "none", queued)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(watch_games_dir(self._ctx.settings, self._on_fs_event))
                self._health = Health(HealthState.HEALTHY)
                ready()
                await self._loop()
        finally:
            await asyncio.shield(self._close())

    async def _run_shared_storage(self, ready: Callable[[], None], fstype: str) -> None:
        # Every node reads the same files: copying would only duplicate them.
        log.info("data dir %s is on %s (network filesystem): auto-sync skips pushing; "
                 "set RINGRIFT_SKIP_NFS_SYNC=false to push anyway", self._ctx.settings.data_dir, fstype)
        self._health = Health(HealthState.HEALTHY, f"skipping: shared storage ({fstype})")
        ready()
        while not self._stopping:
            self._ctx.metrics.shared_storage_skips.inc()
            self._ctx.metrics.sync_cycles.labels(trigger="shared_storage_skip").inc()
            await self._wait_for_trigger()

    async def drain(self) -> None:
        self._stopping = True
        self._ctx.sync_wakeup.set()
        async with self._cycle_lock:  # the cycle in flight finishes and acknowledges
            pass

    async def close(self) -> None:
        """Release sources and connections; run() does this itself on the way out."""
        await self._close()

    async def _close(self) -> None:
        for source in self._sources.values():
            await asyncio.to_thread(source.close)
        self._sources.clear()
        await self._transport.close()

    def health(self) -> Health:
        return self._health

    # -- triggers ----------------------------------------------------------------------------

    def _on_fs_event(self, database: Path | None) -> None:
        # A DB we do not know yet may have been created empty a moment ago and only
        # now gained its games table: look again on every event until it is a source.
        games_dir = self._ctx.settings.games_dir
        if database is None or database.relative_to(games_dir).as_posix() not in self._sources:
            self._rescan_sources = True
        self._ctx.sync_wakeup.set()

    async def _loop(self) -> None:
        trigger = "startup"
        while not self._stopping:
            await self.sync_once(trigger)
            trigger = "backlog" if self._backlog_waiting() else await self._wait_for_trigger()

    def _backlog_waiting(self) -> bool:
        """Games arrived during the cycle for a target that is not backing off."""
        if self._acked_in_cycle == 0:  # owed games that could not be read: wait, don't spin
            return False
        return any(self._backoff.ready(h.name) and self._ctx.manifest.has_pending(h.name)
                   for h in self._ctx.router.game_targets())

    async def _wait_for_trigger(self) -> str:
        """Sleep until an event or the (jittered) interval; coalesce a burst of events."""
        interval = self._ctx.settings.sync_interval * random.uniform(0.9, 1.1)
        try:
            async with asyncio.timeout(interval):
                await self._ctx.sync_wakeup.wait()
        except TimeoutError:
            return "interval"
        await asyncio.sleep(self._ctx.settings.debounce)
        self._ctx.sync_wakeup.clear()
        return "event"

    # -- one cycle ---------------------------------------------------------------------------

    async def sync_once(self, trigger: str = "manual") -> None:
        """Discover completed games, then deliver every target's outbox.

        Any trigger but "event" also looks for new source databases and rescans all.
        """
        async with self._cycle_lock:
            if trigger != "event":
                self._rescan_sources = True
            self._acked_in_cycle = 0
            self._rejected_in_cycle = set()
            started = time.perf_counter()
            await self._discover(force=trigger != "event")
            targets = [h for h in self._ctx.router.game_targets() if self._backoff.ready(h.name)]
            cache = _PreparedCache()
            async with asyncio.TaskGroup() as tg:
                for target in targets:
                    tg.create_task(self._deliver(target, cache))
            self._ctx.memory.idle()
            self._ctx.metrics.sync_cycles.labels(trigger=trigger).inc()
            self._ctx.metrics.sync_cycle_duration.observe(time.perf_counter() - started)

    async def _discover(self, *, force: bool) -> None:
        """Scan sources that changed; on the interval (``force``) scan them all.

        The stat-based change check can miss a commit that leaves the WAL the same
        size within one timestamp tick; the periodic forced scan bounds that delay.
        """
        s = self._ctx.settings
        if self._rescan_sources:
            self._rescan_sources = False
            await self._forget_replaced_sources()
            for path in await asyncio.to_thread(discover_sources, s.games_dir, exclude=s.synced_dir):
                key = path.relative_to(s.games_dir).as_posix()  # stable across restarts
                if key not in self._sources:
                    self._sources[key] = await asyncio.to_thread(
                        GameSource, path, active_timeout=s.active_game_timeout)
                    self._inodes[key] = _inode(path)
        names = [h.name for h in self._ctx.router.game_targets()]
        for key, source in list(self._sources.items()):
            if force or source.changed():
                await self._scan(key, source, names, force=force)

    async def _forget_replaced_sources(self) -> None:
        """Close sources whose file was removed, renamed away or replaced by a new file."""
        games_dir = self._ctx.settings.games_dir
        for key in list(self._sources):
            if _inode(games_dir / key) != self._inodes.get(key):
                source = self._sources.pop(key)
                self._inodes.pop(key, None)
                if self._source_errors.pop(key, None) is not None:
                    self._ctx.metrics.sources_unreadable.set(len(self._source_errors))
                    self._update_health()
                await asyncio.to_thread(source.close)
                log.info("source %s was moved or replaced; rescanning", key)

    async def _scan(self, key: str, source: GameSource, targets: list[str], *,
                    force: bool = False) -> None:
        reconnects = source.reconnects
        try:
            scan = await asyncio.to_thread(source.scan_all)
            if force:
                await self._check_deleted(key, source)
        except (CorruptDataError, sqlite3.OperationalError) as exc:
            await self._source_failed(key, source, exc)
            return
        self._source_recovered(key)
        m = self._ctx.metrics
        m.source_lost_locks.inc(source.reconnects - reconnects)
        if scan.completed:
            games = [DiscoveredGame(g.game_id, key, g.config_key) for g in scan.completed]
            new = self._ctx.manifest.record_discovered(games, targets)
            m.games_discovered.inc(new)
        if scan.changed:  # rows added to shipped games: their holders get them merged by key
            self._ctx.manifest.requeue([g.game_id for g in scan.changed])
            m.source_games_changed.inc(len(scan.changed))
        m.source_games_given_up.inc(scan.given_up)

    async def _check_deleted(self, key: str, source: GameSource) -> None:
        """Look for a slice of this source's shipped games that were deleted there since."""
        after = self._deleted_after.get(key, "")
        ids = self._ctx.manifest.delivered_from(key, DELETED_CHECK_SLICE, after=after)
        self._deleted_after[key] = ids[-1] if len(ids) == DELETED_CHECK_SLICE else ""
        gone = [g for g in await asyncio.to_thread(source.missing, ids)
                if g not in self._deleted_seen]
        if gone:
            self._deleted_seen.update(gone)
            self._ctx.metrics.source_games_deleted.inc(len(gone))
            log.warning("%d games shipped from %s were deleted there since (first %s); their "
                        "copies at the targets stay", len(gone), key, gone[0])

    async def _source_failed(self, key: str, source: GameSource, exc: Exception) -> None:
        """An unreadable source is loud: one log line when it starts failing, metrics, health."""
        kind = "corrupt" if isinstance(exc, CorruptDataError) else "busy"
        self._ctx.metrics.source_read_errors.labels(kind=kind).inc()
        # A view gone stale (e.g. its WAL deleted under it) heals with a fresh connection;
        # the cursor stays, so nothing already found is reported again.
        await asyncio.to_thread(source.close)
        if key not in self._source_errors:
            log.error("cannot read source %s (%s); its games are not shipped until it reads "
                      "again, retried every cycle: %s", key, kind, exc)
        self._source_errors[key] = f"source {key} unreadable ({kind}): {exc}"
        self._ctx.metrics.sources_unreadable.set(len(self._source_errors))
        self._update_health()

    def _source_recovered(self, key: str) -> None:
        if self._source_errors.pop(key, None) is not None:
            log.info("source %s is readable again", key)
            self._ctx.metrics.sources_unreadable.set(len(self._source_errors))
            self._update_health()

    # -- delivery ----------------------------------------------------------------------------

    async def _deliver(self, target: Host, cache: _PreparedCache) -> None:
        """Drain ``target``'s outbox: prepare the next batch while earlier ones are in flight.

        Two pushes in flight let the receiver read and check one batch while it merges
        the other; each batch is acknowledged on its own, so order does not matter.
        """
        queue: asyncio.Queue[Prepared | None] = asyncio.Queue(maxsize=1)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._produce(target.name, queue, cache))
                for _ in range(PUSHES_IN_FLIGHT):
                    tg.create_task(self._consume(target, queue))
        except* (TransportError, CorruptDataError) as group:
            self._peer_failed(target.name, group.exceptions[0])
        else:
            self._backoff.succeeded(target.name)
            if target.name in self._rejected_in_cycle:
                return  # reachable, but a batch is still refused: stay degraded, log nothing new
            if self._failing.pop(target.name, None) is not None:
                log.info("delivery to %s recovered; its backlog is delivered", target.name)
                self._update_health()
        finally:
            self._ctx.metrics.outbox_games.labels(peer=target.name).set(
                self._ctx.manifest.outbox_size(target.name))

    async def _produce(self, target: str, queue: asyncio.Queue[Prepared | None],
                       cache: _PreparedCache) -> None:
        """Walk ``target``'s whole outbox once, a batch at a time, in game-id order."""
        batch_games = self._ctx.settings.batch_games
        after = ""
        while not self._stopping:
            page = self._ctx.manifest.pending(target, batch_games, after=after)
            if not page:
                break
            after = page[-1].game_id
            by_source: dict[str, list[str]] = {}
            for game in page:
                by_source.setdefault(game.source, []).append(game.game_id)
            for source, ids in by_source.items():
                await queue.put(await self._prepared(source, tuple(ids), target, cache))
        for _ in range(PUSHES_IN_FLIGHT):
            await queue.put(None)  # one end marker per consumer

    async def _prepared(self, source: str, ids: tuple[str, ...], target: str,
                        cache: _PreparedCache) -> Prepared:
        """Extract and encode once, whichever target asks first."""
        try:
            prepared = await cache.get((source, ids), lambda: asyncio.to_thread(self._extract, source, ids))
        except (CorruptDataError, sqlite3.OperationalError) as exc:
            src = self._sources.get(source)
            if src is not None:
                await self._source_failed(source, src, exc)  # loud once; the games stay queued
            prepared = []
        self._note_missing(source, ids, prepared, target)
        return prepared

    def _extract(self, source: str, ids: Sequence[str]) -> Prepared:
        src = self._sources.get(source)
        if src is None:
            return []
        batches = src.extract(ids, source_node=self._ctx.settings.node_id)
        out: Prepared = []
        for batch in batches:
            payload = encode_batch(batch)
            if len(payload) <= self._ctx.settings.max_batch_bytes:
                out.append((payload, content_digest(payload), batch.game_ids))
            elif len(batch.game_ids) > 1:  # receivers would answer 413 forever: halve it
                half = len(batch.game_ids) // 2
                out += self._extract(source, batch.game_ids[:half])
                out += self._extract(source, batch.game_ids[half:])
            else:
                log.error("game %s from %s is %d bytes as a batch, over RINGRIFT_MAX_BATCH_BYTES=%d; "
                          "it stays queued until the limit is raised on this node and its targets",
                          batch.game_ids[0], source, len(payload), self._ctx.settings.max_batch_bytes)
        return out

    def _note_missing(self, source: str, ids: tuple[str, ...], prepared: Prepared,
                      target: str) -> None:
        """Games not found where the manifest says they are stay queued, never dropped.

        A rotated or renamed DB is found again by the next rescan, which points the
        manifest at the new path; a busy or broken source is retried next cycle.
        """
        found = {gid for _, _, gids in prepared for gid in gids}
        missing = len(ids) - len(found)
        if missing and source not in self._missing_reported:
            self._missing_reported.add(source)
            log.error("%d games owed to %s are not readable in source %s now; they stay queued "
                      "and ship when the file is found again", missing, target, source)
        elif not missing:
            self._missing_reported.discard(source)

    async def _consume(self, target: Host, queue: asyncio.Queue[Prepared | None]) -> None:
        while (prepared := await queue.get()) is not None:
            for payload, digest, game_ids in prepared:
                try:
                    await self._push(target, payload, digest, game_ids)
                except PeerRejectedError as exc:
                    if exc.status not in _BATCH_SPECIFIC:
                        raise  # e.g. 401/403: every batch would fail; back off this peer
                    self._batch_rejected(target.name, exc, game_ids)

    def _batch_rejected(self, peer: str, exc: PeerRejectedError, game_ids: tuple[str, ...]) -> None:
        """One batch refused: it stays queued and the rest of the outbox goes on."""
        self._ctx.metrics.batches_sent.labels(peer=peer, outcome="rejected").inc()
        self._rejected_in_cycle.add(peer)
        if peer not in self._failing:
            log.error("%s rejected a batch of %d games (first %s); they stay queued, the rest "
                      "of the outbox continues: %s", peer, len(game_ids), game_ids[0], exc)
        self._failing[peer] = f"batch rejected: {exc}"
        self._update_health()

    async def _push(self, target: Host, payload: bytes, digest: str, game_ids: tuple[str, ...]) -> None:
        m = self._ctx.metrics
        started = time.perf_counter()
        try:
            result = await self._transport.push_games(target, payload, digest)
        except PeerRejectedError:
            raise
        except TransportError:
            m.batches_sent.labels(peer=target.name, outcome="failed").inc()
            raise
        if result.inserted + result.duplicates != len(game_ids):
            m.batches_sent.labels(peer=target.name, outcome="failed").inc()
            raise TransportError(target.name, f"acknowledged {result.inserted + result.duplicates} "
                                              f"of {len(game_ids)} games")
        self._ctx.manifest.ack(target.name, game_ids)
        self._acked_in_cycle += 1
        m.push_duration.observe(time.perf_counter() - started)
        m.batches_sent.labels(peer=target.name, outcome="ok").inc()
        m.bytes_sent.labels(peer=target.name).inc(len(payload))
        self._ctx.memory.note(len(payload))
        m.games_shipped.labels(peer=target.name).inc(result.inserted)
        m.games_already_present.labels(peer=target.name).inc(result.duplicates)

    def _peer_failed(self, peer: str, exc: BaseException) -> None:
        delay = self._backoff.failed(peer)
        reason = str(exc)
        if peer not in self._failing:
            level = logging.ERROR if isinstance(exc, PeerRejectedError) else logging.WARNING
            log.log(level, "delivery to %s failing (retry in %.0fs): %s", peer, delay, reason)
        self._failing[peer] = reason
        self._update_health()

    def _update_health(self) -> None:
        if self._failing or self._source_errors:
            detail = "; ".join([*(f"{p}: {r}" for p, r in sorted(self._failing.items())),
                                *(r for _, r in sorted(self._source_errors.items()))])
            self._health = Health(HealthState.DEGRADED, detail[:500])
        else:
            self._health = Health(HealthState.HEALTHY)


def _inode(path: Path) -> int:
    try:
        return path.stat().st_ino
    except OSError:
        return -1
