"""DaemonManager and DaemonRegistry against fake daemons: order, supervision, stop, health."""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import uvloop

from ringsync.daemons.base import Daemon, DaemonType, Health, HealthState
from ringsync.daemons.manager import (
    DaemonExited,
    DaemonFactory,
    DaemonManager,
    ManagerListenerBase,
)
from ringsync.daemons.registry import DaemonRegistry
from ringsync.errors import ConfigError, RestartBudgetExhausted

DS, AS = DaemonType.DATA_SERVER, DaemonType.AUTO_SYNC
FAST = {"backoff_initial": 0.01, "backoff_max": 1.0, "drain_timeout": 0.5}


class FakeType(enum.Enum):
    """DaemonType has two members today; deeper graphs need more (the manager uses identity)."""

    A = "a"
    B = "b"
    C = "c"
    D = "d"


class Pulse:
    """Fired on every change the fakes see, so that tests await a condition instead of polling."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def fire(self) -> None:
        self._changed.set()

    async def until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            self._changed.clear()
            await self._changed.wait()


class FakeDaemon(Daemon):
    """Scripted daemon; appends (event, type value) to its fleet's journal."""

    def __init__(
        self,
        t: Any,
        fleet: Fleet,
        *,
        depends_on: Sequence[Any] = (),
        gate: asyncio.Event | None = None,
        crash: BaseException | None = None,
        crash_before_ready: bool = False,
        exit_after_ready: bool = False,
        inflight: float = 0.0,
        hang_drain: bool = False,
        swallow_cancel: bool = False,
    ) -> None:
        self.daemon_type = t
        self.depends_on = tuple(depends_on)
        self.fleet = fleet
        self.gate, self.crash, self.crash_before_ready = gate, crash, crash_before_ready
        self.exit_after_ready, self.inflight = exit_after_ready, inflight
        self.hang_drain, self.swallow_cancel = hang_drain, swallow_cancel
        self.idle = asyncio.Event()
        self.started_at = -1.0
        self.drained = self.cancelled = False
        self._health = Health(HealthState.STARTING, "fake starting")

    def _note(self, event: str) -> None:
        self.fleet.journal.append((event, self.daemon_type.value))
        self.fleet.pulse.fire()

    async def run(self, ready: Callable[[], None]) -> None:
        self._note("run")
        self.started_at = asyncio.get_running_loop().time()
        try:
            await self._run(ready)
        except asyncio.CancelledError:
            self.cancelled = True
            self._note("cancelled")
            if not self.swallow_cancel:
                raise

    async def _run(self, ready: Callable[[], None]) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.crash is not None and self.crash_before_ready:
            raise self.crash
        self._health = Health(HealthState.HEALTHY, "fake ok")
        ready()
        self._note("ready")
        if self.crash is not None:
            raise self.crash
        if self.exit_after_ready:
            return
        await asyncio.sleep(self.inflight)  # a unit of in-flight work
        self._note("work done")
        self.idle.set()
        await asyncio.Event().wait()

    async def drain(self) -> None:
        self.drained = True
        self._note("drain")
        if self.hang_drain:
            await asyncio.Event().wait()
        await self.idle.wait()

    def health(self) -> Health:
        return self._health


class Fleet:
    """Builds factories whose n-th instance follows the n-th script (the last one repeats)."""

    def __init__(self) -> None:
        self.journal: list[tuple[str, str]] = []
        self.pulse = Pulse()
        self.instances: dict[Any, list[FakeDaemon]] = {}

    def factory(self, t: Any, *scripts: dict[str, Any], **common: Any) -> DaemonFactory:
        made = self.instances.setdefault(t, [])
        plan = scripts or ({},)

        def make() -> Daemon:
            script = plan[min(len(made), len(plan) - 1)]
            made.append(FakeDaemon(t, self, **common, **script))
            return made[-1]

        return make

    def events(self, name: str) -> list[str]:
        return [t for e, t in self.journal if e == name]


