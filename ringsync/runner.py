"""Run one node: build its context, start its daemons under a DaemonManager, stop cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Coroutine, Sequence
from typing import Any

from ringsync.daemons.base import DaemonType
from ringsync.daemons.catalog import default_registry
from ringsync.daemons.manager import DaemonManager, ManagerListenerBase
from ringsync.node import NodeContext, build_context
from ringsync.ops.sdnotify import SystemdNotifier
from ringsync.settings import Settings
from ringsync.transport.http.server import check_port_free

log = logging.getLogger(__name__)


class _NodeListener(ManagerListenerBase):
    """Tells systemd and Prometheus what the manager does."""

    def __init__(self, ctx: NodeContext, notifier: SystemdNotifier) -> None:
        self._ctx = ctx
        self._notifier = notifier

    def on_daemon_ready(self, t: DaemonType) -> None:
        self._ctx.metrics.daemon_up.labels(daemon=t.value).set(1)

    def on_all_ready(self) -> None:
        s = self._ctx.settings
        log.info("node %s ready: data dir %s, listening on %s:%d",
                 s.node_id, s.data_dir, s.p2p_host, s.p2p_port)
        self._notifier.ready()
        self._notifier.status(f"ready: node {s.node_id}")

    def on_daemon_crashed(self, t: DaemonType, exc: BaseException, restart_in: float) -> None:
        self._ctx.metrics.daemon_up.labels(daemon=t.value).set(0)
        self._ctx.metrics.daemon_restarts.labels(daemon=t.value).inc()
        self._notifier.status(f"{t.value} crashed ({type(exc).__name__}); restarting in {restart_in:.1f}s")

    def on_stopping(self) -> None:
        log.info("stopping: draining in-flight work (at most %.0fs)", self._ctx.settings.drain_timeout)
        self._notifier.stopping()
        self._notifier.status("stopping: draining in-flight work")

    def on_stopped(self, t: DaemonType) -> None:
        self._ctx.metrics.daemon_up.labels(daemon=t.value).set(0)


async def run_node(settings: Settings, types: Sequence[DaemonType]) -> None:
    """Run until SIGTERM/SIGINT; raise RestartBudgetExhausted when a daemon keeps crashing."""
    check_port_free(settings.p2p_host, settings.p2p_port)  # exit 2 now, not a restart loop
    for note in settings.inventory.notes:
        log.info("inventory %s: %s", settings.inventory.source, note)
    ctx = build_context(settings)
    notifier = SystemdNotifier.from_env(os.environ)
    manager = DaemonManager(
        default_registry().factories_for(ctx),
        restart_limit=settings.restart_limit,
        restart_window=settings.restart_window,
        drain_timeout=settings.drain_timeout,
        listener=_NodeListener(ctx, notifier),
    )
    ctx.daemon_health = manager.health
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, manager.request_stop)
    try:
        await _with_watchdog(manager.run(types), notifier)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        summary = ctx.manifest.summary()
        await ctx.close_connections()
        ctx.close()
        log.info("stopped: %d local games known, delivered %s, still owed %s",
                 summary["games"], summary["delivered"] or "{}", summary["pending"] or "{}")


async def _with_watchdog(main: Coroutine[Any, Any, None], notifier: SystemdNotifier) -> None:
    """Run ``main`` with systemd watchdog pings beside it; its own exception comes out unwrapped."""
    try:
        async with asyncio.TaskGroup() as tg:
            watchdog = tg.create_task(notifier.watchdog_loop())
            try:
                await main
            finally:
                watchdog.cancel()
    except BaseExceptionGroup as group:
        # The watchdog never fails, so the group holds main's error: callers
        # (the CLI's exit codes) expect RestartBudgetExhausted or ConfigError itself.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
