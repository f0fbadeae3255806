"""Give freed heap memory back to the OS after large transfers, so an idle node stays small."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

TRIM_EVERY_BYTES = 64 * 1024 * 1024
TRIM_WHEN_IDLE_BYTES = 4 * 1024 * 1024


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

    def __init__(self, every: int = TRIM_EVERY_BYTES) -> None:
        self._every = every
        self._since = 0
        self._trim = _malloc_trim()

    def note(self, nbytes: int) -> None:
        self._since += nbytes
        if self._since >= self._every:
            self.trim()

    def idle(self) -> None:
        """A burst of transfers ended: trim if it moved enough to matter."""
        if self._since >= TRIM_WHEN_IDLE_BYTES:
            self.trim()

    def trim(self) -> None:
        self._since = 0
        if self._trim is not None:
            self._trim(0)
