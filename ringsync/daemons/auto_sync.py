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
from ringsync.daemons.watcher import watch_sources
from ringsync.errors import CorruptDataError, PeerRejectedError, TransportError
from ringsync.inventory import Host
from ringsync.node import NodeContext
from ringsync.policy.shared_storage import SharerElection, all_skipped
from ringsync.policy.sources import SourceKind
from ringsync.protocol.batch import content_digest, encode_batch
from ringsync.store.discovery import SourceFile, discover_sources
from ringsync.store.gamedb import GameSource
from ringsync.store.gamesource import Scan
from ringsync.store.jsonl_source import JsonlIndex, JsonlSource
from ringsync.store.manifest import DiscoveredGame
from ringsync.store.sharedir import read_heartbeats, write_heartbeat
from ringsync.transport.base import GameTransport
from ringsync.transport.http import HttpTransport

log = logging.getLogger(__name__)

PUSHES_IN_FLIGHT = 2
DELETED_CHECK_SLICE = 500  # shipped games checked for deletion at the source per forced scan
_BATCH_SPECIFIC = frozenset({400, 413})  # refusals of this batch, not of us
_SHARED = "shared"  # the manifest's note on games held by a target through shared storage
_ACK_PAGE = 10_000
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
        retry_initial: float = 1.0,
    ) -> None:
        s = ctx.settings
        self._ctx = ctx
        self._transport = transport or HttpTransport(s.node_id, s.auth_token, read_timeout=s.push_timeout)
        self._election = SharerElection(s.node_id, window=sharer_window(s.sync_interval))
        self._beats = 0
        self._shipper: bool | None = None
        self._sharing: set[str] = set()
        self._all_shared_warned = False
        self._sources: dict[str, GameSource | JsonlSource] = {}
        self._jsonl: JsonlIndex | None = None
        self._saved_cursors: dict[str, dict[str, int]] = {}
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
            excluded = self._ctx.router.auto_sync_excluded()
            if excluded is not None:
                await self._run_excluded(ready, excluded)
                return
            targets = [h.name for h in self._ctx.router.game_targets()]
            queued = self._ctx.manifest.ensure_targets(targets)
            log.info("auto-sync targets: %s (%d games re-queued)", ", ".join(targets) or "none", queued)
            self._log_storage()
            await self._elect()  # our heartbeat is visible to the other sharers before we are ready
            async with asyncio.TaskGroup() as tg:
                tg.create_task(watch_sources(self._ctx.settings, self._on_fs_event))
                self._health = Health(HealthState.HEALTHY)
                ready()
                await self._loop()
        finally:
            await asyncio.shield(self._close())

    def _log_storage(self) -> None:
        s, own = self._ctx.settings, self._ctx.shared.own
        if own.network:
            log.info("data dir %s is on %s (%s), id %s: a peer that uses this same data dir is "
                     "not sent games (decided per peer); every other peer is", s.data_dir,
                     own.fstype, own.mount_source, own.data_dir_id)

    async def _run_excluded(self, ready: Callable[[], None], reason: str) -> None:
        # Upstream's auto_sync.exclude_hosts / enabled: false: this node pushes nothing (it
        # still receives); healthy, idle and counted so that status and metrics show it.
        log.info("auto-sync skips this node's cycles: %s", reason)
        self._health = Health(HealthState.HEALTHY, f"skipping: {reason}")
        ready()
        while not self._stopping:
            self._ctx.metrics.sync_cycles.labels(trigger="excluded_skip").inc()
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
        if self._jsonl is not None:
            await asyncio.to_thread(self._jsonl.close)
            self._jsonl = None
        await self._transport.close()

    def health(self) -> Health:
        return self._health

    # -- triggers ----------------------------------------------------------------------------

    def _on_fs_event(self, database: Path | None) -> None:
        # A new job dir or file: look for new sources (only paths the patterns select).
        s = self._ctx.settings
        if database is None:
            self._rescan_sources = True
        elif database.is_relative_to(s.data_dir):
            key = database.relative_to(s.data_dir).as_posix()
            if key not in self._sources and s.source_patterns.classify(key) is not None:
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
            if await self._elect():
                await self._discover(force=trigger != "event")
            targets = [h for h in self._ctx.router.game_targets() if self._backoff.ready(h.name)]
            cache = _PreparedCache()
            async with asyncio.TaskGroup() as tg:
                for target in targets:
                    tg.create_task(self._deliver(target, cache))
            self._warn_if_all_shared()
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
            found = await asyncio.to_thread(discover_sources, s.data_dir, s.source_patterns,
                                            exclude=(s.received_root,))
            for file in found:  # keys: paths under the data dir, stable across restarts
                if file.key not in self._sources:
                    cursors = self._ctx.manifest.child_cursors(file.key)  # the manifest is ours
                    self._sources[file.key] = await asyncio.to_thread(self._open_source, file, cursors)
                    self._inodes[file.key] = _inode(file.path)
        names = [h.name for h in self._ctx.router.game_targets()]
        for key, source in list(self._sources.items()):
            if force or source.changed():
                await self._scan(key, source, names, force=force)

    def _open_source(self, file: SourceFile,
                     cursors: dict[str, int] | None) -> GameSource | JsonlSource:
        if file.kind is SourceKind.DB:
            return GameSource(file.path, active_timeout=self._ctx.settings.active_game_timeout,
                              child_cursors=cursors)
        if self._jsonl is None:
            self._jsonl = JsonlIndex(self._ctx.settings.state_dir / "jsonl.db")
        return JsonlSource(file.path, file.key, self._jsonl, node_id=self._ctx.settings.node_id)

    async def _forget_replaced_sources(self) -> None:
        """Close sources whose file was removed, renamed away or replaced by a new file."""
        data_dir = self._ctx.settings.data_dir
        for key in list(self._sources):
            if _inode(data_dir / key) != self._inodes.get(key):
                source = self._sources.pop(key)
                self._inodes.pop(key, None)
                if self._source_errors.pop(key, None) is not None:
                    self._ctx.metrics.sources_unreadable.set(len(self._source_errors))
                    self._update_health()
                await asyncio.to_thread(source.close)
                log.info("source %s was moved or replaced; rescanning", key)

    async def _scan(self, key: str, source: GameSource | JsonlSource, targets: list[str], *,
                    force: bool = False) -> None:
        reconnects = source.reconnects if isinstance(source, GameSource) else 0
        try:
            if isinstance(source, GameSource):
                scan = await asyncio.to_thread(source.scan_all)
                if force:
                    await self._check_deleted(key, source)
            else:
                scan = Scan(await asyncio.to_thread(source.scan), [], 0)
        except (CorruptDataError, sqlite3.OperationalError, OSError) as exc:
            await self._source_failed(key, source, exc)
            return
        self._source_recovered(key)
        m = self._ctx.metrics
        if isinstance(source, GameSource):
            m.source_lost_locks.inc(source.reconnects - reconnects)
        if scan.completed:
            # A game received from a peer, wherever it was copied to here, is not ours to push.
            received = self._ctx.manifest.received_filter([g.game_id for g in scan.completed])
            games = [DiscoveredGame(g.game_id, key, g.config_key) for g in scan.completed
                     if g.game_id not in received]
            new = self._ctx.manifest.record_discovered(games, targets)
            m.games_discovered.inc(new)
        if scan.changed:  # rows added to shipped games: their holders get them merged by key
            self._ctx.manifest.requeue([g.game_id for g in scan.changed])
            m.source_games_changed.inc(len(scan.changed))
        m.source_games_given_up.inc(scan.given_up)
        if isinstance(source, GameSource):
            self._save_cursors(key, source)
        if isinstance(source, JsonlSource):
            self._jsonl_scanned(source)

    def _jsonl_scanned(self, source: JsonlSource) -> None:
        """Count what the scan skipped; its read position is durable only now, after the manifest."""
        m = self._ctx.metrics
        for reason, n in source.skipped.items():
            if reason == "malformed":
                m.jsonl_malformed_lines.inc(n)
            else:
                m.jsonl_games_skipped.labels(reason=reason).inc(n)
        source.commit()

    def _save_cursors(self, key: str, source: GameSource) -> None:
        """Durable after the changed games were queued: a restart re-finds later late rows."""
        cursors = source.child_cursors
        if cursors is not None and cursors != self._saved_cursors.get(key):
            self._ctx.manifest.save_child_cursors(key, cursors)
            self._saved_cursors[key] = cursors

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

    async def _source_failed(self, key: str, source: GameSource | JsonlSource,
                             exc: Exception) -> None:
        """An unreadable source is loud: one log line when it starts failing, metrics, health."""
        kind = "busy" if isinstance(exc, sqlite3.OperationalError) else "corrupt"
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
        if await self._shares_storage(target):
            self._skip_shared(target.name)
            self._ctx.metrics.outbox_games.labels(peer=target.name).set(0)
            return
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
        except (CorruptDataError, sqlite3.OperationalError, OSError) as exc:
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
        shared = self._ctx.shared
        marker = shared.own.data_dir_id if shared.may_skip(target.name) else None
        try:
            result = await self._transport.push_games(target, payload, digest, data_dir_id=marker)
        except PeerRejectedError:
            raise
        except TransportError:
            m.batches_sent.labels(peer=target.name, outcome="failed").inc()
            shared.forget(target.name)  # it may come back with another data dir
            raise
        if result.shared_storage and marker is not None:  # it told us: it uses our data dir
            shared.learned(target.name, marker, time.monotonic())
            self._note_sharing(target.name)
            self._ack_shared(target.name, game_ids)
            return
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

    # -- shared storage ----------------------------------------------------------------------

    async def _elect(self) -> bool:
        """Beat our heartbeat, watch the other sharers' and say whether this node ships.

        Nodes that use one data dir find the same source DBs; only the elected one
        (smallest name alive) sends them, so each game leaves the shared dir once.
        """
        s = self._ctx.settings
        self._beats += 1
        others = set(s.inventory.hosts) - {s.node_id}
        beats = await asyncio.to_thread(_heartbeat, s.state_root, s.state_dir, self._beats, others)
        now = time.monotonic()
        self._election.observe(beats, now)
        ships = self._election.is_shipper(now)
        if ships != self._shipper:
            self._shipper = ships
            self._ctx.metrics.shared_dir_shipper.set(1 if ships else 0)
            sharers = self._election.alive(now)
            if sharers:
                log.info("data dir %s is shared with %s; %s ships the games generated in it",
                         s.data_dir, ", ".join(sharers), self._election.shipper(now))
        return ships

    async def _shares_storage(self, target: Host) -> bool:
        """Whether ``target`` uses our data dir; its marker is asked for when unknown or old."""
        shared = self._ctx.shared
        if shared.needs_probe(target.name, time.monotonic()):
            try:
                marker = await self._transport.peer_data_dir_id(target)
            except TransportError as exc:  # unknown: send (the receiver de-duplicates)
                log.debug("cannot learn %s's data dir id: %s", target.name, exc)
                shared.forget(target.name)
                return False
            shared.learned(target.name, marker, time.monotonic())
        sharing = shared.shares(target.name, time.monotonic())
        if sharing:
            self._note_sharing(target.name)
        elif target.name in self._sharing:
            self._sharing.discard(target.name)
            log.info("%s no longer uses this node's data dir: games are sent to it again", target.name)
        return sharing

    def _note_sharing(self, target: str) -> None:
        if target not in self._sharing:
            self._sharing.add(target)
            log.info("%s uses this node's data dir %s (shared storage): its games are recorded as "
                     "held there, not sent", target, self._ctx.settings.data_dir)

    def _skip_shared(self, target: str) -> None:
        """Everything owed to a target that sees our data dir is held by it already."""
        while page := self._ctx.manifest.pending(target, _ACK_PAGE):
            self._ack_shared(target, [g.game_id for g in page])

    def _ack_shared(self, target: str, game_ids: Sequence[str]) -> None:
        self._ctx.manifest.ack(target, game_ids, note=_SHARED)
        self._ctx.shared.skipped(target, len(game_ids))
        self._ctx.metrics.shared_storage_skips.labels(peer=target).inc(len(game_ids))

    def _warn_if_all_shared(self) -> None:
        targets = [h.name for h in self._ctx.router.game_targets()]
        if all_skipped(targets, self._sharing):
            if not self._all_shared_warned:
                self._all_shared_warned = True
                log.warning("every target of this node (%s) uses its data dir %s: no games leave "
                            "it, so they exist only on that shared storage", ", ".join(targets),
                            self._ctx.settings.data_dir)
        else:
            self._all_shared_warned = False

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


def sharer_window(sync_interval: float) -> float:
    """How long a sharer whose heartbeat stopped changing still counts as alive.

    Heartbeats change every cycle (at most ~1.1 intervals apart); NFS may show a
    change up to a minute late (attribute caching), hence the floor.
    """
    return max(60.0, 4 * sync_interval)


def _heartbeat(state_root: Path, state_dir: Path, beat: int, others: set[str]) -> dict[str, str]:
    write_heartbeat(state_dir, beat)
    return read_heartbeats(state_root, others)


def _inode(path: Path) -> int:
    try:
        return path.stat().st_ino
    except OSError:
        return -1
