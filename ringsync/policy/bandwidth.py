"""Bandwidth limits: token buckets per peer and in total, shared by priority, no I/O of its own.

Senders pace their bytes through a ``BandwidthLimiter``: ``transfer()`` holds one of a bounded
number of concurrency slots for the whole transfer, and every chunk of at most
``chunk_bytes(peer)`` waits in ``acquire()`` for tokens from the peer's bucket and the total
bucket. The limiter never holds payload: a waiting transfer costs one small record, however
many wait.

Waiters are served by start-time fair queuing over the four priorities (weights 8/4/2/1), not
first come first served: while every class is backlogged each gets bytes in proportion to its
weight, a class alone gets everything, and a high-priority chunk arriving behind a large
low-priority backlog is granted after at most the chunk already being granted. A waiter whose
peer bucket is empty never blocks waiters for other peers.

Time is injected (``clock`` and ``call_later``): there is no background task, only one timer
callback armed while someone waits, so unit tests drive it with a fake clock.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "BandwidthLimiter", "BandwidthLimits", "Priority", "TokenBucket", "bytes_per_second",
    "slot_cap",
]

MIN_CHUNK_BYTES = 16 * 1024
MAX_CHUNK_BYTES = 256 * 1024
_EPSILON = 1e-6  # seconds: a grant this close to due is due (float refill arithmetic)


class Priority(enum.IntEnum):
    """What a transfer carries decides its share: a new model is never stuck behind an NPZ backlog."""

    LOW = 0  # training data backlogs
    NORMAL = 1  # games
    HIGH = 2  # new models
    CRITICAL = 3

    @property
    def weight(self) -> int:
        """8 / 4 / 2 / 1: the bytes a backlogged class gets per byte of the class below."""
        return 1 << int(self)

    @property
    def label(self) -> str:
        return self.name.lower()


# Slots kept free for higher priorities: LOW leaves two (one for games, one for models),
# NORMAL one, so a long transfer of training data never holds every slot a model needs.
_SLOT_RESERVE = {Priority.LOW: 2, Priority.NORMAL: 1, Priority.HIGH: 0, Priority.CRITICAL: 0}


def slot_cap(limit: int, priority: Priority) -> int:
    """How many of ``limit`` slots transfers of ``priority`` may fill (always at least one)."""
    return max(1, limit - _SLOT_RESERVE[priority])


def bytes_per_second(mbps: float | None) -> float | None:
    """Mbit/s (10^6 bits) to bytes/s; None or 0 means no limit."""
    return mbps * 125_000 if mbps else None


def _no_peer_limit(peer: str) -> float | None:
    return None


@dataclass(frozen=True, slots=True)
class BandwidthLimits:
    """The configured limits; ``None`` or 0 Mbit/s is no limit.

    ``peer_mbps`` names a peer's own limit (settings resolve it from the inventory: the most
    specific ``auto_sync.host_bandwidth_overrides`` glob, else the host's ``bandwidth_mbps``).
    """

    total_mbps: float | None = None
    peer_mbps: Callable[[str], float | None] = field(default=_no_peer_limit)
    max_transfers: int = 32
    max_transfers_per_peer: int = 4
    burst_seconds: float = 0.25
    max_chunk_bytes: int = MAX_CHUNK_BYTES

    def __post_init__(self) -> None:
        if self.max_transfers < 1 or self.max_transfers_per_peer < 1:
            raise ValueError("transfer limits must be at least 1")
        if self.burst_seconds <= 0 or self.max_chunk_bytes < MIN_CHUNK_BYTES:
            raise ValueError(f"burst_seconds must be > 0 and max_chunk_bytes >= {MIN_CHUNK_BYTES}")


class TokenBucket:
    """``rate`` bytes/s, at most ``capacity`` saved up (the burst).

    A grant needs ``min(n, capacity)`` tokens and then takes all ``n``, going into debt if it
    must: a chunk larger than the burst is still granted, and the long-run rate stays exact.
    """

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate, self.capacity = rate, capacity
        self._tokens, self._stamp = capacity, now

    def level(self, now: float) -> float:
        if now > self._stamp:
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
        return self._tokens

    def ready_in(self, nbytes: int, now: float) -> float:
        """Seconds until ``nbytes`` may be granted (0 when it may be now)."""
        missing = min(nbytes, self.capacity) - self.level(now)
        return max(0.0, missing / self.rate)

    def take(self, nbytes: int, now: float) -> None:
        self._tokens = self.level(now) - nbytes

    def give_back(self, nbytes: int, now: float) -> None:
        self._tokens = min(self.capacity, self.level(now) + nbytes)


def _ready_in(bucket: TokenBucket | None, nbytes: int, now: float) -> float:
    return 0.0 if bucket is None else bucket.ready_in(nbytes, now)


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


CallLater = Callable[[float, Callable[[], None]], TimerHandle]
SentCallback = Callable[[str, Priority, int], None]  # peer, priority, bytes granted
WaitCallback = Callable[[Priority, str, float], None]  # priority, "rate" | "slot", seconds


def _loop_call_later(delay: float, callback: Callable[[], None]) -> TimerHandle:
    return asyncio.get_running_loop().call_later(delay, callback)


async def _granted(future: asyncio.Future[None], withdraw: Callable[[bool], None]) -> None:
    """Wait for a grant; a cancelled wait withdraws, told whether the grant had come already."""
    try:
        await future
    except asyncio.CancelledError:
        withdraw(future.done() and not future.cancelled())
        raise


@dataclass(eq=False, slots=True)
class _Waiter:
    peer: str
    nbytes: int
    priority: Priority
    start: float  # fair-queuing tags, in bytes / weight
    finish: float
    seq: int
    future: asyncio.Future[None]


class _RateScheduler:
    """Grants chunks from the peer and total buckets in fair-queuing order."""

    def __init__(self, limits: BandwidthLimits, clock: Callable[[], float],
                 call_later: CallLater) -> None:
        self._limits, self._clock, self._call_later = limits, clock, call_later
        self._total = self._bucket(limits.total_mbps)
        self._peers: dict[str, TokenBucket | None] = {}
        self._waiting: list[_Waiter] = []
        self._vtime = 0.0
        self._class_finish = dict.fromkeys(Priority, 0.0)
        self._seq = itertools.count()
        self._timer: TimerHandle | None = None

    def _bucket(self, mbps: float | None) -> TokenBucket | None:
        rate = bytes_per_second(mbps)
        if rate is None:
            return None
        return TokenBucket(rate, rate * self._limits.burst_seconds, self._clock())

    def peer_bucket(self, peer: str) -> TokenBucket | None:
        if peer not in self._peers:
            self._peers[peer] = self._bucket(self._limits.peer_mbps(peer))
        return self._peers[peer]

    def chunk_bytes(self, peer: str) -> int:
        """Half a burst of the tighter bucket at most, so short-term rate stays near the limit,
        and a peer bucket still saves up while its full chunk waits for the total bucket."""
        capacities = [b.capacity for b in (self._total, self.peer_bucket(peer)) if b is not None]
        burst = int(min(capacities, default=2 * self._limits.max_chunk_bytes))
        return max(MIN_CHUNK_BYTES, min(self._limits.max_chunk_bytes, burst // 2))

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def acquire(self, peer: str, nbytes: int, priority: Priority) -> None:
        if self._total is None and self.peer_bucket(peer) is None:
            return
        start = max(self._vtime, self._class_finish[priority])
        finish = start + nbytes / priority.weight
        self._class_finish[priority] = finish
        waiter = _Waiter(peer, nbytes, priority, start, finish, next(self._seq),
                         asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        self._dispatch()
        await _granted(waiter.future, lambda granted: self._withdraw(waiter, granted))

    def _withdraw(self, waiter: _Waiter, granted: bool) -> None:
        """A cancelled waiter: its place is freed, or the tokens it was just granted return."""
        now = self._clock()
        if granted:
            for bucket in (self._total, self.peer_bucket(waiter.peer)):
                if bucket is not None:
                    bucket.give_back(waiter.nbytes, now)
        else:
            self._waiting.remove(waiter)
            if self._class_finish[waiter.priority] == waiter.finish:
                self._class_finish[waiter.priority] = waiter.start
        self._dispatch()

    def _dispatch(self) -> None:
        """Grant every chunk that is due, in tag order; then arm the timer for the next one."""
        now = self._clock()
        while (head := self._head(now)) is not None:
            if _ready_in(self._total, head.nbytes, now) > _EPSILON:
                break
            self._grant(head, now)
        self._arm(now, head)

    def _head(self, now: float) -> _Waiter | None:
        """The waiter with the smallest start tag among those whose peer bucket allows them."""
        eligible = [w for w in self._waiting if not w.future.done()  # done: cancelled, leaving
                    and _ready_in(self.peer_bucket(w.peer), w.nbytes, now) <= _EPSILON]
        return min(eligible, key=lambda w: (w.start, w.seq), default=None)

    def _grant(self, waiter: _Waiter, now: float) -> None:
        self._waiting.remove(waiter)
        self._vtime = max(self._vtime, waiter.start)
        for bucket in (self._total, self.peer_bucket(waiter.peer)):
            if bucket is not None:
                bucket.take(waiter.nbytes, now)
        waiter.future.set_result(None)

    def _arm(self, now: float, head: _Waiter | None) -> None:
        """One timer: when the head gets total tokens, or a waiter's peer bucket refills.

        Waiters whose peer bucket is ready already wait behind the head, not for a time.
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        delays = [_ready_in(self._total, head.nbytes, now)] if head is not None else []
        for w in self._waiting:
            peer_wait = _ready_in(self.peer_bucket(w.peer), w.nbytes, now)
            if peer_wait > _EPSILON and not w.future.done():
                delays.append(max(peer_wait, _ready_in(self._total, w.nbytes, now)))
        if delays:
            self._timer = self._call_later(max(_EPSILON, min(delays)), self._dispatch)