class Recorder(ManagerListenerBase):
    def __init__(self, pulse: Pulse) -> None:
        self.pulse = pulse
        self.calls: list[tuple[Any, ...]] = []
        self.crashes: list[tuple[Any, BaseException, float]] = []
        self.all_ready = asyncio.Event()

    def on_daemon_ready(self, t: DaemonType) -> None:
        self.calls.append(("ready", t))

    def on_all_ready(self) -> None:
        self.calls.append(("all_ready",))
        self.all_ready.set()

    def on_daemon_crashed(self, t: DaemonType, exc: BaseException, restart_in: float) -> None:
        self.crashes.append((t, exc, restart_in))
        self.pulse.fire()

    def on_stopping(self) -> None:
        self.calls.append(("stopping",))

    def on_stopped(self, t: DaemonType) -> None:
        self.calls.append(("stopped", t))

    def count(self, name: str) -> int:
        return sum(1 for c in self.calls if c[0] == name)


def pair(fleet: Fleet, **as_script: Any) -> dict[DaemonType, DaemonFactory]:
    """The real dependency shape: AUTO_SYNC needs DATA_SERVER."""
    return {DS: fleet.factory(DS), AS: fleet.factory(AS, depends_on=(DS,), **as_script)}


# -- dependencies ----------------------------------------------------------------------------


async def test_dependent_starts_after_dependency_ready_and_stops_in_reverse() -> None:
    fleet, gate = Fleet(), asyncio.Event()
    rec = Recorder(fleet.pulse)
    factories = {DS: fleet.factory(DS, gate=gate), AS: fleet.factory(AS, depends_on=(DS,))}
    manager = DaemonManager(factories, listener=rec, **FAST)
    runner = asyncio.create_task(manager.run([AS]))
    await fleet.pulse.until(lambda: fleet.events("run") == ["data_server"])
    await asyncio.sleep(0.02)
    assert fleet.events("run") == ["data_server"], "dependent started before ready()"
    gate.set()
    async with asyncio.timeout(2):
        await rec.all_ready.wait()
        assert manager.running == (DS, AS)
        manager.request_stop()
        await runner
    assert [e for e in fleet.journal if e[0] in ("run", "ready")] == [
        ("run", "data_server"), ("ready", "data_server"),
        ("run", "auto_sync"), ("ready", "auto_sync"),
    ]
    stop_events = [e for e in fleet.journal if e[0] in ("drain", "cancelled")]
    assert stop_events == [
        ("drain", "auto_sync"), ("cancelled", "auto_sync"),
        ("drain", "data_server"), ("cancelled", "data_server"),
    ]
    assert [c[1] for c in rec.calls if c[0] == "stopped"] == [AS, DS]
    assert manager.running == ()


async def test_transitive_dependencies_start_once_in_order() -> None:
    fleet = Fleet()
    factories: dict[Any, DaemonFactory] = {
        FakeType.A: fleet.factory(FakeType.A, depends_on=(FakeType.B, FakeType.C)),
        FakeType.B: fleet.factory(FakeType.B, depends_on=(FakeType.D,)),
        FakeType.C: fleet.factory(FakeType.C, depends_on=(FakeType.D,)),
        FakeType.D: fleet.factory(FakeType.D),
    }
    async with asyncio.timeout(2), DaemonManager(factories, **FAST) as manager:
        await manager.start_daemon(FakeType.A)  # type: ignore[arg-type]
        await manager.start_daemon(FakeType.C)  # type: ignore[arg-type]
        assert fleet.events("run") == ["d", "b", "c", "a"]
        assert fleet.events("ready") == ["d", "b", "c", "a"]
    assert all(len(made) == 1 for made in fleet.instances.values())
    assert fleet.events("cancelled") == ["a", "c", "b", "d"]


async def test_auto_sync_alone_brings_up_data_server() -> None:
    fleet = Fleet()
    async with asyncio.timeout(2), DaemonManager(pair(fleet), **FAST) as manager:
        await manager.start_daemon(AS)
        assert manager.running == (DS, AS)
        assert fleet.events("ready") == ["data_server", "auto_sync"]


