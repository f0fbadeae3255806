"""rsync runs and aria2 sources behind the node's circuit breakers, on a fake clock: an open
breaker keeps a peer out of rsync batches and aria2c's source list, a half-open one lets one
probe through, only transient errors count; and the file chain's steps are counted."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from ringsync.daemons.file_sync import FileSyncDaemon
from ringsync.errors import PeerRefusedError, TransientError
from ringsync.files.fetch import Exclusions
from ringsync.files.kinds import FileKind
from ringsync.files.plan import FetchJob, IndexEntry, Source
from ringsync.inventory import Host
from ringsync.node import NodeContext
from ringsync.ops.metrics import Metrics
from ringsync.policy.breaker import BreakerChange, BreakerConfig, Breakers, BreakerState
from ringsync.policy.chains import Outcome
from ringsync.transport import aria2 as aria2_module
from ringsync.transport.aria2 import ARIA2, Aria2Transport, Mirror, server_verdicts
from ringsync.transport.files import FileClientChain
from ringsync.transport.rsync import RSYNC, RsyncRun, admitted, batches, behind_breakers, settle
from ringsync.transport.select import count_attempts
from ringsync.transport.ssh_login import Login, login_refusal
from tests.conftest import make_inventory
from tests.unit.clock import FakeClock
from tests.unit.test_chain_breakers import Files

pytestmark = pytest.mark.timeout(10)

CONFIG = BreakerConfig(failure_threshold=2, recovery_s=30.0, recovery_max_s=120.0, jitter=0.0)
M, T = FileKind.MODELS, FileKind.TRAINING_DATA
HOSTS = {n: Host(name=n, p2p_host=f"127.0.0.{i + 2}", p2p_port=8770, transport=("http", "ssh"))
         for i, n in enumerate(("t1", "t2"))}
DOWN = TransientError("t1", "rsync exited with 12: connection unexpectedly closed")


def entry(kind: FileKind, i: int) -> IndexEntry:
    return IndexEntry(kind, f"f{i}.pth", 10 + i, 1, f"{i:064x}")


def jobs(kind: FileKind, n: int, *holders: str) -> list[FetchJob]:
    return [FetchJob(e := entry(kind, i), tuple(Source(h, kind, e.relpath) for h in holders))
            for i in range(n)]


class Node:
    """The node's breakers on a fake clock, every change told, and the daemon's batching."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.changes: list[BreakerChange] = []
        self.breakers = Breakers(CONFIG, clock=self.clock, on_change=self.changes.append)

    def runs(self, todo: list[FetchJob]) -> list[RsyncRun]:
        groups = batches(todo, behind_breakers(self.breakers, HOSTS.get), {}, min_files=3)
        return admitted(groups, self.breakers)

    def state(self, peer: str, transport: str) -> BreakerState:
        return self.breakers.get(peer, transport).state


def test_rsync_failing_transiently_opens_its_breaker_and_the_files_go_one_by_one() -> None:
    node = Node()
    for _ in range(CONFIG.failure_threshold):
        (run,) = node.runs(jobs(M, 4, "t1"))
        assert (run.peer, run.kind, len(run.files)) == ("t1", M, 4)
        settle(node.breakers, run, DOWN)
    assert node.state("t1", RSYNC) is BreakerState.OPEN
    assert node.state("t1", "http") is BreakerState.CLOSED  # only rsync is left alone
    assert node.runs(jobs(M, 4, "t1")) == []  # no run: the daemon fetches them one by one
    (run,) = node.runs(jobs(M, 4, "t1", "t2"))  # another holder's rsync still serves them
    assert run.peer == "t2"
    settle(node.breakers, run, None)
    node.clock.advance(29.0)
    assert node.runs(jobs(M, 4, "t1")) == []


def test_after_recovery_one_rsync_run_probes_and_its_success_closes_the_breaker() -> None:
    node = Node()
    for _ in range(CONFIG.failure_threshold):
        settle(node.breakers, node.runs(jobs(M, 4, "t1"))[0], DOWN)
    node.clock.advance(30.0)
    probe, *others = node.runs(jobs(M, 4, "t1") + jobs(T, 4, "t1"))  # two batches owed by t1
    assert others == []  # one probe at a time: the training data goes one by one meanwhile
    assert node.state("t1", RSYNC) is BreakerState.HALF_OPEN
    settle(node.breakers, probe, None)
    assert node.state("t1", RSYNC) is BreakerState.CLOSED
    assert len(node.runs(jobs(M, 4, "t1") + jobs(T, 4, "t1"))) == 2
    moves = [(c.old, c.new) for c in node.changes if c.transport == RSYNC]
    assert moves == [(None, BreakerState.CLOSED), (BreakerState.CLOSED, BreakerState.OPEN),
                     (BreakerState.OPEN, BreakerState.HALF_OPEN),
                     (BreakerState.HALF_OPEN, BreakerState.CLOSED)]


