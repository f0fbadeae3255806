"""DaemonManager: start daemons in dependency order, restart crashed ones, stop them in reverse."""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol

from ringsync.daemons.base import Daemon, DaemonType, Health, HealthState
from ringsync.errors import ConfigError, RestartBudgetExhausted, RingsyncError
from ringsync.policy.backoff import Backoff

log = logging.getLogger(__name__)

DaemonFactory = Callable[[], Daemon]


class DaemonExited(RingsyncError):
    """A daemon's run() returned although no stop was requested; daemons run until cancelled."""

    def __init__(self, daemon_type: DaemonType) -> None:
        super().__init__(f"daemon {daemon_type.value}: run() returned without a stop request")
        self.daemon_type = daemon_type


class ManagerListener(Protocol):
    """What the manager tells its owner (sd_notify, metrics); callbacks run on the event loop."""

    def on_daemon_ready(self, t: DaemonType) -> None: ...
    def on_all_ready(self) -> None: ...
    def on_daemon_crashed(self, t: DaemonType, exc: BaseException, restart_in: float) -> None: ...
    def on_stopping(self) -> None: ...
    def on_stopped(self, t: DaemonType) -> None: ...


class ManagerListenerBase:
    """A ManagerListener that ignores everything; subclass it and override what you need."""

    def on_daemon_ready(self, t: DaemonType) -> None:
        """A daemon (or a restarted instance of it) called ready()."""

    def on_all_ready(self) -> None:
        """Every daemon that run() was asked for is ready (once per manager)."""

    def on_daemon_crashed(self, t: DaemonType, exc: BaseException, restart_in: float) -> None:
        """A daemon crashed and will be restarted after restart_in seconds."""

    def on_stopping(self) -> None:
        """The manager began to stop (once per manager)."""

    def on_stopped(self, t: DaemonType) -> None:
        """A daemon has stopped for good."""


class _Phase(enum.Enum):
    STARTING = "starting"  # its run() is going but has not called ready() yet
    RUNNING = "running"  # ready() was called; health comes from the daemon itself
    BACKOFF = "backoff"  # crashed; waiting to restart
    FAILED = "failed"  # restart budget exhausted
    STOPPED = "stopped"


_PHASE_HEALTH = {
    _Phase.STARTING: HealthState.STARTING,
    _Phase.BACKOFF: HealthState.DEGRADED,
    _Phase.FAILED: HealthState.FAILED,
    _Phase.STOPPED: HealthState.STOPPED,
}


@dataclass(eq=False)
class _Slot:
    """The supervision state of one daemon type."""

    daemon_type: DaemonType
    instance: Daemon
    task: asyncio.Task[None] | None = None
    phase: _Phase = _Phase.STARTING
    detail: str = "waiting for ready()"
    # Set on the first ready() or when supervision ends, so start_daemon never hangs.
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    restarts: deque[float] = field(default_factory=deque)  # loop times of recent restarts

    @property
    def ended(self) -> bool:
        return self.phase in (_Phase.FAILED, _Phase.STOPPED)

    def health(self) -> Health:
        if self.phase is not _Phase.RUNNING:
            return Health(_PHASE_HEALTH[self.phase], self.detail)
        try:
            return self.instance.health()
        except Exception as exc:  # a broken health() must not break /healthz
            return Health(HealthState.FAILED, f"health() raised {type(exc).__name__}: {exc}")