async def test_dependency_cycle_is_config_error() -> None:
    fleet = Fleet()
    factories = {DS: fleet.factory(DS, depends_on=(AS,)), AS: fleet.factory(AS, depends_on=(DS,))}
    async with asyncio.timeout(2), DaemonManager(factories, **FAST) as manager:
        with pytest.raises(ConfigError, match="cycle: auto_sync -> data_server -> auto_sync"):
            await manager.start_daemon(AS)
        assert fleet.events("run") == []


async def test_unknown_type_is_config_error() -> None:
    fleet = Fleet()
    with pytest.raises(ConfigError, match="no factory registered for daemon type 'auto_sync'"):
        await asyncio.wait_for(DaemonManager({DS: fleet.factory(DS)}, **FAST).run([AS]), 2)
    assert fleet.events("run") == []


# -- supervision ------------------------------------------------------------------------------


async def test_crash_restarts_a_fresh_instance_after_backoff() -> None:
    fleet = Fleet()
    rec = Recorder(fleet.pulse)
    factories = pair(fleet)
    factories[DS] = fleet.factory(DS, {"crash": ValueError("boom")}, {})
    async with asyncio.timeout(2), DaemonManager(factories, listener=rec, **FAST) as manager:
        await manager.start_daemon(DS)
        await fleet.pulse.until(lambda: len(fleet.events("ready")) == 2)
        first, second = fleet.instances[DS]
        assert first is not second
        assert manager.daemon(DS) is second
        assert second.started_at - first.started_at >= 0.01
        assert [(t, type(e), d) for t, e, d in rec.crashes] == [(DS, ValueError, 0.01)]
        assert manager.health()[DS] == Health(HealthState.HEALTHY, "fake ok")
        await manager.start_daemon(AS)  # dependents still start on a restarted dependency
    assert rec.count("ready") == 3


async def test_backoff_grows_exponentially_until_the_budget_runs_out() -> None:
    fleet = Fleet()
    rec = Recorder(fleet.pulse)
    factories = {DS: fleet.factory(DS, crash=ValueError("boom"))}
    manager = DaemonManager(factories, restart_limit=4, listener=rec, **FAST)
    with pytest.raises(RestartBudgetExhausted, match="data_server crashed 5 times"):
        await asyncio.wait_for(manager.run([DS]), 2)
    delays = [d for _, _, d in rec.crashes]
    assert delays == pytest.approx([0.01, 0.02, 0.04, 0.08])
    starts = [d.started_at for d in fleet.instances[DS]]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(gap >= delay for gap, delay in zip(gaps, delays, strict=True))
    assert manager.health()[DS].state is HealthState.FAILED


async def test_backoff_is_capped_by_backoff_max() -> None:
    fleet = Fleet()
    rec = Recorder(fleet.pulse)
    factories = {DS: fleet.factory(DS, crash=ValueError("boom"))}
    manager = DaemonManager(factories, restart_limit=3, listener=rec, backoff_initial=0.01,
                            backoff_max=0.02)
    with pytest.raises(RestartBudgetExhausted):
        await asyncio.wait_for(manager.run([DS]), 2)
    assert [d for _, _, d in rec.crashes] == pytest.approx([0.01, 0.02, 0.02])


async def test_budget_exhausted_drains_everything_and_run_raises() -> None:
    fleet = Fleet()
    rec = Recorder(fleet.pulse)
    manager = DaemonManager(pair(fleet, crash=ValueError("boom")), restart_limit=2, listener=rec,
                            **FAST)
    with pytest.raises(RestartBudgetExhausted) as info:
        await asyncio.wait_for(manager.run([AS]), 2)
    assert (info.value.daemon, info.value.restarts) == ("auto_sync", 3)
    assert len(fleet.instances[AS]) == 3
    data_server = fleet.instances[DS][0]
    assert data_server.drained
    assert data_server.cancelled
    assert rec.count("stopping") == 1
    assert manager.health()[AS].state is HealthState.FAILED
    assert manager.health()[DS].state is HealthState.STOPPED


