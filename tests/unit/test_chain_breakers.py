"""The transport chains behind a circuit breaker per (peer, transport), on a fake clock:
a step whose breaker is open is skipped without a try, a half-open one lets one probe
through, only transient errors count, and every change is told once."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from ringsync.errors import PeerRefusedError, PeerUnreachableError, TransientError
from ringsync.files.client import Body
from ringsync.files.kinds import FileKind
from ringsync.files.plan import IndexEntry, Source
from ringsync.inventory import Host
from ringsync.policy.breaker import BreakerChange, BreakerConfig, Breakers, BreakerState, peer_state
from ringsync.policy.chains import Outcome
from ringsync.protocol.results import MergeResult
from ringsync.transport.base import GameTransport
from ringsync.transport.files import FileClientChain
from ringsync.transport.select import TransportChain
from tests.unit.clock import FakeClock

pytestmark = pytest.mark.timeout(10)

CONFIG = BreakerConfig(failure_threshold=3, recovery_s=30.0, recovery_max_s=120.0, jitter=0.0)
PEER = Host(name="t1")


class Step:
    """A fake transport: reaches the peers in ``up``; ``error`` (if set) is raised instead;
    ``gate`` (if set) holds each push until it is set."""

    def __init__(self, name: str, up: bool = True) -> None:
        self.name, self.up, self.calls = name, up, 0
        self.error: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def push_games(self, peer: Host, payload: bytes, digest: str, *,
                         data_dir_id: str | None = None) -> MergeResult:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        if not self.up:
            raise PeerUnreachableError(peer.name, f"{self.name}: connection refused")
        return MergeResult(inserted=1, duplicates=0)

    async def peer_data_dir_id(self, peer: Host) -> str:
        await self.push_games(peer, b"", "")
        return self.name

    async def close(self) -> None:
        return None


class Rig:
    """An HTTP -> SSH chain with its breakers, the attempts counted and the changes told."""

    def __init__(self, http_up: bool = False) -> None:
        self.clock = FakeClock()
        self.changes: list[BreakerChange] = []
        self.breakers = Breakers(CONFIG, clock=self.clock, on_change=self.changes.append)
        self.http, self.ssh = Step("http", up=http_up), Step("ssh")
        self.attempts: Counter[tuple[str, Outcome]] = Counter()
        transports: dict[str, GameTransport] = {"http": self.http, "ssh": self.ssh}
        self.chain = TransportChain(transports, ("http", "ssh"), self.breakers,
                                    on_attempt=lambda t, o: self.attempts.update([(t, o)]))

    async def push(self) -> MergeResult:
        return await self.chain.push_games(PEER, b"x", "d")

    def state(self, transport: str) -> BreakerState:
        return self.breakers.get(PEER.name, transport).state

    def moves(self, transport: str) -> list[tuple[BreakerState | None, BreakerState]]:
        return [(c.old, c.new) for c in self.changes if c.transport == transport]


async def test_http_breaker_opens_at_the_threshold_then_pushes_go_straight_to_ssh() -> None:
    rig = Rig()
    for _ in range(CONFIG.failure_threshold):
        assert (await rig.push()).inserted == 1  # every game still goes, over SSH
    assert rig.http.calls == 3
    assert rig.state("http") is BreakerState.OPEN
    assert rig.state("ssh") is BreakerState.CLOSED
    assert rig.moves("http") == [(None, BreakerState.CLOSED), (BreakerState.CLOSED, BreakerState.OPEN)]
    for _ in range(5):
        await rig.push()
        await rig.chain.peer_data_dir_id(PEER)
    assert rig.http.calls == 3  # HTTP is not tried while its breaker is open
    assert rig.ssh.calls == 13
    assert rig.attempts[("http", Outcome.NEXT)] == 3
    assert rig.attempts[("http", Outcome.BREAKER_OPEN)] == 10
    assert rig.attempts[("ssh", Outcome.OK)] == 13
    assert peer_state(rig.chain.circuits(PEER)) is BreakerState.CLOSED  # the peer still flows


async def test_after_recovery_one_probe_tries_http_and_a_success_closes_it() -> None:
    rig = Rig()
    for _ in range(3):
        await rig.push()
    rig.clock.advance(29.0)
    await rig.push()
    assert rig.http.calls == 3
    rig.http.up = True  # HTTP healed
    rig.clock.advance(1.0)
    await rig.push()  # the probe
    assert rig.http.calls == 4
    assert rig.ssh.calls == 4  # the probe carried the batch: SSH was not needed
    assert rig.state("http") is BreakerState.CLOSED
    assert rig.moves("http")[2:] == [(BreakerState.OPEN, BreakerState.HALF_OPEN),
                                     (BreakerState.HALF_OPEN, BreakerState.CLOSED)]
    await rig.push()
    assert (rig.http.calls, rig.ssh.calls) == (5, 4)  # back on the preferred transport


async def test_a_failed_probe_reopens_for_longer_and_the_batch_still_goes_over_ssh() -> None:
    rig = Rig()
    for _ in range(3):
        await rig.push()
    rig.clock.advance(30.0)
    assert (await rig.push()).inserted == 1
    assert rig.http.calls == 4
    assert rig.state("http") is BreakerState.OPEN
    rig.clock.advance(59.0)  # the recovery doubled to 60 s
    await rig.push()
    assert rig.http.calls == 4
    rig.clock.advance(1.0)
    await rig.push()
    assert rig.http.calls == 5


async def probe_in_flight(rig: Rig) -> asyncio.Task[MergeResult]:
    """Open HTTP's breaker, wait out its recovery, and start a push held on HTTP: the probe."""
    for _ in range(3):
        await rig.push()
    rig.clock.advance(30.0)
    rig.http.gate = asyncio.Event()
    probe = asyncio.create_task(rig.push())
    await asyncio.sleep(0)
    assert rig.state("http") is BreakerState.HALF_OPEN
    return probe


