"""Batch building for auto-sync: owed games extracted from their source, encoded, split
under the byte limit, and cached for the targets that owe the same games.

Extraction and encoding run in a worker thread: the event loop never reads SQLite.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from ringsync.daemons.auto_sync._sources import _READ_ERRORS, LocalSources
from ringsync.protocol.batch import content_digest, encode_batch

log = logging.getLogger(__name__)

Prepared = list[tuple[bytes, str, tuple[str, ...]]]  # (payload, digest, game ids) per config
CacheKey = tuple[str, tuple[str, ...]]  # (source, game ids)

# Batches are sized to about this many payload bytes (fewer games than RINGRIFT_SYNC_BATCH_GAMES
# when games are large): memory is bounded by bytes, not by a game count (issue 7, A6).
BATCH_BYTES = 8 * 1024 * 1024
FIRST_PAGE = 64  # games in a cycle's first batch, before their size is known


def prepared_bytes(prepared: Prepared) -> int:
    return sum(len(payload) for payload, _, _ in prepared)


@dataclass
class PreparedCache:
    """The last batches extracted in a cycle, shared by the targets that owe them.

    Targets walk their outboxes in the same order, so they usually ask for the same
    batch moments apart; a window of ``capacity_bytes`` (at least the newest batch)
    keeps memory bounded when they drift apart (a late target then extracts again,
    which costs time, not correctness). ``bytes_per_game`` is learnt from the cycle's
    first batch (or carried over from the last cycle) and fixed for the cycle, so that
    every target pages its outbox the same way and asks for the same batches.
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


class BatchBuilder:
    """Makes the batches a cycle sends, at most ``max_batch_bytes`` each, about
    ``batch_bytes`` (learnt per game from the previous cycle's first batch).

    ``new_cycle`` starts a cache shared by every target of the cycle; ``end_cycle`` keeps
    what it learnt of game sizes for the next one.
    """

    def __init__(self, sources: LocalSources, *, node_id: str, max_batch_bytes: int,
                 batch_games: int) -> None:
        self._sources = sources
        self._node_id = node_id
        self._limit = max_batch_bytes
        self._batch_games = batch_games
        self.batch_bytes = min(BATCH_BYTES, max_batch_bytes // 2)
        self._bytes_per_game: float | None = None  # learnt by a cycle, used by the next
        self._cache = PreparedCache(2 * self.batch_bytes)

    def new_cycle(self) -> None:
        self._cache = PreparedCache(2 * self.batch_bytes, self._bytes_per_game)

    def end_cycle(self) -> None:
        self._bytes_per_game = self._cache.bytes_per_game
        self._cache = PreparedCache(2 * self.batch_bytes, self._bytes_per_game)  # frees batches

    def page_size(self) -> int:
        """Games per outbox page this cycle (RINGRIFT_SYNC_BATCH_GAMES, cut to the bytes)."""
        return self._cache.page_size(self._batch_games, self.batch_bytes)

    async def batches(self, source: str, ids: tuple[str, ...], target: str) -> Prepared:
        """Extract and encode once, whichever target asks first; unreadable games stay queued."""
        try:
            prepared = await self._cache.get(
                (source, ids), lambda: asyncio.to_thread(self._extract, source, ids))
        except _READ_ERRORS as exc:
            await self._sources.read_failed(source, exc)  # loud once; the games stay queued
            prepared = []
        found = {gid for _, _, gids in prepared for gid in gids}
        self._sources.note_missing(source, ids, found, target)
        return prepared

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