async def test_restart_limit_zero_makes_the_first_crash_fatal() -> None:
    fleet = Fleet()
    rec = Recorder(fleet.pulse)
    manager = DaemonManager({DS: fleet.factory(DS, crash=ValueError("boom"))}, restart_limit=0,
                            listener=rec, **FAST)
    with pytest.raises(RestartBudgetExhausted, match="crashed 1 times"):
        await asyncio.wait_for(manager.run([DS]), 2)
    assert len(fleet.instances[DS]) == 1
    assert rec.crashes == []


async def test_crash_before_ready_raises_from_start_daemon_instead_of_hanging() -> None:
    fleet = Fleet()
    factories = {DS: fleet.factory(DS, crash=OSError("port in use"), crash_before_ready=True)}
    async with asyncio.timeout(2):
        with pytest.raises(RestartBudgetExhausted):
            async with DaemonManager(factories, restart_limit=1, **FAST) as manager:
                await manager.start_daemon(DS)
    assert fleet.events("run") == ["data_server", "data_server"]
    assert fleet.events("ready") == []


async def test_only_restarts_within_the_window_count() -> None:
    fleet = Fleet()
    rec = Recorder(fleet.pulse)

    def make() -> Daemon:
        # Each instance outlives the window before it crashes: no two restarts share a window.
        gate = asyncio.Event()
        asyncio.get_running_loop().call_later(0.03, gate.set)
        daemon = FakeDaemon(DS, fleet, gate=gate, crash=ValueError("boom"))
        fleet.instances.setdefault(DS, []).append(daemon)
        return daemon

    manager = DaemonManager({DS: make}, restart_limit=1, restart_window=0.02, listener=rec,
                            backoff_initial=0.001)
    async with asyncio.timeout(2), manager:
        await manager.start_daemon(DS)
        await fleet.pulse.until(lambda: len(rec.crashes) >= 4)
    assert len(fleet.instances[DS]) >= 4
    assert {d for _, _, d in rec.crashes} == {0.001}  # the backoff resets with the window


async def test_run_returning_without_a_stop_is_a_crash() -> None:
    fleet = Fleet()
    rec = Recorder(fleet.pulse)
    factories = {DS: fleet.factory(DS, {"exit_after_ready": True}, {})}
    async with asyncio.timeout(2), DaemonManager(factories, listener=rec, **FAST) as manager:
        await manager.start_daemon(DS)
        await fleet.pulse.until(lambda: len(fleet.instances[DS]) == 2)
    assert [type(e) for _, e, _ in rec.crashes] == [DaemonExited]


async def test_a_daemon_cancelling_itself_is_a_crash_not_a_stop() -> None:
    fleet = Fleet()
    rec = Recorder(fleet.pulse)
    factories = {DS: fleet.factory(DS, {"crash": asyncio.CancelledError()}, {})}
    async with asyncio.timeout(2), DaemonManager(factories, listener=rec, **FAST) as manager:
        await manager.start_daemon(DS)
        await fleet.pulse.until(lambda: len(fleet.events("ready")) == 2)
        assert manager.running == (DS,)
    assert [type(e) for _, e, _ in rec.crashes] == [asyncio.CancelledError]


class Fatal(BaseException):
    """Not an Exception, so not a crash to restart; SystemExit would stop the event loop itself."""


async def test_a_base_exception_propagates_and_nothing_restarts() -> None:
    fleet = Fleet()
    factories: dict[Any, DaemonFactory] = {
        FakeType.A: fleet.factory(FakeType.A, crash=Fatal()),
        FakeType.B: fleet.factory(FakeType.B),
        FakeType.C: fleet.factory(FakeType.C, swallow_cancel=True),  # a misbehaving daemon
    }
    manager = DaemonManager(factories, **FAST)
    with pytest.raises(BaseExceptionGroup) as info:
        await asyncio.wait_for(manager.run([FakeType.B, FakeType.C, FakeType.A]), 2)  # type: ignore[list-item]
    assert info.group_contains(Fatal)
    assert sorted(fleet.events("cancelled")) == ["b", "c"]
    assert fleet.events("run") == ["b", "c", "a"], "a cancelled daemon was restarted"