@dataclass(eq=False, slots=True)
class _SlotWaiter:
    peer: str
    priority: Priority
    seq: int
    future: asyncio.Future[None]


class _Slots:
    """Transfers in flight, per peer and in total; waiters by priority, then arrival."""

    def __init__(self, total: int, per_peer: int) -> None:
        self._total_limit, self._peer_limit = total, per_peer
        self.in_flight = 0
        self._per_peer: dict[str, int] = {}
        self._waiting: list[_SlotWaiter] = []
        self._seq = itertools.count()

    def in_flight_to(self, peer: str) -> int:
        return self._per_peer.get(peer, 0)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def take(self, peer: str, priority: Priority) -> None:
        waiter = _SlotWaiter(peer, priority, next(self._seq),
                             asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        self._dispatch()
        await _granted(waiter.future, lambda granted: self._withdraw(waiter, granted))

    def _withdraw(self, waiter: _SlotWaiter, granted: bool) -> None:
        if granted:
            self.release(waiter.peer)
        else:
            self._waiting.remove(waiter)

    def release(self, peer: str) -> None:
        self.in_flight -= 1
        self._per_peer[peer] -= 1
        if not self._per_peer[peer]:
            del self._per_peer[peer]
        self._dispatch()

    def _allowed(self, peer: str, priority: Priority) -> bool:
        return (self.in_flight < slot_cap(self._total_limit, priority)
                and self.in_flight_to(peer) < slot_cap(self._peer_limit, priority))

    def _dispatch(self) -> None:
        for waiter in sorted(self._waiting, key=lambda w: (-w.priority, w.seq)):
            if not waiter.future.done() and self._allowed(waiter.peer, waiter.priority):
                self._waiting.remove(waiter)
                self.in_flight += 1
                self._per_peer[waiter.peer] = self.in_flight_to(waiter.peer) + 1
                waiter.future.set_result(None)


class BandwidthLimiter:
    """Paces every sender of one node: rate per peer and in total, transfers in flight, priorities.

    Callbacks (``on_sent``, ``on_wait``) feed metrics without this module knowing about them.
    """

    def __init__(self, limits: BandwidthLimits | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 call_later: CallLater = _loop_call_later,
                 on_sent: SentCallback | None = None,
                 on_wait: WaitCallback | None = None) -> None:
        self.limits = limits or BandwidthLimits()
        self._clock = clock
        self._rate = _RateScheduler(self.limits, clock, call_later)
        self._slots = _Slots(self.limits.max_transfers, self.limits.max_transfers_per_peer)
        self._on_sent, self._on_wait = on_sent, on_wait

    def chunk_bytes(self, peer: str) -> int:
        """The most bytes one ``acquire`` should ask for when sending to ``peer``."""
        return self._rate.chunk_bytes(peer)

    async def acquire(self, peer: str, nbytes: int, priority: Priority = Priority.NORMAL) -> None:
        """Wait until ``nbytes`` may be sent to ``peer``; cancelling the wait returns its place."""
        if nbytes <= 0:
            return
        started = self._clock()
        await self._rate.acquire(peer, nbytes, priority)
        self._waited(priority, "rate", started)
        if self._on_sent is not None:
            self._on_sent(peer, priority, nbytes)

    @asynccontextmanager
    async def transfer(self, peer: str, priority: Priority = Priority.NORMAL) -> AsyncIterator[None]:
        """Hold one concurrency slot (per peer and in total) for the whole transfer."""
        started = self._clock()
        await self._slots.take(peer, priority)
        self._waited(priority, "slot", started)
        try:
            yield
        finally:
            self._slots.release(peer)

    async def paced(self, peer: str, data: bytes | AsyncIterable[bytes],
                    priority: Priority = Priority.NORMAL) -> AsyncGenerator[bytes, None]:
        """``data`` cut into chunks, each yielded once its tokens are granted (a request body)."""
        source = _one(data) if isinstance(data, bytes | bytearray | memoryview) else data
        async for piece in source:
            view = memoryview(piece)
            step = self.chunk_bytes(peer)
            for offset in range(0, len(view), step):
                chunk = view[offset:offset + step]
                await self.acquire(peer, len(chunk), priority)
                yield bytes(chunk)

    def in_flight(self, peer: str | None = None) -> int:
        """Transfers holding a slot, to ``peer`` or in total."""
        return self._slots.in_flight if peer is None else self._slots.in_flight_to(peer)

    def waiting(self) -> dict[str, int]:
        """Waiters for tokens and for slots (for status and tests)."""
        return {"rate": self._rate.waiting, "slot": self._slots.waiting}

    def _waited(self, priority: Priority, reason: str, started: float) -> None:
        waited = self._clock() - started
        if self._on_wait is not None and waited > 0:
            self._on_wait(priority, reason, waited)


async def _one(data: bytes | bytearray | memoryview) -> AsyncIterator[bytes | bytearray | memoryview]:
    yield data