class DaemonManager:
    """Runs typed daemons one-for-one supervised inside one asyncio.TaskGroup.

    Use ``await manager.run(types)``, or ``async with manager:`` plus ``start_daemon``.
    A daemon crashing more than ``restart_limit`` times within ``restart_window``
    seconds stops everything and makes ``run()``/``__aexit__`` raise
    RestartBudgetExhausted, so that the process exits and systemd restarts it.
    """

    def __init__(
        self,
        factories: Mapping[DaemonType, DaemonFactory],
        *,
        restart_limit: int = 5,
        restart_window: float = 300.0,
        drain_timeout: float = 10.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        listener: ManagerListener | None = None,
    ) -> None:
        if restart_limit < 0 or restart_window <= 0 or drain_timeout <= 0:
            raise ConfigError(
                f"restart_limit must be >= 0 (got {restart_limit}), restart_window > 0 "
                f"(got {restart_window}) and drain_timeout > 0 (got {drain_timeout})"
            )
        self._factories = dict(factories)
        self._restart_limit = restart_limit
        self._restart_window = restart_window
        self._drain_timeout = drain_timeout
        self._backoff = Backoff(backoff_initial, backoff_max)
        self._listener: ManagerListener = listener or ManagerListenerBase()
        self._slots: dict[DaemonType, _Slot] = {}  # insertion order is start order
        self._planned: dict[DaemonType, Daemon] = {}  # made to read depends_on; run first
        self._tg: asyncio.TaskGroup | None = None
        self._stopper: asyncio.Task[None] | None = None
        self._stop_requested = asyncio.Event()
        self._stopped = asyncio.Event()
        self._fatal: RestartBudgetExhausted | None = None

    # -- context ----------------------------------------------------------------------------

    async def __aenter__(self) -> DaemonManager:
        if self._tg is not None:
            raise RuntimeError("a DaemonManager can be entered only once")
        tg = asyncio.TaskGroup()
        await tg.__aenter__()
        self._tg = tg
        self._stopper = tg.create_task(self._stop_when_requested(), name="daemon-manager-stop")
        return self

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._tg is None or self._stopper is None:
            raise RuntimeError("DaemonManager.__aexit__ without __aenter__")
        self.request_stop()
        await _wait_uncancellable(self._stopper)
        # The stop sequence has ended the daemon tasks, so the group only has a task's own
        # unexpected error left to report. The body's exception (or cancellation) is not passed
        # in: it propagates as is rather than wrapped in an ExceptionGroup.
        await self._tg.__aexit__(None, None, None)
        if exc is None and self._fatal is not None:
            raise self._fatal

    # -- public API -------------------------------------------------------------------------

    async def run(self, types: Sequence[DaemonType]) -> None:
        """Start ``types`` (with their dependencies) and run until request_stop()."""
        async with self:
            for t in types:
                await self.start_daemon(t)
            if not self._stop_requested.is_set():
                log.info("all daemons ready: %s", ", ".join(t.value for t in self._slots))
                self._notify(lambda lst: lst.on_all_ready())
            await self.wait_stopped()

    async def start_daemon(self, daemon_type: DaemonType) -> None:
        """Start a daemon after its dependencies; return once it has called ready().

        Raises ConfigError for a type without a factory or a dependency cycle, and
        RestartBudgetExhausted if a daemon keeps crashing. Returns without starting
        anything once a stop has been requested.
        """
        if self._tg is None:
            raise RuntimeError("start_daemon() needs `async with manager:` first")
        for t in self._plan(daemon_type):
            slot = self._slots.get(t) or self._launch(t)
            if slot is None:
                return
            await slot.settled.wait()
            if self._fatal is not None:
                raise self._fatal
            if slot.ended:
                return

    def request_stop(self) -> None:
        """Begin a graceful stop; idempotent, safe from loop.add_signal_handler."""
        self._stop_requested.set()

    async def wait_stopped(self) -> None:
        """Return once every daemon has been drained and stopped."""
        await self._stopped.wait()

    def health(self) -> dict[DaemonType, Health]:
        return {t: slot.health() for t, slot in self._slots.items()}

    def daemon(self, daemon_type: DaemonType) -> Daemon | None:
        """The current instance of a started daemon (a restart replaces it)."""
        slot = self._slots.get(daemon_type)
        return slot.instance if slot is not None else None

    @property
    def running(self) -> tuple[DaemonType, ...]:
        """Daemons under supervision (not yet stopped or failed), in start order."""
        return tuple(t for t, slot in self._slots.items() if not slot.ended)

    # -- starting ---------------------------------------------------------------------------

    def _plan(self, target: DaemonType) -> list[DaemonType]:
        """``target`` and its transitive dependencies, dependencies first, each once."""
        order: list[DaemonType] = []

        def visit(t: DaemonType, path: tuple[DaemonType, ...]) -> None:
            if t in path:
                cycle = " -> ".join(p.value for p in (*path[path.index(t):], t))
                raise ConfigError(f"daemon dependency cycle: {cycle}")
            if t not in order:
                for dep in self._instance_for(t).depends_on:
                    visit(dep, (*path, t))
                order.append(t)

        visit(target, ())
        return order

    def _instance_for(self, t: DaemonType) -> Daemon:
        """The running instance, or a fresh one kept to be the first to run."""
        if t in self._slots:
            return self._slots[t].instance
        if t not in self._planned:
            self._planned[t] = self._create(t)
        return self._planned[t]

    def _create(self, t: DaemonType) -> Daemon:
        factory = self._factories.get(t)
        if factory is None:
            known = ", ".join(k.value for k in self._factories) or "none"
            raise ConfigError(f"no factory registered for daemon type {t.value!r} (known: {known})")
        instance = factory()
        if instance.daemon_type is not t:
            raise ConfigError(
                f"the factory for {t.value!r} made a {instance.daemon_type.value!r} daemon"
            )
        return instance

    def _launch(self, t: DaemonType) -> _Slot | None:
        if self._stop_requested.is_set():
            return None
        assert self._tg is not None
        slot = _Slot(t, self._planned.pop(t))
        self._slots[t] = slot
        log.info("daemon %s: starting", t.value)
        slot.task = self._tg.create_task(self._supervise(slot), name=f"daemon:{t.value}")
        return slot

    # -- supervision ------------------------------------------------------------------------

    async def _supervise(self, slot: _Slot) -> None:
        """Run the daemon; on a crash, back off and run a fresh instance (one-for-one)."""
        try:
            crash = await self._run_once(slot)
            while crash is not None:
                if self._stop_requested.is_set():
                    log.warning("daemon %s: failed while stopping", slot.daemon_type.value,
                                exc_info=crash)
                    return
                delay = self._after_crash(slot, crash)
                if delay is None:
                    return
                await asyncio.sleep(delay)
                log.info("daemon %s: restarting", slot.daemon_type.value)
                crash = await self._run_once(slot, fresh=True)
        finally:
            if slot.phase is not _Phase.FAILED:
                slot.phase, slot.detail = _Phase.STOPPED, ""
            slot.settled.set()

    async def _run_once(self, slot: _Slot, *, fresh: bool = False) -> BaseException | None:
        """Run one instance; the crash it ended with, or None on a requested stop."""
        try:
            if fresh:
                slot.instance = self._create(slot.daemon_type)
                slot.phase, slot.detail = _Phase.STARTING, "restarted: waiting for ready()"
            await slot.instance.run(self._ready_callback(slot, slot.instance))
        except asyncio.CancelledError as exc:
            if _being_cancelled():
                raise  # the manager is stopping this daemon: never swallow that
            return exc  # the daemon cancelled itself by mistake: a crash like any other
        except Exception as exc:
            return exc
        if _being_cancelled():
            raise asyncio.CancelledError  # run() swallowed our cancel; honour it anyway
        return None if self._stop_requested.is_set() else DaemonExited(slot.daemon_type)

    def _ready_callback(self, slot: _Slot, instance: Daemon) -> Callable[[], None]:
        def ready() -> None:
            # Ignore a second call, or a late one from an instance that has been replaced.
            if slot.instance is not instance or slot.phase is not _Phase.STARTING:
                return
            slot.phase, slot.detail = _Phase.RUNNING, ""
            log.info("daemon %s: ready", slot.daemon_type.value)
            slot.settled.set()
            self._notify(lambda lst: lst.on_daemon_ready(slot.daemon_type))

        return ready

    def _after_crash(self, slot: _Slot, exc: BaseException) -> float | None:
        """Record a crash; the delay before the restart, or None when the budget is spent."""
        now = asyncio.get_running_loop().time()
        recent = slot.restarts
        while recent and recent[0] < now - self._restart_window:
            recent.popleft()
        name = slot.daemon_type.value
        if len(recent) >= self._restart_limit:
            self._give_up(slot, exc, crashes=len(recent) + 1)
            return None
        delay = self._backoff.delay(len(recent) + 1)
        recent.append(now)
        slot.phase = _Phase.BACKOFF
        slot.detail = f"restarting in {delay:.1f}s after {type(exc).__name__}"
        log.error("daemon %s: crashed, restarting in %.1fs", name, delay, exc_info=exc)
        self._notify(lambda lst: lst.on_daemon_crashed(slot.daemon_type, exc, delay))
        return delay

    def _give_up(self, slot: _Slot, exc: BaseException, crashes: int) -> None:
        slot.phase = _Phase.FAILED
        slot.detail = f"restart budget exhausted after {type(exc).__name__}: {exc}"
        log.error("daemon %s: crashed %d times within %.0fs; restart budget exhausted, stopping",
                  slot.daemon_type.value, crashes, self._restart_window, exc_info=exc)
        if self._fatal is None:
            self._fatal = RestartBudgetExhausted(slot.daemon_type.value, crashes,
                                                 self._restart_window)
        self.request_stop()

    # -- stopping ---------------------------------------------------------------------------

    async def _stop_when_requested(self) -> None:
        """Lives in the task group so that request_stop() works whatever the owner awaits."""
        try:
            await self._stop_requested.wait()
            log.info("stopping %d daemon(s)", len(self.running))
            self._notify(lambda lst: lst.on_stopping())
            for slot in reversed(list(self._slots.values())):
                await self._stop_slot(slot)
            log.info("all daemons stopped")
        finally:
            self._stopped.set()

    async def _stop_slot(self, slot: _Slot) -> None:
        task = slot.task
        assert task is not None
        if not task.done():
            if slot.phase in (_Phase.STARTING, _Phase.RUNNING):
                await self._drain(slot)
            task.cancel()
            # asyncio.wait neither raises the task's CancelledError here nor waits forever.
            _, pending = await asyncio.wait({task}, timeout=self._drain_timeout)
            if pending:
                log.error("daemon %s: still running %.1fs after cancellation",
                          slot.daemon_type.value, self._drain_timeout)
        log.info("daemon %s: stopped", slot.daemon_type.value)
        self._notify(lambda lst: lst.on_stopped(slot.daemon_type))

    async def _drain(self, slot: _Slot) -> None:
        name = slot.daemon_type.value
        try:
            async with asyncio.timeout(self._drain_timeout):
                await slot.instance.drain()
        except TimeoutError:
            log.warning("daemon %s: did not drain within %.1fs; cancelling it",
                        name, self._drain_timeout)
        except Exception:
            log.warning("daemon %s: drain failed; cancelling it", name, exc_info=True)

    def _notify(self, call: Callable[[ManagerListener], None]) -> None:
        # A faulty listener (metrics, sd_notify) must never take the daemons down.
        try:
            call(self._listener)
        except Exception:
            log.exception("daemon manager listener failed")


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _wait_uncancellable(task: asyncio.Task[None]) -> None:
    """Await ``task`` to its end even if cancelled meanwhile, then re-raise that cancellation.

    The stop sequence is bounded by the drain timeouts, so this wait is bounded too; leaving
    early would orphan daemon tasks outside their task group.
    """
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