# -- stopping ---------------------------------------------------------------------------------


async def test_request_stop_drains_in_flight_work_and_run_returns() -> None:
    fleet = Fleet()
    rec = Recorder(fleet.pulse)
    manager = DaemonManager(pair(fleet, inflight=0.05), listener=rec, **FAST)
    async with asyncio.timeout(2):
        runner = asyncio.create_task(manager.run([AS]))
        await rec.all_ready.wait()
        manager.request_stop()
        manager.request_stop()
        await runner
        await manager.wait_stopped()
    auto_sync = [e for e, t in fleet.journal if t == "auto_sync"]
    assert auto_sync == ["run", "ready", "drain", "work done", "cancelled"]
    assert all(d.drained and d.cancelled for made in fleet.instances.values() for d in made)
    assert rec.count("stopping") == 1
    assert rec.count("all_ready") == 1
    assert manager.health() == {DS: Health(HealthState.STOPPED), AS: Health(HealthState.STOPPED)}


async def test_a_hanging_drain_is_bounded_and_the_daemon_cancelled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fleet = Fleet()
    rec = Recorder(fleet.pulse)
    manager = DaemonManager(pair(fleet, hang_drain=True), listener=rec, backoff_initial=0.01,
                            drain_timeout=0.05)
    loop = asyncio.get_running_loop()
    with caplog.at_level(logging.WARNING, logger="ringsync.daemons.manager"):
        async with asyncio.timeout(2):
            runner = asyncio.create_task(manager.run([AS]))
            await rec.all_ready.wait()
            began = loop.time()
            manager.request_stop()
            await runner
    assert loop.time() - began < 0.5
    assert fleet.instances[AS][0].cancelled
    assert fleet.instances[DS][0].cancelled
    assert "daemon auto_sync: did not drain within 0.1s" in caplog.text


async def test_cancelling_run_stops_the_daemons_and_propagates() -> None:
    fleet = Fleet()
    rec = Recorder(fleet.pulse)
    manager = DaemonManager(pair(fleet, inflight=0.05), listener=rec, **FAST)
    async with asyncio.timeout(2):
        runner = asyncio.create_task(manager.run([AS]))
        await rec.all_ready.wait()
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
    assert runner.cancelled()
    assert [e for e, t in fleet.journal if t == "auto_sync"][-3:] == ["drain", "work done",
                                                                      "cancelled"]
    assert fleet.instances[DS][0].drained
    assert fleet.instances[DS][0].cancelled
    assert rec.count("stopping") == 1


async def test_a_second_cancel_during_stop_still_stops_everything() -> None:
    fleet = Fleet()
    manager = DaemonManager(pair(fleet, hang_drain=True), backoff_initial=0.01, drain_timeout=0.05)
    async with asyncio.timeout(2):
        runner = asyncio.create_task(manager.run([AS]))
        await fleet.pulse.until(lambda: len(fleet.events("ready")) == 2)
        runner.cancel()
        await fleet.pulse.until(lambda: bool(fleet.events("drain")))
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
    assert fleet.instances[AS][0].cancelled
    assert fleet.instances[DS][0].cancelled


async def test_cancel_while_waiting_for_ready_propagates() -> None:
    fleet = Fleet()
    manager = DaemonManager({DS: fleet.factory(DS, gate=asyncio.Event())}, drain_timeout=0.05)
    async with asyncio.timeout(2):
        runner = asyncio.create_task(manager.run([DS]))
        await fleet.pulse.until(lambda: bool(fleet.events("run")))
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
    assert fleet.instances[DS][0].cancelled


async def test_stop_during_start_up_returns_without_starting_dependents() -> None:
    fleet = Fleet()
    rec = Recorder(fleet.pulse)
    factories = {DS: fleet.factory(DS, gate=asyncio.Event()),
                 AS: fleet.factory(AS, depends_on=(DS,))}
    manager = DaemonManager(factories, listener=rec, backoff_initial=0.01, drain_timeout=0.05)
    async with asyncio.timeout(2):
        runner = asyncio.create_task(manager.run([AS]))
        await fleet.pulse.until(lambda: bool(fleet.events("run")))
        manager.request_stop()
        await runner
    assert fleet.events("run") == ["data_server"]
    assert rec.count("all_ready") == 0


