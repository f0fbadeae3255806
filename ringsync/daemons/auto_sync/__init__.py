"""AutoSyncDaemon: push freshly completed games from local generators to their targets."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

from ringsync.daemons.auto_sync._sharing import StorageSharing
from ringsync.daemons.auto_sync._sources import BATCH_BYTES, LocalSources, Prepared, PreparedCache
from ringsync.daemons.base import Daemon, DaemonType, Health, HealthState
from ringsync.daemons.watcher import watch_sources
from ringsync.errors import CorruptDataError, PeerRejectedError, TransportError
from ringsync.inventory import Host
from ringsync.node import NodeContext
from ringsync.policy.peers import PeerDelivery
from ringsync.policy.shared_storage import Siblings
from ringsync.store.ringrift_schema import MIN_MOVES_REQUIRED
from ringsync.transport.base import GameTransport
from ringsync.transport.http import HttpTransport

log = logging.getLogger(__name__)

PUSHES_IN_FLIGHT = 2
_BATCH_SPECIFIC = frozenset({400, 413})  # refusals of this batch, not of us


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
        self._transport = transport or HttpTransport(s.node_id, s.auth_token, read_timeout=s.push_timeout,
                                                     limiter=ctx.bandwidth)
        self._peers = PeerDelivery(retry_initial, max(1.0, min(60.0, s.sync_interval)))
        self._sources = LocalSources(ctx, on_change=self._update_health)
        self._sharing = StorageSharing(ctx, self._transport)
        self._stopping = False
        self._cycle_lock = asyncio.Lock()
        self._health = Health(HealthState.STARTING)
        self._acked_in_cycle = 0
        self._refused_warned: set[str] = set()
        self._bytes_per_game: float | None = None  # learnt by a cycle, used by the next
        self._batch_bytes = min(BATCH_BYTES, s.max_batch_bytes // 2)

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, ready: Callable[[], None]) -> None:
        try:
            excluded = self._ctx.router.auto_sync_excluded()
            if excluded is not None:
                await self._run_excluded(ready, excluded)
                return
            targets = [h.name for h in self._ctx.router.game_targets()]
            queued = await asyncio.to_thread(self._ctx.manifest.ensure_targets, targets)
            log.info("auto-sync targets: %s (%d games re-queued)", ", ".join(targets) or "none", queued)
            self._sharing.log_storage()
            await self._sharing.elect()  # our heartbeat is visible to the other sharers before we are ready
            async with asyncio.TaskGroup() as tg:
                tg.create_task(watch_sources(self._ctx.settings, self._on_fs_event))
                self._health = Health(HealthState.HEALTHY)
                ready()
                await self._loop()
        finally:
            await asyncio.shield(self._close())

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
        await self._sources.close()
        await self._transport.close()

    def health(self) -> Health:
        return self._health

    # -- triggers ----------------------------------------------------------------------------

    def _on_fs_event(self, database: Path | None) -> None:
        self._sources.on_file_event(database)
        self._ctx.sync_wakeup.set()

    async def _loop(self) -> None:
        trigger = "startup"
        while not self._stopping:
            await self.sync_once(trigger)
            trigger = "backlog" if await self._backlog_waiting() else await self._wait_for_trigger()

    async def _backlog_waiting(self) -> bool:
        """A large first scan goes on, or games arrived during the cycle for a target that
        is not backing off."""
        if self._sources.scanning:
            return True
        if self._acked_in_cycle == 0:  # owed games that could not be read: wait, don't spin
            return False
        for h in self._ctx.router.game_targets():
            if self._peers.ready(h.name) and await asyncio.to_thread(
                    self._ctx.manifest.has_pending, h.name):
                return True
        return False

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
                self._sources.request_rescan()
            self._acked_in_cycle = 0
            self._peers.new_cycle()
            started = time.perf_counter()
            if await self._sharing.elect():
                await self._sources.discover(force=trigger != "event")
            targets = [h for h in self._ctx.router.game_targets() if self._peers.ready(h.name)]
            cache = PreparedCache(2 * self._batch_bytes, self._bytes_per_game)
            siblings = await self._sharing.siblings(targets)
            async with asyncio.TaskGroup() as tg:
                for target in targets:
                    tg.create_task(self._deliver(target, cache, siblings.get(target.name)))
            self._bytes_per_game = cache.bytes_per_game
            self._sharing.warn_if_all_shared()
            self._ctx.memory.idle()
            self._ctx.metrics.sync_cycles.labels(trigger=trigger).inc()
            self._ctx.metrics.sync_cycle_duration.observe(time.perf_counter() - started)

    # -- delivery ----------------------------------------------------------------------------

    async def _deliver(self, target: Host, cache: PreparedCache, siblings: Siblings | None) -> None:
        """Drain ``target``'s outbox: prepare the next batch while earlier ones are in flight.

        Two pushes in flight let the receiver read and check one batch while it merges
        the other; each batch is acknowledged on its own, so order does not matter.
        A target on our data dir is sent nothing; of targets that share one data dir
        (``siblings``) only one is sent games, and each counts what the others hold.
        """
        if await self._sharing.shares(target):
            await self._sharing.skip_all(target.name)
            self._ctx.metrics.outbox_games.labels(peer=target.name).set(0)
            return
        if siblings is not None:
            await self._sharing.held_with(target.name, siblings.others)
            if siblings.pusher != target.name:
                owed = await asyncio.to_thread(self._ctx.manifest.outbox_size, target.name)
                self._ctx.metrics.outbox_games.labels(peer=target.name).set(owed)
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
            if self._peers.delivered(target.name):
                log.info("delivery to %s recovered; its backlog is delivered", target.name)
                self._update_health()
        finally:
            self._ctx.metrics.outbox_games.labels(peer=target.name).set(
                await asyncio.to_thread(self._ctx.manifest.outbox_size, target.name))

    async def _produce(self, target: str, queue: asyncio.Queue[Prepared | None],
                       cache: PreparedCache) -> None:
        """Walk ``target``'s whole outbox once, a batch at a time, in game-id order.

        A batch is at most RINGRIFT_SYNC_BATCH_GAMES games and about ``_batch_bytes``.
        """
        batch_games = self._ctx.settings.batch_games
        after = ""
        while not self._stopping:
            size = cache.page_size(batch_games, self._batch_bytes)
            page = await asyncio.to_thread(self._ctx.manifest.pending, target, size, after=after)
            if not page:
                break
            after = page[-1].game_id
            by_source: dict[str, list[str]] = {}
            for game in page:
                by_source.setdefault(game.source, []).append(game.game_id)
            for source, ids in by_source.items():
                await queue.put(await self._sources.prepared(source, tuple(ids), target, cache))
        for _ in range(PUSHES_IN_FLIGHT):
            await queue.put(None)  # one end marker per consumer

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
        if self._peers.rejected(peer, f"batch rejected: {exc}"):
            log.error("%s rejected a batch of %d games (first %s); they stay queued, the rest "
                      "of the outbox continues: %s", peer, len(game_ids), game_ids[0], exc)
        self._update_health()

    async def _push(self, target: Host, payload: bytes, digest: str, game_ids: tuple[str, ...]) -> None:
        m = self._ctx.metrics
        started = time.perf_counter()
        marker = self._sharing.marker_for(target.name)
        try:
            result = await self._transport.push_games(target, payload, digest, data_dir_id=marker)
        except PeerRejectedError:
            raise
        except TransportError:
            m.batches_sent.labels(peer=target.name, outcome="failed").inc()
            self._sharing.push_failed(target.name)
            raise
        if result.shared_storage and marker is not None:  # it told us: it uses our data dir
            await self._sharing.held_there(target.name, marker, game_ids)
            return
        refused = set(result.refused)
        settled = result.inserted + result.duplicates + len(refused)
        if settled != len(game_ids) or not refused <= set(game_ids):
            m.batches_sent.labels(peer=target.name, outcome="failed").inc()
            raise TransportError(target.name, f"acknowledged {settled} of {len(game_ids)} games")
        if refused:
            await self._refused(target.name, sorted(refused))
        await asyncio.to_thread(self._ctx.manifest.ack, target.name,
                                [g for g in game_ids if g not in refused])
        self._acked_in_cycle += 1
        m.push_duration.observe(time.perf_counter() - started)
        m.batches_sent.labels(peer=target.name, outcome="ok").inc()
        m.bytes_sent.labels(peer=target.name).inc(len(payload))
        self._ctx.memory.note(len(payload))
        m.games_shipped.labels(peer=target.name).inc(result.inserted)
        m.games_already_present.labels(peer=target.name).inc(result.duplicates)

    async def _refused(self, peer: str, game_ids: list[str]) -> None:
        """Games the target's RingRift triggers refuse: settled, so the outbox moves on."""
        await asyncio.to_thread(self._ctx.manifest.ack, peer, game_ids, note="refused")
        self._ctx.metrics.games_refused_by_peer.labels(peer=peer).inc(len(game_ids))
        if peer not in self._refused_warned:
            self._refused_warned.add(peer)
            log.warning("%s refused %d completed games with fewer than %d moves (its RingRift "
                        "DB's insert trigger), e.g. %s; they are not sent to it again",
                        peer, len(game_ids), MIN_MOVES_REQUIRED, game_ids[0])

    # -- health ------------------------------------------------------------------------------

    def _peer_failed(self, peer: str, exc: BaseException) -> None:
        delay, began = self._peers.failed(peer, str(exc))
        if began:
            level = logging.ERROR if isinstance(exc, PeerRejectedError) else logging.WARNING
            log.log(level, "delivery to %s failing (retry in %.0fs): %s", peer, delay, exc)
        self._update_health()

    def _update_health(self) -> None:
        failing, unreadable = self._peers.failing, self._sources.errors
        if failing or unreadable:
            detail = "; ".join([*(f"{p}: {r}" for p, r in sorted(failing.items())),
                                *(r for _, r in sorted(unreadable.items()))])
            self._health = Health(HealthState.DEGRADED, detail[:500])
        else:
            self._health = Health(HealthState.HEALTHY)
