"""One delivery loop per target, so that a slow or dead target never holds the others."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

# Added to a retry delay: a timer must not fire a hair before the policy's clock allows it.
_TIMER_SLACK = 0.01

Deliver = Callable[[str], Awaitable[float | None]]
Owes = Callable[[str], Awaitable[bool]]


@dataclass
class _Loop:
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    backing_off: bool = False  # waiting for its retry time: a wake-up does not start a pass


class TargetLoops:
    """A task per target that runs one delivery pass at a time.

    A loop runs a pass when it is woken (discovery queued games for its target, or the
    interval came) and nothing holds it back; a pass returns when the loop may try again
    by itself: None (when woken next), or in that many seconds (its retry or breaker
    timer). While it backs off, wake-ups are kept for the retry time instead of trying
    early; when the time comes and nothing was queued meanwhile and nothing is owed
    (``owes``), the next wake-up brings the retry instead: a peer that is still starting
    is not tried (and its backoff doubled) for nothing. One pass at a time per target,
    whoever runs it (``lock``: ``sync_once`` takes it too). Memory is a flag per target,
    not a queue: the outbox is in the manifest.
    """

    def __init__(self, deliver: Deliver, owes: Owes) -> None:
        self._deliver = deliver
        self._owes = owes
        self._loops: dict[str, _Loop] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._tg: asyncio.TaskGroup | None = None
        # A pass ended since the last wake, or no target could start one (paces a large scan).
        self.passed = asyncio.Event()

    def lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def start(self, tg: asyncio.TaskGroup) -> None:
        """Loops are tasks of ``tg`` (the daemon's) from now on."""
        self._tg = tg

    def track(self, names: Iterable[str]) -> None:
        """A loop for every target in ``names``; a loop whose target left ends after its pass."""
        wanted = list(names)
        if self._tg is not None:
            for name in wanted:
                if name not in self._loops:
                    loop = self._loops[name] = _Loop()
                    loop.wake.set()  # a new target is owed whatever was queued for it
                    self._tg.create_task(self._run(name, loop), name=f"auto-sync-to-{name}")
        for name in set(self._loops) - set(wanted):
            self._end(self._loops.pop(name))

    def wake(self) -> None:
        """Games were queued for every target (or the interval came): each loop runs a pass,
        at once or when its retry time comes."""
        if any(not loop.backing_off for loop in self._loops.values()):
            self.passed.clear()
        else:
            self.passed.set()
        for loop in self._loops.values():
            loop.wake.set()

    def stop(self) -> None:
        """No pass starts any more; the ones running finish."""
        self._tg = None
        while self._loops:
            self._end(self._loops.popitem()[1])

    async def idle(self) -> None:
        """Return once no pass is running (after ``stop``: once every pass finished)."""
        for lock in list(self._locks.values()):
            async with lock:
                pass

    @staticmethod
    def _end(loop: _Loop) -> None:
        loop.stop.set()
        loop.wake.set()

    async def _run(self, name: str, loop: _Loop) -> None:
        retry_at: float | None = None
        try:
            while not loop.stop.is_set():
                if retry_at is None:
                    await loop.wake.wait()
                else:  # backing off: only a stop cuts the wait short; a wake-up is kept
                    loop.backing_off = True
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout_at(retry_at):
                            await loop.stop.wait()
                    loop.backing_off = False
                    if loop.stop.is_set():
                        return
                    if not loop.wake.is_set() and not await self._owes(name):
                        retry_at = None  # nothing to retry for: wait for games
                        continue
                if loop.stop.is_set():
                    return
                loop.wake.clear()
                async with self.lock(name):
                    delay = await self._deliver(name)
                self.passed.set()
                retry_at = (None if delay is None
                            else asyncio.get_running_loop().time() + delay + _TIMER_SLACK)
        finally:
            if self._loops.get(name) is loop:
                del self._loops[name]