def test_a_failed_rsync_probe_reopens_it_for_longer() -> None:
    node = Node()
    for _ in range(CONFIG.failure_threshold):
        settle(node.breakers, node.runs(jobs(M, 4, "t1"))[0], DOWN)
    node.clock.advance(30.0)
    settle(node.breakers, node.runs(jobs(M, 4, "t1"))[0], DOWN)
    assert node.state("t1", RSYNC) is BreakerState.OPEN
    node.clock.advance(30.0)
    assert node.runs(jobs(M, 4, "t1")) == []  # 60 s now
    node.clock.advance(30.0)
    assert len(node.runs(jobs(M, 4, "t1"))) == 1


def test_what_counts_against_rsync_a_local_error_or_cancel_does_not_an_answer_resets() -> None:
    node = Node()
    settle(node.breakers, node.runs(jobs(M, 4, "t1"))[0], DOWN)
    for local in (OSError(28, "No space left on device"), BaseException("cancelled")):
        settle(node.breakers, node.runs(jobs(M, 4, "t1"))[0], local)  # released: no verdict
    assert node.state("t1", RSYNC) is BreakerState.CLOSED
    settle(node.breakers, node.runs(jobs(M, 4, "t1"))[0], PeerRefusedError("t1", "refused"))
    settle(node.breakers, node.runs(jobs(M, 4, "t1"))[0], DOWN)  # the count began again
    assert node.state("t1", RSYNC) is BreakerState.CLOSED
    # A refused host key is typed PeerUnreachableError (a transient error) like every SSH
    # login failure here: it counts, so a peer with a changed key is not hammered each poll.
    refused = login_refusal(HOSTS["t1"], "Host key verification failed.", Login(Path("known_hosts")))
    settle(node.breakers, node.runs(jobs(M, 4, "t1"))[0], refused)
    assert node.state("t1", RSYNC) is BreakerState.OPEN


# -- aria2 ---------------------------------------------------------------------------------------

MIRRORS = [Mirror("t1", "http://127.0.0.2:8770/v1/files/models/m.pth"),
           Mirror("t2", "http://127.0.0.3:8770/v1/files/models/m.pth"),
           Mirror("t3", "http://127.0.0.4:8771/v1/files/models/m.pth"),
           Mirror("t4", "http://127.0.0.4:8772/v1/files/models/m.pth")]
STATS = ("host=127.0.0.2, protocol=http, dl_speed=0, sc_avg_speed=0, mc_avg_speed=0, "
         "last_updated=1796631129, counter=0, status=ERROR\n"
         "host=127.0.0.3, protocol=http, dl_speed=645161290, sc_avg_speed=645161280, "
         "mc_avg_speed=0, last_updated=1796631129, counter=1, status=OK\n"
         "host=127.0.0.4, protocol=http, dl_speed=0, sc_avg_speed=0, mc_avg_speed=0, "
         "last_updated=1796631129, counter=0, status=ERROR\n")


def test_aria2c_server_stats_give_a_verdict_per_source_only_where_its_host_is_its_own() -> None:
    assert server_verdicts(STATS, MIRRORS) == {"t1": False, "t2": True}  # t3, t4 share a host
    assert server_verdicts("", MIRRORS) == {}  # killed before it wrote them
    assert server_verdicts("host=127.0.0.5, status=ERROR\n", MIRRORS) == {}


BIG = IndexEntry(M, "m.pth", 1 << 30, 1, "a" * 64)
SOURCES = tuple(Source(n, M, "m.pth") for n in ("t1", "t2", "t3"))


@pytest.fixture
async def aria2() -> AsyncIterator[tuple[Aria2Transport, Node]]:
    node = Node()
    hosts = {n: Host(name=n, p2p_host=f"127.0.0.{i + 2}", p2p_port=8770)
             for i, n in enumerate(("t1", "t2", "t3"))}
    transport = Aria2Transport("recv", None, hosts.get, Metrics(), Exclusions(), min_bytes=1,
                               binary="aria2c", breakers=node.breakers)
    yield transport, node
    await transport.close()


async def test_a_source_aria2c_could_not_reach_is_left_out_while_its_breaker_is_open(
        aria2: tuple[Aria2Transport, Node]) -> None:
    transport, node = aria2
    assert [m.peer for m in transport.mirrors(BIG, SOURCES)] == ["t1", "t2", "t3"]
    for _ in range(CONFIG.failure_threshold):
        attempts = transport._allow(transport.mirrors(BIG, SOURCES))
        transport._settle(attempts, {"t1": False, "t2": True})  # t3: no verdict (released)
    assert node.state("t1", ARIA2) is BreakerState.OPEN
    assert [m.peer for m in transport.mirrors(BIG, SOURCES)] == ["t2", "t3"]
    assert transport.wants(BIG, SOURCES)  # two sources are still worth a multi-source fetch
    assert node.state("t3", ARIA2) is BreakerState.CLOSED
    node.clock.advance(30.0)
    attempts = transport._allow(transport.mirrors(BIG, SOURCES))  # t1 probes
    assert [m.peer for m in attempts] == ["t1", "t2", "t3"]
    assert [m.peer for m in transport.mirrors(BIG, SOURCES)] == ["t2", "t3"]  # probe slot taken
    transport._settle(attempts, {"t1": True})
    assert node.state("t1", ARIA2) is BreakerState.CLOSED


