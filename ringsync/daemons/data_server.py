"""The data server daemon: runs the HTTP transport's server on RINGRIFT_P2P_HOST:PORT."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web

from ringsync.daemons.base import Daemon, DaemonType, Health, HealthState
from ringsync.node import NodeContext
from ringsync.transport.http.guard import (
    ConnectionGuard,
    HandlerOptions,
    PeerNoise,
    connection_cap,
    handler_factory,
    raise_open_file_limit,
)
from ringsync.transport.http.server import LISTEN_BACKLOG, bind_error, build_app

__all__ = ["DataServerDaemon"]

log = logging.getLogger(__name__)


class DataServerDaemon(Daemon):
    """Serves peers and operators on RINGRIFT_P2P_HOST:RINGRIFT_P2P_PORT."""

    daemon_type = DaemonType.DATA_SERVER

    def __init__(self, ctx: NodeContext) -> None:
        self._ctx = ctx
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._health = Health(HealthState.STARTING)

    async def run(self, ready: Callable[[], None]) -> None:
        s = self._ctx.settings
        guard = ConnectionGuard(connection_cap(s.http_max_connections, raise_open_file_limit()),
                                s.http_max_connections_per_address)
        noise = PeerNoise(self._ctx.metrics)
        runner = web.AppRunner(build_app(self._ctx, noise), access_log=None,
                               shutdown_timeout=s.drain_timeout, handle_signals=False)
        await runner.setup()
        self._runner = runner
        try:
            assert runner.server is not None
            options = HandlerOptions(guard, noise, s.http_header_timeout, s.http_idle_timeout)
            # Our own listener instead of web.TCPSite: each connection gets the guarded
            # handler (admission, header deadline), which TCPSite cannot be told to use.
            factory = handler_factory(runner.server, options, access_log=None)
            try:
                self._listener = await asyncio.get_running_loop().create_server(
                    factory, s.p2p_host, s.p2p_port, reuse_address=True, backlog=LISTEN_BACKLOG)
            except OSError as exc:
                raise bind_error(s.p2p_host, s.p2p_port, exc) from None
            self._log_binding()
            log.info("serving at most %d connections, %d per address", guard.max_total,
                     guard.max_per_address)
            self._health = Health(HealthState.HEALTHY, f"listening on {s.p2p_host}:{s.p2p_port}")
            ready()
            await asyncio.Event().wait()
        finally:
            self._health = Health(HealthState.STOPPED)
            await asyncio.shield(self._close())

    def _log_binding(self) -> None:
        s = self._ctx.settings
        if s.auth_token is None:
            log.warning("no cluster token configured (RINGRIFT_CLUSTER_AUTH_TOKEN): peer endpoints "
                        "listen on loopback only, at %s:%d", s.p2p_host, s.p2p_port)
        else:
            log.info("data server listening on %s:%d", s.p2p_host, s.p2p_port)

    async def drain(self) -> None:
        # Stop accepting; handlers already running (merges) finish within shutdown_timeout.
        await self._close()

    async def _close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()  # stop accepting; open connections drain in runner.cleanup()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def health(self) -> Health:
        return self._health