async def test_a_half_open_breaker_lets_one_probe_through_the_others_take_ssh() -> None:
    rig = Rig()
    probe = await probe_in_flight(rig)
    await asyncio.gather(rig.push(), rig.push())
    assert rig.http.calls == 4  # one probe only
    assert rig.attempts[("http", Outcome.BREAKER_OPEN)] == 2
    rig.http.up = True
    assert rig.http.gate is not None
    rig.http.gate.set()
    await probe
    assert rig.state("http") is BreakerState.CLOSED


async def test_a_cancelled_probe_gives_no_verdict_and_frees_its_slot() -> None:
    rig = Rig()
    probe = await probe_in_flight(rig)
    probe.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await probe
    assert rig.state("http") is BreakerState.HALF_OPEN
    assert rig.http.gate is not None
    rig.http.gate.set()
    rig.http.up = True
    await rig.push()  # the slot is free again: this push is the probe
    assert rig.state("http") is BreakerState.CLOSED


async def test_only_transient_errors_count_and_an_answer_closes_the_count() -> None:
    rig = Rig(http_up=True)
    rig.http.error = PeerRefusedError("t1", "HTTP 401: wrong token")
    for _ in range(5):
        with pytest.raises(PeerRefusedError):  # final: not retried over SSH
            await rig.push()
    assert rig.state("http") is BreakerState.CLOSED
    assert rig.ssh.calls == 0
    rig.http.error = TransientError("t1", "storage busy")
    for _ in range(3):
        with pytest.raises(TransientError):  # reached, could not take it: final too
            await rig.push()
    assert rig.state("http") is BreakerState.OPEN  # but it counts against HTTP's breaker
    assert rig.ssh.calls == 0


async def test_every_transport_open_the_peer_waits_and_nothing_is_tried() -> None:
    rig = Rig()
    rig.ssh.up = False
    for _ in range(3):
        with pytest.raises(PeerUnreachableError):
            await rig.push()
    assert peer_state(rig.chain.circuits(PEER)) is BreakerState.OPEN
    calls = (rig.http.calls, rig.ssh.calls)
    with pytest.raises(PeerUnreachableError, match="circuit breaker is open for http, ssh"):
        await rig.push()
    assert (rig.http.calls, rig.ssh.calls) == calls
    assert peer_state(rig.chain.circuits(Host(name="t2"))) is BreakerState.CLOSED  # others flow
    rig.clock.advance(30.0)
    assert peer_state(rig.chain.circuits(PEER)) is BreakerState.HALF_OPEN


class Files:
    """A fake PeerFiles: reachable or not, counting index reads and opens."""

    def __init__(self, up: bool) -> None:
        self.up, self.calls = up, 0

    async def index(self, peer: Host) -> list[IndexEntry]:
        self.calls += 1
        if not self.up:
            raise PeerUnreachableError(peer.name, "connection refused")
        return []

    @contextlib.asynccontextmanager
    async def open(self, peer: Host, source: Source, start: int) -> AsyncIterator[Body]:
        await self.index(peer)
        yield None  # type: ignore[misc]

    async def close(self) -> None:
        return None


async def test_the_file_chain_shares_the_nodes_breakers() -> None:
    rig = Rig()
    http, ssh = Files(up=False), Files(up=True)
    files = FileClientChain({"http": http, "ssh": ssh}, ("http", "ssh"), rig.breakers)
    for _ in range(2):
        await files.index(PEER)
    await rig.push()  # the games chain's failure is the third in a row for (t1, http)
    assert rig.state("http") is BreakerState.OPEN
    source = Source("t1", FileKind.MODELS, "m.pth")
    async with files.open(PEER, source, 0):
        pass
    await files.index(PEER)
    assert (http.calls, ssh.calls) == (2, 4)  # HTTP skipped for files too
