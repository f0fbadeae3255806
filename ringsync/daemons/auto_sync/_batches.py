"""Batch building for auto-sync: owed games extracted from their source, encoded, split
under the byte limit, and cached for the targets that owe the same games.

Extraction and encoding run in a worker thread: the event loop never reads SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from ringsync.daemons.auto_sync._sources import _READ_ERRORS, LocalSources
from ringsync.protocol.batch import content_digest, encode_batch

log = logging.getLogger(__name__)

Prepared = list[tuple[bytes, str, tuple[str, ...]]]  # (payload, digest, game ids) per config
CacheKey = tuple[str, tuple[str, ...]]  # (source, game ids)

# Batches are sized to about this many payload bytes (fewer games than RINGRIFT_SYNC_BATCH_GAMES
# when games are large): memory is bounded by bytes, not by a game count (issue 7, A6).
BATCH_BYTES = 8 * 1024 * 1024
FIRST_PAGE = 64  # games in the first batch, before their size is known


def prepared_bytes(prepared: Prepared) -> int:
    return sum(len(payload) for payload, _, _ in prepared)


@dataclass
class PreparedCache:
    """The last batches extracted, shared by the targets that owe them.

    Targets walk their outboxes in the same order, so they usually ask for the same
    batch moments apart; a window of ``capacity_bytes`` (at least the newest batch)
    keeps memory bounded when they drift apart (a late target then extracts again,
    which costs time, not correctness). ``bytes_per_game`` is learnt from the first
    batch and carried over to the caches that follow, so that every target pages its
    outbox the same way and asks for the same batches.
    """

    capacity_bytes: int = 2 * BATCH_BYTES
    bytes_per_game: float | None = None
    done: OrderedDict[CacheKey, Prepared] = field(default_factory=OrderedDict)
    locks: dict[CacheKey, asyncio.Lock] = field(default_factory=dict)
    held: int = 0

    def page_size(self, batch_games: int, budget: int) -> int:
        """Games per outbox page: the configured count, cut to the byte budget."""
        if self.bytes_per_game is None:
            return min(batch_games, FIRST_PAGE)
        return max(1, min(batch_games, int(budget // max(1.0, self.bytes_per_game))))

    async def get(self, key: CacheKey, make: Callable[[], Awaitable[Prepared]]) -> Prepared:
        async with self.locks.setdefault(key, asyncio.Lock()):
            if key not in self.done:
                made = self.done[key] = await make()
                nbytes = prepared_bytes(made)
                self.held += nbytes
                games = sum(len(ids) for _, _, ids in made)
                if self.bytes_per_game is None and games:
                    self.bytes_per_game = nbytes / games
                while len(self.done) > 1 and self.held > self.capacity_bytes:
                    evicted, old = self.done.popitem(last=False)
                    self.held -= prepared_bytes(old)
                    self.locks.pop(evicted, None)
            return self.done[key]


class LateChanges:
    """Games found changed at their source (rows added after completion), with when.

    Delivery and discovery run side by side, so a batch read before a game gained rows can
    be acknowledged after discovery queued the game again for the targets that held it
    (which the in-flight target did not yet): that target would keep the old rows. The
    pusher asks, after each acknowledgement, which of the batch's games changed since it
    was read (``since``) and queues those again. Bounded: the oldest entries are
    forgotten, and a batch older than what is forgotten counts as changed entirely (a
    resend merges by key, so it costs a transfer, never a duplicate).
    """

    def __init__(self, keep: int = 10_000) -> None:
        self.epoch = 0
        self._keep = keep
        self._at: OrderedDict[str, int] = OrderedDict()
        self._forgotten = 0  # the newest epoch among forgotten entries

    def note(self, game_ids: Sequence[str]) -> None:
        self.epoch += 1
        for gid in game_ids:
            self._at[gid] = self.epoch
            self._at.move_to_end(gid)
        while len(self._at) > self._keep:
            _, epoch = self._at.popitem(last=False)
            self._forgotten = max(self._forgotten, epoch)

    def since(self, epoch: int, game_ids: Sequence[str]) -> list[str]:
        """Those of ``game_ids`` that changed after ``epoch`` (all of them if that is unknown)."""
        if epoch < self._forgotten:
            return list(game_ids)
        return [g for g in game_ids if self._at.get(g, 0) > epoch]


class BatchBuilder:
    """Makes the batches deliveries send, at most ``max_batch_bytes`` each, about
    ``batch_bytes`` (learnt per game from the first batch).

    The cache lives while any delivery pass is running (``session``): targets woken
    together by one discovery ask for the same batches moments apart, and each batch is
    extracted and encoded once for all of them; the last pass to end frees it.
    """

    def __init__(self, sources: LocalSources, *, node_id: str, max_batch_bytes: int,
                 batch_games: int) -> None:
        self._sources = sources
        self._node_id = node_id
        self._limit = max_batch_bytes
        self._batch_games = batch_games
        self.batch_bytes = min(BATCH_BYTES, max_batch_bytes // 2)
        self._cache = PreparedCache(2 * self.batch_bytes)
        self._passes = 0
        self.changes = LateChanges()

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[None]:
        """One delivery pass (or a sync_once of several): shares the cache with the others."""
        if self._passes == 0:
            self._renew()
        self._passes += 1
        try:
            yield
        finally:
            self._passes -= 1
            if self._passes == 0:
                self._renew()  # frees the batches; what was learnt of game sizes stays

    def changed(self, game_ids: Sequence[str]) -> None:
        """Discovery found these games changed: cached batches may hold their old rows."""
        if game_ids:
            self.changes.note(game_ids)
            self._renew()

    def _renew(self) -> None:
        # A get in flight on the old cache finishes there; later ones read afresh.
        self._cache = PreparedCache(2 * self.batch_bytes, self._cache.bytes_per_game)

    def page_size(self) -> int:
        """Games per outbox page (RINGRIFT_SYNC_BATCH_GAMES, cut to the bytes)."""
        return self._cache.page_size(self._batch_games, self.batch_bytes)

    async def batches(self, source: str, ids: tuple[str, ...], target: str) -> tuple[Prepared, int]:
        """Extract and encode once, whichever target asks first; unreadable games stay queued.

        Returns the batches and the change epoch they are at least as new as (see LateChanges).
        """
        epoch = self.changes.epoch  # a cached batch was read after the last change noted
        try:
            prepared = await self._cache.get(
                (source, ids), lambda: asyncio.to_thread(self._extract, source, ids))
        except _READ_ERRORS as exc:
            await self._sources.read_failed(source, exc)  # loud once; the games stay queued
            prepared = []
        found = {gid for _, _, gids in prepared for gid in gids}
        self._sources.note_missing(source, ids, found, target)
        return prepared, epoch
    def _extract(self, source: str, ids: Sequence[str]) -> Prepared:
        src = self._sources.source(source)
        if src is None:
            return []
        out: Prepared = []
        for batch in src.extract(ids, source_node=self._node_id):
            payload = encode_batch(batch)
            if len(payload) <= self._limit:
                out.append((payload, content_digest(payload), batch.game_ids))
            elif len(batch.game_ids) > 1:  # receivers would refuse it forever: halve it
                half = len(batch.game_ids) // 2
                out += self._extract(source, batch.game_ids[:half])
                out += self._extract(source, batch.game_ids[half:])
            else:
                log.error("game %s from %s is %d bytes as a batch, over RINGRIFT_MAX_BATCH_BYTES=%d; "
                          "it stays queued until the limit is raised on this node and its targets",
                          batch.game_ids[0], source, len(payload), self._limit)
        return out
