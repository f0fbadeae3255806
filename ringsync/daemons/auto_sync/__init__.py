"""AutoSyncDaemon: push freshly completed games from local generators to their targets."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ringsync.daemons.auto_sync._batches import BatchBuilder, Prepared
from ringsync.daemons.auto_sync._sharing import StorageSharing
from ringsync.daemons.auto_sync._sources import LocalSources
from ringsync.daemons.auto_sync.triggers import Trigger
from ringsync.daemons.base import Daemon, DaemonType, Health, HealthState
from ringsync.daemons.watcher import watch_sources
from ringsync.errors import (
    BatchRejectedError,
    CorruptDataError,
    PeerRejectedError,
    TransportError,
)
from ringsync.inventory import Host
from ringsync.node import NodeContext, circuit_since
from ringsync.policy.backoff import Clock
from ringsync.policy.breaker import BreakerState, CircuitBreaker
from ringsync.policy.delivery import DeliveryPolicy, Outcome
from ringsync.policy.shared_storage import Siblings
from ringsync.store.ringrift_schema import MIN_MOVES_REQUIRED
from ringsync.transport.base import GameTransport
from ringsync.transport.select import TransportChain, build_transport, count_attempts

log = logging.getLogger(__name__)

PUSHES_IN_FLIGHT = 2


@dataclass
class _Pushed:
    """Whether a delivery pushed anything (a probe that pushed nothing gives no verdict)."""

    started: bool = False


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
        retry_initial: float = 1.0, clock: Clock = time.monotonic,
    ) -> None:
        s = ctx.settings
        self._ctx = ctx
        self._transport = game_chain(ctx, transport)
        self._policy = DeliveryPolicy(self._circuits, retry_initial=retry_initial,
                                      retry_max=max(1.0, min(60.0, s.sync_interval)), clock=clock)
        self._sources = LocalSources(ctx, on_change=self._update_health)
        self._sharing = StorageSharing(ctx, self._transport)
        self._stopping = False
        self._cycle_lock = asyncio.Lock()
        self._health = Health(HealthState.STARTING)
        self._acked_in_cycle = 0
        self._refused_warned: set[str] = set()
        self._batches = BatchBuilder(self._sources, node_id=s.node_id,
                                     max_batch_bytes=s.max_batch_bytes, batch_games=s.batch_games)

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
            self._ctx.metrics.sync_cycles.labels(trigger=Trigger.EXCLUDED_SKIP).inc()
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
        trigger = Trigger.STARTUP
        while not self._stopping:
            await self.sync_once(trigger)
            trigger = Trigger.BACKLOG if await self._backlog_waiting() else await self._wait_for_trigger()

    async def _backlog_waiting(self) -> bool:
        """A large first scan goes on, or games arrived during the cycle for a target that
        is not backing off."""
        if self._sources.scanning:
            return True
        if self._acked_in_cycle == 0:  # owed games that could not be read: wait, don't spin
            return False
        for h in self._ctx.router.game_targets():
            if self._policy.ready(h.name) and await asyncio.to_thread(
                    self._ctx.manifest.has_pending, h.name):
                return True
        return False

    async def _wait_for_trigger(self) -> Trigger:
        """Sleep until an event or the (jittered) interval; coalesce a burst of events."""
        interval = self._ctx.settings.sync_interval * random.uniform(0.9, 1.1)
        try:
            async with asyncio.timeout(interval):
                await self._ctx.sync_wakeup.wait()
        except TimeoutError:
            return Trigger.INTERVAL
        await asyncio.sleep(self._ctx.settings.debounce)
        self._ctx.sync_wakeup.clear()
        return Trigger.EVENT

    # -- one cycle ---------------------------------------------------------------------------

    async def sync_once(self, trigger: Trigger = Trigger.MANUAL) -> None:
        """Discover completed games, then deliver every target's outbox."""
        async with self._cycle_lock:
            if trigger.rescans:
                self._sources.request_rescan()
            self._acked_in_cycle = 0
            self._policy.new_cycle()
            started = time.perf_counter()
            if await self._sharing.elect():
                await self._sources.discover(force=trigger.rescans)
            targets = self._choose_targets()
            self._batches.new_cycle()
            siblings, unreachable = await self._sharing.siblings(targets)
            for name, exc in unreachable.items():  # its delivery would fail the same way
                self._report(name, self._policy.failed(name, exc), exc)
            targets = [t for t in targets if t.name not in unreachable]
            async with asyncio.TaskGroup() as tg:
                for target in targets:
                    tg.create_task(self._deliver(target, siblings.get(target.name)))
            self._batches.end_cycle()
            self._sharing.warn_if_all_shared()
            self._update_health()  # a transport's breaker may have moved while games flowed
            self._ctx.memory.idle()
            self._ctx.metrics.sync_cycles.labels(trigger=trigger).inc()
            self._ctx.metrics.sync_cycle_duration.observe(time.perf_counter() - started)

    # -- delivery ----------------------------------------------------------------------------

    def _choose_targets(self) -> list[Host]:
        """The targets this cycle delivers to: not backing off, some transport not open."""
        hosts = {h.name: h for h in self._ctx.router.game_targets()}
        return [hosts[name] for name in self._policy.choose(hosts)]

    def _circuits(self, peer: str) -> list[CircuitBreaker]:
        return self._transport.circuits(self._ctx.settings.inventory.get(peer) or Host(name=peer))

    async def _deliver(self, target: Host, siblings: Siblings | None) -> None:
        """Drain ``target``'s outbox: prepare the next batch while earlier ones are in flight.

        Two pushes in flight let the receiver read and check one batch while it merges
        the other; each batch is acknowledged on its own, so order does not matter.
        A target on our data dir is sent nothing; of targets that share one data dir
        (``siblings``) only one is sent games, and each counts what the others hold.
        """
        pushed = _Pushed()
        try:
            await self._deliver_outbox(target, siblings, pushed)
        except* (TransportError, CorruptDataError) as group:
            self._report(target.name, self._policy.failed(target.name, group.exceptions[0]),
                         group.exceptions[0])
        else:
            outcome = (self._policy.delivered(target.name) if pushed.started
                       else self._policy.released(target.name))
            self._report(target.name, outcome, None)
        finally:
            self._ctx.metrics.outbox_games.labels(peer=target.name).set(
                await asyncio.to_thread(self._ctx.manifest.outbox_size, target.name))

    async def _deliver_outbox(self, target: Host, siblings: Siblings | None,
                              pushed: _Pushed) -> None:
        if await self._sharing.shares(target):
            await self._sharing.skip_all(target.name)
            return
        if siblings is not None:
            await self._sharing.held_with(target.name, siblings.others)
            if siblings.pusher != target.name:
                return
        # A probe of a half-open breaker is one push at a time: a peer that is still down
        # costs one failed attempt, not one per push slot.
        in_flight = 1 if self._policy.probing(target.name) else PUSHES_IN_FLIGHT
        queue: asyncio.Queue[Prepared | None] = asyncio.Queue(maxsize=1)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._produce(target.name, queue, in_flight))
            for _ in range(in_flight):
                tg.create_task(self._consume(target, queue, pushed))

    async def _produce(self, target: str, queue: asyncio.Queue[Prepared | None],
                       consumers: int) -> None:
        """Walk ``target``'s whole outbox once, a batch at a time, in game-id order.

        A batch is at most RINGRIFT_SYNC_BATCH_GAMES games and about the builder's bytes.
        """
        after = ""
        while not self._stopping:
            size = self._batches.page_size()
            page = await asyncio.to_thread(self._ctx.manifest.pending, target, size, after=after)
            if not page:
                break
            after = page[-1].game_id
            by_source: dict[str, list[str]] = {}
            for game in page:
                by_source.setdefault(game.source, []).append(game.game_id)
            for source, ids in by_source.items():
                await queue.put(await self._batches.batches(source, tuple(ids), target))
        for _ in range(consumers):
            await queue.put(None)  # one end marker per consumer

    async def _consume(self, target: Host, queue: asyncio.Queue[Prepared | None],
                       pushed: _Pushed) -> None:
        while (prepared := await queue.get()) is not None:
            for payload, digest, game_ids in prepared:
                pushed.started = True
                try:
                    await self._push(target, payload, digest, game_ids)
                except BatchRejectedError as exc:  # other refusals fail every batch: back off
                    self._batch_rejected(target.name, exc, game_ids)

    def _batch_rejected(self, peer: str, exc: BatchRejectedError, game_ids: tuple[str, ...]) -> None:
        """One batch refused: it stays queued and the rest of the outbox goes on."""
        self._ctx.metrics.batches_sent.labels(peer=peer, outcome="rejected").inc()
        if self._policy.rejected(peer, f"batch rejected: {exc}"):
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

    def _report(self, peer: str, outcome: Outcome, exc: BaseException | None) -> None:
        """Log the transitions of one delivery's outcome, once each."""
        if outcome.began_failing:
            level = logging.ERROR if isinstance(exc, PeerRejectedError) else logging.WARNING
            log.log(level, "delivery to %s failing (retry in %.0fs): %s", peer, outcome.retry_in, exc)
        if outcome.recovered:
            log.info("delivery to %s recovered; its backlog is delivered", peer)
        if outcome.began_failing or outcome.recovered:
            self._update_health()

    def _update_health(self) -> None:
        failing, unreadable = self._policy.failing, self._sources.errors
        open_ = [circuit_since(self._ctx.breakers, b) for h in self._ctx.router.game_targets()
                 for b in self._circuits(h.name) if b.state is not BreakerState.CLOSED]
        if failing or unreadable or open_:
            detail = "; ".join([*open_, *(f"{p}: {r}" for p, r in sorted(failing.items())),
                                *(r for _, r in sorted(unreadable.items()))])
            self._health = Health(HealthState.DEGRADED, detail[:500])
        else:
            self._health = Health(HealthState.HEALTHY)


def game_chain(ctx: NodeContext, transport: GameTransport | None) -> TransportChain:
    """The games chain behind the node's breakers; a given transport (tests) is its one step."""
    attempts = count_attempts(ctx.metrics, "games")
    if transport is None:
        return build_transport(ctx.settings, ctx.breakers, limiter=ctx.bandwidth, on_attempt=attempts,
                               tunnels=ctx.ssh())
    if isinstance(transport, TransportChain):
        return transport
    return TransportChain({transport.name: transport}, (transport.name,), ctx.breakers,
                          on_attempt=attempts)