async def test_two_sources_with_open_breakers_leave_too_few_for_aria2(
        aria2: tuple[Aria2Transport, Node]) -> None:
    transport, node = aria2
    for _ in range(CONFIG.failure_threshold):
        transport._settle(transport._allow(transport.mirrors(BIG, SOURCES)), {"t1": False, "t2": False})
    assert node.state("t2", ARIA2) is BreakerState.OPEN
    assert not transport.wants(BIG, SOURCES)  # the chain's next step fetches it from one source


# -- the file chain's steps in ringsync_transport_attempts_total ----------------------------------

async def test_the_file_chain_counts_each_step_under_data_type_files() -> None:
    metrics, node = Metrics(), Node()
    chain = FileClientChain({"http": Files(up=False), "ssh": Files(up=True)}, ("http", "ssh"),
                            node.breakers, on_attempt=count_attempts(metrics, "files"))
    peer = HOSTS["t1"]
    for _ in range(3):
        await chain.index(peer)
    async with chain.open(peer, Source("t1", M, "m.pth"), 0):
        pass

    def attempts(transport: str, outcome: Outcome) -> float | None:
        return metrics.registry.get_sample_value("ringsync_transport_attempts_total", {
            "data_type": "files", "transport": transport, "outcome": outcome.value})

    assert attempts("http", Outcome.NEXT) == CONFIG.failure_threshold
    assert attempts("http", Outcome.BREAKER_OPEN) == 2  # open: skipped without a try
    assert attempts("ssh", Outcome.OK) == 4


async def test_an_rsync_run_cancelled_before_it_started_gives_its_probe_slot_back(
        node_factory: Callable[..., NodeContext]) -> None:
    """The daemon takes a run's attempt when it plans the batch; a task cancelled before its
    first step (the daemon stopping, a sibling task failing) never runs its own handlers."""
    inventory = make_inventory()
    inventory.hosts["train-1"] = dataclasses.replace(inventory.hosts["train-1"], transport=("ssh",))
    ctx = node_factory("selfplay-1", inventory=inventory, rsync_min_files=2)
    clock = FakeClock()
    ctx.breakers = Breakers(CONFIG, clock=clock)
    for _ in range(CONFIG.failure_threshold):
        attempt = ctx.breakers.allow("train-1", RSYNC)
        assert attempt is not None
        ctx.breakers.record(attempt, DOWN)
    clock.advance(CONFIG.recovery_s)  # the next run is the half-open probe
    daemon = FileSyncDaemon(ctx)
    todo = jobs(M, 3, "train-1")

    started: list[bool] = []

    async def plan_then_stop() -> None:
        async with asyncio.TaskGroup() as tg:
            daemon._start_batches(tg, None, todo)  # type: ignore[arg-type]  # never reached
            started.append(all(j.entry.ident in daemon._in_flight for j in todo))
            started.append(not ctx.breakers.get("train-1", RSYNC).would_allow())
            raise LookupError  # the task group cancels the run before its first step

    with pytest.raises(ExceptionGroup):
        await plan_then_stop()
    assert started == [True, True]  # the probe run was planned and held the one slot
    breaker = ctx.breakers.get("train-1", RSYNC)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.would_allow()  # the next run may probe


async def test_an_aria2_fetch_that_fails_before_aria2c_runs_gives_its_probe_slot_back(
        aria2: tuple[Aria2Transport, Node], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Preparing the part can fail (a read-only mount): every attempt taken is ended, so a
    half-open source is not left waiting for a verdict that never comes."""
    transport, node = aria2
    for _ in range(CONFIG.failure_threshold):
        transport._settle(transport._allow(transport.mirrors(BIG, SOURCES)), {"t1": False})
    node.clock.advance(30.0)  # t1's next attempt is its probe

    def read_only(part: Path, control: Path) -> int:
        raise PermissionError(13, "Read-only file system", str(part))

    monkeypatch.setattr(aria2_module, "_prepare", read_only)
    with pytest.raises(PermissionError):
        await transport.fetch_into(BIG, SOURCES, tmp_path / ".m.pth.ringsync-part")
    assert node.state("t1", ARIA2) is BreakerState.HALF_OPEN
    assert [m.peer for m in transport.mirrors(BIG, SOURCES)] == ["t1", "t2", "t3"]  # t1 may probe