# -- health and listener -----------------------------------------------------------------------


async def test_health_reports_starting_healthy_and_stopped() -> None:
    fleet, gate = Fleet(), asyncio.Event()
    manager = DaemonManager({DS: fleet.factory(DS, gate=gate)}, **FAST)
    async with asyncio.timeout(2), manager:
        starting = asyncio.create_task(manager.start_daemon(DS))
        await fleet.pulse.until(lambda: bool(fleet.events("run")))
        assert manager.health() == {DS: Health(HealthState.STARTING, "waiting for ready()")}
        gate.set()
        await starting
        assert manager.health() == {DS: Health(HealthState.HEALTHY, "fake ok")}  # the daemon's own
    assert manager.health() == {DS: Health(HealthState.STOPPED)}
    assert manager.daemon(AS) is None


async def test_health_is_degraded_during_backoff() -> None:
    fleet = Fleet()
    factories = {DS: fleet.factory(DS, {"crash": ValueError("boom")}, {})}
    manager = DaemonManager(factories, backoff_initial=2.0, drain_timeout=0.5,
                            listener=Recorder(fleet.pulse))
    async with asyncio.timeout(2), manager:
        await manager.start_daemon(DS)
        await fleet.pulse.until(lambda: manager.health()[DS].state is HealthState.DEGRADED)
        assert manager.health()[DS].detail == "restarting in 2.0s after ValueError"
        assert manager.running == (DS,)
    assert manager.health()[DS] == Health(HealthState.STOPPED)


async def test_listener_calls_fire_once_and_a_failing_listener_is_contained() -> None:
    class Faulty(Recorder):
        def on_daemon_ready(self, t: DaemonType) -> None:
            super().on_daemon_ready(t)
            raise RuntimeError("metrics are down")

    fleet = Fleet()
    rec = Faulty(fleet.pulse)
    manager = DaemonManager(pair(fleet), listener=rec, **FAST)
    async with asyncio.timeout(2):
        runner = asyncio.create_task(manager.run([DS, AS]))
        await rec.all_ready.wait()
        assert rec.crashes == []
        manager.request_stop()
        await runner
    assert rec.calls == [
        ("ready", DS), ("ready", AS), ("all_ready",),
        ("stopping",), ("stopped", AS), ("stopped", DS),
    ]


# -- event loops, registry ------------------------------------------------------------------------


def test_runs_under_uvloop() -> None:
    async def scenario() -> list[tuple[str, str]]:
        fleet = Fleet()
        rec = Recorder(fleet.pulse)
        factories = pair(fleet)
        factories[DS] = fleet.factory(DS, {"crash": ValueError("boom")}, {})
        manager = DaemonManager(factories, listener=rec, **FAST)
        runner = asyncio.create_task(manager.run([AS]))
        async with asyncio.timeout(2):
            await rec.all_ready.wait()
            await fleet.pulse.until(lambda: len(fleet.events("ready")) == 3)
            manager.request_stop()
            await runner
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        return fleet.journal

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        journal = runner.run(scenario())
    assert journal[-4:] == [
        ("drain", "auto_sync"), ("cancelled", "auto_sync"),
        ("drain", "data_server"), ("cancelled", "data_server"),
    ]


def test_registry_binds_the_context() -> None:
    class Ctx:
        pass

    made: list[Ctx] = []

    def build(ctx: Ctx) -> Daemon:
        made.append(ctx)
        return FakeDaemon(DS, Fleet())

    registry: DaemonRegistry[Ctx] = DaemonRegistry()
    registry.register(DS, build)
    with pytest.raises(ConfigError, match="already registered"):
        registry.register(DS, build)
    ctx = Ctx()
    factories = registry.factories_for(ctx)
    assert list(factories) == [DS]
    assert DS in registry
    assert AS not in registry
    assert factories[DS]().daemon_type is DS
    assert made == [ctx]
