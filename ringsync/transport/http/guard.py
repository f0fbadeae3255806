"""The data server's guards against hostile or broken peers at the connection level.

A cap on connections in total and per remote address (a flood from one address cannot
take every file descriptor, so peers and /healthz stay reachable), a deadline for the
first request header (slowloris), and malformed HTTP counted as a rate-limited warning
instead of an ERROR traceback per request.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ringsync.ops.metrics import Metrics

log = logging.getLogger(__name__)

# File descriptors kept for everything but peer connections: SQLite files, the
# sender's own connections, inotify, logs.
RESERVED_FDS = 256
WARN_INTERVAL = 60.0
_HEADER_ENDS = (b"\n\n", b"\n\r\n")


class RateLimitedLog:
    """At most one WARNING per kind and interval; the lines it held back are counted in the next.

    Kinds are a fixed set of words chosen by the caller (never a peer's address), so
    the table stays small.
    """

    def __init__(self, logger: logging.Logger, interval: float = WARN_INTERVAL, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            self._held[kind] += 1
            return
        self._last[kind] = now
        held = self._held.pop(kind, 0)
        if held:
            message += " (and %d more like it in the last %.0f s)"
            args = (*args, held, now - last if last is not None else self._interval)
        self._logger.warning(message, *args)


class ConnectionGuard:
    """Which connections may be served: open ones counted in total and per address (no I/O)."""

    def __init__(self, max_total: int, max_per_address: int) -> None:
        self.max_total = max_total
        self.max_per_address = min(max_per_address, max_total)
        self._open: Counter[str] = Counter()
        self._total = 0

    @property
    def open(self) -> int:
        return self._total

    def admit(self, address: str) -> str | None:
        """Count the connection in and return None, or return why it must be shed."""
        if self._total >= self.max_total:
            return "total_limit"
        if self._open[address] >= self.max_per_address:
            return "address_limit"
        self._open[address] += 1
        self._total += 1
        return None

    def release(self, address: str) -> None:
        self._total -= 1
        self._open[address] -= 1
        if self._open[address] <= 0:
            del self._open[address]


class PeerNoise:
    """Counts what peers do wrong, in metrics and in rate-limited warnings."""

    def __init__(self, metrics: Metrics, warnings: RateLimitedLog | None = None) -> None:
        self.metrics = metrics
        self.warnings = warnings or RateLimitedLog(log)

    def shed(self, reason: str, address: str, guard: ConnectionGuard) -> None:
        self.metrics.connections_shed.labels(reason=reason).inc()
        if reason == "header_timeout":
            self.warnings.warning(reason, "closed a connection from %s that sent no complete "
                                  "request header in time (RINGRIFT_HTTP_HEADER_TIMEOUT)", address)
        else:
            self.warnings.warning(
                reason, "shedding connections: %s over its limit (%d open, at most %d in total "
                "and %d per address: RINGRIFT_HTTP_MAX_CONNECTIONS, "
                "RINGRIFT_HTTP_MAX_CONNECTIONS_PER_ADDRESS)",
                address if reason == "address_limit" else "the server", guard.open,
                guard.max_total, guard.max_per_address)

    def malformed(self, address: str, exc: BaseException) -> None:
        self.metrics.http_malformed.inc()
        detail = str(getattr(exc, "message", "") or exc)[:200]
        self.warnings.warning("malformed", "refused malformed HTTP from %s: %s %r",
                              address, type(exc).__name__, detail)


@dataclass(frozen=True, slots=True)
class HandlerOptions:
    """What every connection's handler needs; built once per server."""

    guard: ConnectionGuard
    noise: PeerNoise
    header_timeout: float
    idle_timeout: float


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's connection handler with admission, a first-header deadline and quiet errors.

    aiohttp closes a connection idle for ``keepalive_timeout`` (also one that never sends
    a complete request); the shorter header deadline covers the first request, which is
    where a slowloris sits. Later requests on a keep-alive connection are bounded by the
    idle timeout.
    """

    def __init__(self, manager: web.Server, options: HandlerOptions, *,
                 loop: asyncio.AbstractEventLoop, **kwargs: Any) -> None:
        super().__init__(manager, loop=loop, keepalive_timeout=options.idle_timeout, **kwargs)
        self._options = options
        self._address: str | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        reason = self._options.guard.admit(address)
        if reason is not None:
            # Closed before aiohttp sees it: no task, no parser, the fd freed at once.
            self._options.noise.shed(reason, address, self._options.guard)
            cast(asyncio.Transport, transport).abort()
            return
        self._address = address
        self._options.noise.metrics.connections_open.set(self._options.guard.open)
        self._header_timer = self._loop.call_later(self._options.header_timeout,
                                                   self._header_overdue)
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._address is None:
            return  # shed in connection_made: aiohttp never knew it
        self._options.guard.release(self._address)
        self._options.noise.metrics.connections_open.set(self._options.guard.open)
        self._address = None
        self._stop_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._header_timer is not None:
            seen = self._tail + data[:65536]
            if any(end in seen for end in _HEADER_ENDS):
                self._stop_header_timer()
            else:
                self._tail = seen[-2:]
        super().data_received(data)

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, HttpProcessingError):
            # A peer's garbage (bad framing, oversized headers, not HTTP at all): aiohttp
            # answers 4xx and closes. Counted here, where every kind of it passes.
            self._options.noise.malformed(self._address or "unknown", exc)
        return super().handle_error(request, status, exc, message)

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        if isinstance(kwargs.get("exc_info"), HttpProcessingError):
            return  # counted in handle_error: a traceback per request would flood the log
        super().log_exception(*args, **kwargs)

    def _header_overdue(self) -> None:
        self._header_timer = None
        self._options.noise.shed("header_timeout", self._address or "unknown",
                                 self._options.guard)
        self.force_close()

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._tail = b""


def handler_factory(server: web.Server, options: HandlerOptions,
                    **kwargs: Any) -> Callable[[], GuardedRequestHandler]:
    """The protocol factory for loop.create_server: one guarded handler per connection."""
    loop = asyncio.get_running_loop()

    def make() -> GuardedRequestHandler:
        return GuardedRequestHandler(server, options, loop=loop, **kwargs)

    return make


def raise_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return the soft limit now.

    The usual soft limit (1024) is what a few thousand idle connections exhaust; the
    hard limit (often 524288 under systemd) is there to be used.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft


def connection_cap(configured: int, open_file_limit: int) -> int:
    """At most ``configured`` connections, and few enough to leave RESERVED_FDS free."""
    if open_file_limit == resource.RLIM_INFINITY:
        return configured
    fitting = max(1, open_file_limit - RESERVED_FDS)
    if fitting < configured:
        log.warning("RINGRIFT_HTTP_MAX_CONNECTIONS=%d does not fit the open-file limit %d; "
                    "serving at most %d connections (raise LimitNOFILE)",
                    configured, open_file_limit, fitting)
    return min(configured, fitting)
