"""Give freed heap memory back to the OS after large transfers, so an idle node stays small."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

TRIM_EVERY_BYTES = 64 * 1024 * 1024
# After a burst, the buffers of its last transfers are still referenced when it ends
# (the sender's prepared-batch cache, the body aiohttp keeps until the response is
# sent): trimming at that moment would leave them in the heap once they are freed.
IDLE_TRIM_DELAY = 1.0


def _malloc_trim() -> Callable[[int], int] | None:
    # glibc keeps freed multi-megabyte batch buffers in the heap after its mmap
    # threshold adapts upward; malloc_trim returns them. Absent elsewhere (musl).
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


class MemoryTrimmer:
    """Counts bytes that passed through; trims the heap every ``every`` bytes and when idle."""

    def __init__(self, every: int = TRIM_EVERY_BYTES, *,
                 trim: Callable[[int], int] | None = None, idle_delay: float = IDLE_TRIM_DELAY) -> None:
        self._every = every
        self._since = 0
        self._moved_since_idle_trim = False
        self._trim = trim if trim is not None else _malloc_trim()
        self._idle_delay = idle_delay
        self._idle_handle: asyncio.TimerHandle | None = None

    def note(self, nbytes: int) -> None:
        self._since += nbytes
        self._moved_since_idle_trim = True
        if self._since >= self._every:
            self.trim()

    def idle(self) -> None:
        """A burst of transfers ended: trim once its last buffers are released.

        Called from the event loop; repeated calls within the delay give one trim.
        """
        if not self._moved_since_idle_trim:
            return
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a tool, a test): nothing is pending, trim now
            self._idle_trim()
            return
        self._idle_handle = loop.call_later(self._idle_delay, self._idle_trim)

    def _idle_trim(self) -> None:
        self._idle_handle = None
        self._moved_since_idle_trim = False
        self.trim()

    def trim(self) -> None:
        self._since = 0
        if self._trim is not None:
            self._trim(0)
