"""Auto-sync's side of shared storage: the sharer election, and targets that see our data dir."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from ringsync.errors import TransientError, TransportError
from ringsync.inventory import Host
from ringsync.node import NodeContext
from ringsync.policy.shared_storage import (
    SharerElection,
    Siblings,
    all_skipped,
    storage_groups,
)
from ringsync.store.sharedir import read_heartbeats, write_heartbeat
from ringsync.transport.base import GameTransport

log = logging.getLogger(__name__)

_SHARED = "shared"  # the manifest's note on games held by a target through shared storage
_ACK_PAGE = 10_000


class StorageSharing:
    """Decides who ships a shared data dir's games, and records games held through it as such."""

    def __init__(self, ctx: NodeContext, transport: GameTransport) -> None:
        self._ctx = ctx
        self._transport = transport
        self._election = SharerElection(ctx.settings.node_id,
                                        window=sharer_window(ctx.settings.sync_interval))
        self._beats = 0
        self._beat_at = 0.0
        self._shipper: bool | None = None
        self._sharing: set[str] = set()
        self._all_shared_warned = False
        self._siblings: dict[str, Siblings] = {}

    def log_storage(self) -> None:
        s, own = self._ctx.settings, self._ctx.shared.own
        if own.network:
            log.info("data dir %s is on %s (%s), id %s: a peer that uses this same data dir is "
                     "not sent games (decided per peer); every other peer is", s.data_dir,
                     own.fstype, own.mount_source, own.data_dir_id)

    async def elect(self) -> bool:
        """Beat our heartbeat, watch the other sharers' and say whether this node ships.

        Nodes that use one data dir find the same source DBs; only the elected one
        (smallest name alive) sends them, so each game leaves the shared dir once.
        """
        s = self._ctx.settings
        now = time.monotonic()
        if self._shipper is not None and now - self._beat_at < BEAT_EVERY:
            return self._shipper  # a commit-driven cycle every few ms need not touch the files
        self._beat_at = now
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

    async def shares(self, target: Host) -> bool:
        """Whether ``target`` uses our data dir; its marker is asked for when unknown or old."""
        await self._probe(target)
        sharing = self._ctx.shared.shares(target.name, time.monotonic())
        if sharing:
            self._note_sharing(target.name)
        elif target.name in self._sharing:
            self._sharing.discard(target.name)
            log.info("%s no longer uses this node's data dir: games are sent to it again", target.name)
        return sharing

    async def _probe(self, target: Host) -> TransientError | None:
        """Ask ``target`` for its marker when unknown or old; the error when it is unreachable."""
        shared = self._ctx.shared
        if not shared.needs_probe(target.name, time.monotonic()):
            return None
        try:
            marker = await self._transport.peer_data_dir_id(target)
        except TransportError as exc:  # unknown: send (the receiver de-duplicates)
            log.debug("cannot learn %s's data dir id: %s", target.name, exc)
            shared.forget(target.name)
            return exc if isinstance(exc, TransientError) else None
        shared.learned(target.name, marker, time.monotonic())
        return None

    async def siblings(self, targets: Sequence[Host]) -> tuple[dict[str, Siblings],
                                                                dict[str, TransientError]]:
        """Targets that use one data dir with another target (not ours), by target name; and
        the targets the probe found unreachable, with why.

        Probes every target's marker first, at once, so the decision is made once per cycle,
        before any delivery starts, and a cut-off target costs the cycle one connect timeout,
        not one per target. A target whose push failed has no known marker until it
        answers again, so its siblings are sent to meanwhile.
        """
        errors = await asyncio.gather(*(self._probe(t) for t in targets))
        unreachable = {t.name: e for t, e in zip(targets, errors, strict=True) if e is not None}
        for target in targets:
            if target.name not in unreachable:
                await self.shares(target)  # the marker is fresh now: no second request
        return self._grouped([t.name for t in targets]), unreachable

    async def siblings_of(self, target: Host, targets: Sequence[str]
                          ) -> tuple[Siblings | None, TransientError | None]:
        """``target``'s siblings among ``targets`` (None: it has none), or why it is unreachable.

        For one target's own delivery: only ``target`` is probed; the others count with
        the markers their own deliveries learnt, so that a cut-off target never costs
        another one a connect timeout. A target whose marker is not known yet is its own
        group: until it is, a sibling may be sent games its data dir holds already (the
        receiver de-duplicates them; it costs a transfer, once).
        """
        error = await self._probe(target)
        if error is not None:
            return None, error
        await self.shares(target)
        return self._grouped(targets).get(target.name), None

    def _grouped(self, targets: Sequence[str]) -> dict[str, Siblings]:
        """Storage groups from the markers known now (not ours); a new group is logged once."""
        now = time.monotonic()
        markers = {t: self._ctx.shared.marker_of(t, now) for t in targets if t not in self._sharing}
        groups = storage_groups(targets, markers)
        for name, group in groups.items():
            if name != group.pusher and self._siblings.get(name) != group:
                log.warning("%s uses the same data dir as %s: games go to %s only and count as "
                            "held by both (one copy on that storage)", name, group.pusher,
                            group.pusher)
        self._siblings = groups
        return groups

    async def held_with(self, target: str, others: Sequence[str]) -> None:
        """Games the other targets on ``target``'s data dir acknowledged are held by it too."""
        manifest = self._ctx.manifest  # in a worker thread: a large manifest must not stall the loop
        while ids := await asyncio.to_thread(manifest.held_by, target, others, _ACK_PAGE):
            await self._ack_shared(target, ids)

    def marker_for(self, target: str) -> str | None:
        """Our data dir id, sent with a push to a target that may share it (None: never skipped)."""
        shared = self._ctx.shared
        return shared.own.data_dir_id if shared.may_skip(target) else None

    def push_failed(self, target: str) -> None:
        self._ctx.shared.forget(target)  # it may come back with another data dir

    async def held_there(self, target: str, marker: str, game_ids: Sequence[str]) -> None:
        """``target`` answered a push: it uses our data dir, so it holds these games already."""
        self._ctx.shared.learned(target, marker, time.monotonic())
        self._note_sharing(target)
        await self._ack_shared(target, game_ids)

    async def skip_all(self, target: str) -> None:
        """Everything owed to a target that sees our data dir is held by it already."""
        manifest = self._ctx.manifest
        while page := await asyncio.to_thread(manifest.pending, target, _ACK_PAGE):
            await self._ack_shared(target, [g.game_id for g in page])

    def warn_if_all_shared(self) -> None:
        targets = [h.name for h in self._ctx.router.game_targets()]
        if all_skipped(targets, self._sharing):
            if not self._all_shared_warned:
                self._all_shared_warned = True
                log.warning("every target of this node (%s) uses its data dir %s: no games leave "
                            "it, so they exist only on that shared storage", ", ".join(targets),
                            self._ctx.settings.data_dir)
        else:
            self._all_shared_warned = False

    def _note_sharing(self, target: str) -> None:
        if target not in self._sharing:
            self._sharing.add(target)
            log.info("%s uses this node's data dir %s (shared storage): its games are recorded as "
                     "held there, not sent", target, self._ctx.settings.data_dir)

    async def _ack_shared(self, target: str, game_ids: Sequence[str]) -> None:
        await asyncio.to_thread(self._ctx.manifest.ack, target, game_ids, note=_SHARED)
        self._ctx.shared.skipped(target, len(game_ids))
        self._ctx.metrics.shared_storage_skips.labels(peer=target).inc(len(game_ids))


# Heartbeats at most this often (the liveness window is at least 60 s).
BEAT_EVERY = 5.0


def sharer_window(sync_interval: float) -> float:
    """How long a sharer whose heartbeat stopped changing still counts as alive.

    Heartbeats change every cycle (at most ~1.1 intervals apart); NFS may show a
    change up to a minute late (attribute caching), hence the floor.
    """
    return max(60.0, 4 * sync_interval)


def _heartbeat(state_root: Path, state_dir: Path, beat: int, others: set[str]) -> dict[str, str]:
    write_heartbeat(state_dir, beat)
    return read_heartbeats(state_root, others)
