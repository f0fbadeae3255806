"""AutoSyncDaemon: push freshly completed games from local generators to their targets."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ringsync.daemons.auto_sync._batches import BatchBuilder, Prepared
from ringsync.daemons.auto_sync._sharing import StorageSharing
from ringsync.daemons.auto_sync._sources import LocalSources
from ringsync.daemons.auto_sync._targets import TargetLoops
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
class _Pass:
    """What one delivery pass did (a probe that pushed nothing gives no verdict)."""

    pushed: bool = False


class AutoSyncDaemon(Daemon):
    """Wakes on a generator's commit (inotify, /v1/notify) or every RINGRIFT_SYNC_INTERVAL.

    Each cycle finds newly completed games in the local selfplay DBs and records them in
    the manifest's outbox for every target. Each target has its own delivery loop, woken
    by the cycles that queued games for it or by its retry/breaker timer, that drains its
    outbox in batches, acknowledging a batch only after the target merged it: a slow or
    dead target holds its own games (exactly once), never the cycles or the others.
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
        self._sources = LocalSources(ctx, on_change=self._update_health,
                                     on_games_changed=self._games_changed)
        self._sharing = StorageSharing(ctx, self._transport)
        self._stopping = False
        self._discovery_lock = asyncio.Lock()
        self._targets = TargetLoops(self._own_pass, self._owes)
        self._routed: list[str] | None = None  # the targets the manifest was last told of
        self._health = Health(HealthState.STARTING)
        self._running = False
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
            targets = self._routed = [h.name for h in self._ctx.router.game_targets()]
            queued = await asyncio.to_thread(self._ctx.manifest.ensure_targets, targets)
            log.info("auto-sync targets: %s (%d games re-queued)", ", ".join(targets) or "none", queued)
            self._sharing.log_storage()
            await self._sharing.elect()  # our heartbeat is visible to the other sharers before we are ready
            async with asyncio.TaskGroup() as tg:
                self._targets.start(tg)
                tg.create_task(watch_sources(self._ctx.settings, self._on_fs_event))
                self._health = Health(HealthState.HEALTHY)
                self._running = True
                ready()
                await self._loop()
        finally:
            self._targets.stop()
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
        self._targets.stop()
        async with self._discovery_lock:  # the cycle in flight finishes
            pass
        await self._targets.idle()  # the passes in flight finish and acknowledge

    async def close(self) -> None:
        """Release sources and connections; run() does this itself on the way out."""
        await self._close()

    async def _close(self) -> None:
        await self._sources.close()
        await self._transport.close()

    def health(self) -> Health:
        if self._running:  # breakers move between passes too: what an operator sees is now
            self._update_health()
        return self._health

    # -- triggers ----------------------------------------------------------------------------

    def _on_fs_event(self, database: Path | None) -> None:
        self._sources.on_file_event(database)
        self._ctx.sync_wakeup.set()

    async def _loop(self) -> None:
        trigger = Trigger.STARTUP
        while not self._stopping:
            await self._cycle(trigger)
            trigger = await self._next_trigger()

    async def _backlog_waiting(self) -> bool:
        """A large first scan goes on: the next cycle reads its next chunk.

        (Games owed to a target are its own loop's business: discovery never waits for them.)
        """
        return self._sources.scanning

    async def _next_trigger(self) -> Trigger:
        """While a large first scan goes on, the next chunk is read once a target took the
        last one (a delivery pass ended), so that the scan runs at the pace of the fastest
        target, not ahead of all of them; otherwise an event or the interval."""
        if not await self._backlog_waiting():
            return await self._wait_for_trigger()
        try:
            async with asyncio.timeout(self._interval()):
                await self._targets.passed.wait()
        except TimeoutError:
            return Trigger.INTERVAL
        return Trigger.BACKLOG

    def _interval(self) -> float:
        return self._ctx.settings.sync_interval * random.uniform(0.9, 1.1)

    async def _wait_for_trigger(self) -> Trigger:
        """Sleep until an event or the (jittered) interval; coalesce a burst of events."""
        try:
            async with asyncio.timeout(self._interval()):
                await self._ctx.sync_wakeup.wait()
        except TimeoutError:
            return Trigger.INTERVAL
        await asyncio.sleep(self._ctx.settings.debounce)
        self._ctx.sync_wakeup.clear()
        return Trigger.EVENT

    # -- cycles ------------------------------------------------------------------------------

    async def _cycle(self, trigger: Trigger) -> None:
        """Find completed games, record them in every target's outbox, wake the targets'
        deliveries; ringsync_sync_cycle_duration_seconds times this (not the deliveries)."""
        async with self._discovery_lock:
            started = time.perf_counter()
            if trigger.rescans:
                self._sources.request_rescan()
            queued = 0
            if await self._sharing.elect():
                queued = await self._sources.discover(force=trigger.rescans)
            queued += await self._route()
            if queued or trigger.rescans:
                self._targets.wake()
            self._ctx.metrics.sync_cycles.labels(trigger=trigger).inc()
            self._ctx.metrics.sync_cycle_duration.observe(time.perf_counter() - started)

    async def _route(self) -> int:
        """A delivery loop per target the router names now; a target that joins (or comes
        back) is owed every game not delivered to it yet. Returns the games queued for it."""
        names = [h.name for h in self._ctx.router.game_targets()]
        queued = 0
        if self._routed is not None and set(names) != set(self._routed):
            queued = await asyncio.to_thread(self._ctx.manifest.ensure_targets, names)
            log.info("auto-sync targets now: %s (%d games queued for new ones)",
                     ", ".join(names) or "none", queued)
        self._routed = names
        self._targets.track(names)
        return queued

    async def sync_once(self, trigger: Trigger = Trigger.MANUAL) -> None:
        """A full pass, for tools and tests: one cycle, then deliver to every target and
        wait for all of them."""
        await self._cycle(trigger)
        targets = self._choose(self._ctx.router.game_targets())
        siblings, unreachable = await self._sharing.siblings(targets)
        for name, exc in unreachable.items():  # its delivery would fail the same way
            self._report(name, self._policy.failed(name, exc), exc)
        async with self._batches.session(), asyncio.TaskGroup() as tg:
            for target in targets:
                if target.name not in unreachable:
                    tg.create_task(self._deliver_alone(target, siblings.get(target.name)))
        self._sharing.warn_if_all_shared()

    def _games_changed(self, game_ids: list[str]) -> None:
        self._batches.changed(game_ids)

    # -- delivery ----------------------------------------------------------------------------

    def _choose(self, hosts: Iterable[Host]) -> list[Host]:
        """Those of ``hosts`` to deliver to now: not backing off, some transport not open."""
        by_name = {h.name: h for h in hosts}
        return [by_name[name] for name in self._policy.choose(by_name)]

    def _circuits(self, peer: str) -> list[CircuitBreaker]:
        return self._transport.circuits(self._ctx.settings.inventory.get(peer) or Host(name=peer))

    async def _own_pass(self, name: str) -> float | None:
        """One pass of ``name``'s own loop; returns when the loop may try again by itself
        (None: when woken), as TargetLoops expects."""
        hosts = {h.name: h for h in self._ctx.router.game_targets()}
        if self._stopping or name not in hosts:
            return None
        if not self._choose([hosts[name]]):  # backing off (maybe since a pass of sync_once's)
            return self._policy.wait(name)
        siblings, unreachable = await self._sharing.siblings_of(hosts[name], list(hosts))
        failed: Outcome | None
        if unreachable is not None:
            failed = self._policy.failed(name, unreachable)
            self._report(name, failed, unreachable)
        else:
            failed = await self._deliver(hosts[name], siblings)  # the loop holds its lock
        self._sharing.warn_if_all_shared()
        return None if failed is None else self._policy.wait(name) or 0.0

    async def _owes(self, name: str) -> bool:
        return await asyncio.to_thread(self._ctx.manifest.has_pending, name)

    async def _deliver_alone(self, target: Host, siblings: Siblings | None) -> Outcome | None:
        """``_deliver``, while no other pass to ``target`` runs (its loop's, or sync_once's)."""
        async with self._targets.lock(target.name):
            return await self._deliver(target, siblings)

    async def _deliver(self, target: Host, siblings: Siblings | None) -> Outcome | None:
        """Drain ``target``'s outbox: prepare the next batch while earlier ones are in flight.

        Two pushes in flight let the receiver read and check one batch while it merges
        the other; each batch is acknowledged on its own, so order does not matter.
        A target on our data dir is sent nothing; of targets that share one data dir
        (``siblings``) only one is sent games, and each counts what the others hold.
        Returns the failure's outcome when the pass stopped on one.
        """
        name = target.name
        this = _Pass()
        failed: Outcome | None = None
        started = time.perf_counter()
        self._policy.new_pass(name)
        try:
            async with self._batches.session():
                await self._deliver_outbox(target, siblings, this)
        except* (TransportError, CorruptDataError) as group:
            failed = self._policy.failed(name, group.exceptions[0])
            self._report(name, failed, group.exceptions[0])
        else:
            outcome = (self._policy.delivered(name) if this.pushed
                       else self._policy.released(name))
            self._report(name, outcome, None)
        finally:
            m = self._ctx.metrics
            m.outbox_games.labels(peer=name).set(
                await asyncio.to_thread(self._ctx.manifest.outbox_size, name))
            m.delivery_pass_duration.labels(peer=name).observe(time.perf_counter() - started)
            self._update_health()  # a transport's breaker may have moved while games flowed
            self._ctx.memory.idle()
        return failed

    async def _deliver_outbox(self, target: Host, siblings: Siblings | None, this: _Pass) -> None:
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
        queue: asyncio.Queue[tuple[Prepared, int] | None] = asyncio.Queue(maxsize=1)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._produce(target.name, queue, in_flight))
            for _ in range(in_flight):
                tg.create_task(self._consume(target, queue, this))

    async def _produce(self, target: str, queue: asyncio.Queue[tuple[Prepared, int] | None],
                       consumers: int) -> None:
        """Walk ``target``'s whole outbox once, a batch at a time, in game-id order.

        A batch is at most RINGRIFT_SYNC_BATCH_GAMES games and about the builder's bytes.
        Games queued meanwhile with ids behind the walk are the next pass's (the cycle
        that queued them woke this target's loop again).
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

    async def _consume(self, target: Host, queue: asyncio.Queue[tuple[Prepared, int] | None],
                       this: _Pass) -> None:
        while (item := await queue.get()) is not None:
            prepared, epoch = item
            for payload, digest, game_ids in prepared:
                this.pushed = True
                try:
                    await self._push(target, payload, digest, game_ids, epoch)
                except BatchRejectedError as exc:  # other refusals fail every batch: back off
                    self._batch_rejected(target.name, exc, game_ids)

    def _batch_rejected(self, peer: str, exc: BatchRejectedError, game_ids: tuple[str, ...]) -> None:
        """One batch refused: it stays queued and the rest of the outbox goes on."""
        self._ctx.metrics.batches_sent.labels(peer=peer, outcome="rejected").inc()
        if self._policy.rejected(peer, f"batch rejected: {exc}"):
            log.error("%s rejected a batch of %d games (first %s); they stay queued, the rest "
                      "of the outbox continues: %s", peer, len(game_ids), game_ids[0], exc)
        self._update_health()

    async def _push(self, target: Host, payload: bytes, digest: str, game_ids: tuple[str, ...],
                    epoch: int) -> None:
        """Push one batch read at change ``epoch`` and acknowledge what the target settled."""
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
        acked = [g for g in game_ids if g not in refused]
        await asyncio.to_thread(self._ctx.manifest.ack, target.name, acked)
        if changed := self._batches.changes.since(epoch, acked):  # read before rows were added
            # Only here: discovery queued the change again for the targets that held it then.
            await asyncio.to_thread(self._ctx.manifest.requeue, changed, target.name)
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
