"""BandwidthLimiter under a fake clock: rate, weighted sharing, overtaking, slots, cancellation."""

from __future__ import annotations

import ast
import asyncio
import heapq
import itertools
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ringsync.errors import ConfigError
from ringsync.inventory import most_specific_pattern
from ringsync.policy import bandwidth as bandwidth_module
from ringsync.policy.bandwidth import (
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    BandwidthLimiter,
    BandwidthLimits,
    Priority,
    slot_cap,
)
from ringsync.settings import Settings, load_settings

MBPS_40 = 40.0
RATE_40 = 5_000_000.0  # bytes/s
CHUNK = MAX_CHUNK_BYTES


@dataclass
class _Handle:
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeClock:
    """Time moves only when the test says; timers fire in order, tasks settle in between."""

    now: float = 0.0
    fired: int = 0
    _timers: list[tuple[float, int, Callable[[], None], _Handle]] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    def __call__(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Handle:
        handle = _Handle()
        heapq.heappush(self._timers, (self.now + delay, next(self._seq), callback, handle))
        return handle

    async def settle(self) -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    def fire_next(self, until: float) -> bool:
        """Fire the next live timer due by ``until``; False when there is none."""
        while self._timers and self._timers[0][3].cancelled:
            heapq.heappop(self._timers)
        if not self._timers or self._timers[0][0] > until:
            return False
        when, _, callback, _ = heapq.heappop(self._timers)
        self.now = max(self.now, when)
        self.fired += 1
        callback()
        return True

    async def run_until(self, until: float) -> None:
        await self.settle()
        while self.fire_next(until):
            await self.settle()
        self.now = max(self.now, until)
        await self.settle()


def make(clock: FakeClock, **limits: object) -> BandwidthLimiter:
    return BandwidthLimiter(BandwidthLimits(**limits),  # type: ignore[arg-type]
                            clock=clock, call_later=clock.call_later)


@dataclass
class Sender:
    """A backlogged transfer: asks for chunk after chunk and records what it was granted."""

    limiter: BandwidthLimiter
    peer: str
    priority: Priority
    clock: FakeClock
    granted: list[tuple[float, int]] = field(default_factory=list)

    async def run(self, total: int | None = None) -> None:
        sent = 0
        while total is None or sent < total:
            size = self.limiter.chunk_bytes(self.peer)
            await self.limiter.acquire(self.peer, size, self.priority)
            self.granted.append((self.clock(), size))
            sent += size

    def bytes_between(self, start: float, end: float) -> int:
        return sum(n for t, n in self.granted if start <= t < end)


async def run_senders(clock: FakeClock, senders: list[Sender], seconds: float) -> None:
    tasks = [asyncio.create_task(s.run()) for s in senders]
    try:
        await clock.run_until(seconds)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_total_rate_holds_over_a_long_window() -> None:
    clock = FakeClock()
    limiter = make(clock, total_mbps=MBPS_40)
    senders = [Sender(limiter, f"peer-{i}", Priority.NORMAL, clock) for i in range(3)]
    await run_senders(clock, senders, 60.0)
    sent = sum(s.bytes_between(0, 60.0) for s in senders)
    assert abs(sent / 60.0 - RATE_40) / RATE_40 < 0.02
    # Short-term: no one-second window carries more than a second's rate plus the burst.
    burst = RATE_40 * 0.25
    for second in range(1, 59):
        window = sum(s.bytes_between(second, second + 1.0) for s in senders)
        assert window <= RATE_40 + burst + CHUNK


async def test_peer_limit_and_total_limit_together() -> None:
    clock = FakeClock()
    limiter = make(clock, total_mbps=MBPS_40, peer_mbps={"slow": 8.0}.get)
    slow = Sender(limiter, "slow", Priority.NORMAL, clock)
    fast = Sender(limiter, "fast", Priority.NORMAL, clock)
    await run_senders(clock, [slow, fast], 30.0)
    slow_rate = slow.bytes_between(5, 30) / 25
    fast_rate = fast.bytes_between(5, 30) / 25
    assert abs(slow_rate - 1_000_000) / 1_000_000 < 0.03  # 8 Mbit/s
    # A waiter blocked by its peer's bucket never holds the others back: fast gets the rest.
    assert abs(fast_rate - 4_000_000) / 4_000_000 < 0.03


async def test_backlogged_priorities_share_by_weight() -> None:
    clock = FakeClock()
    limiter = make(clock, total_mbps=MBPS_40)
    high = Sender(limiter, "a", Priority.HIGH, clock)
    normal = Sender(limiter, "b", Priority.NORMAL, clock)
    low = Sender(limiter, "c", Priority.LOW, clock)
    await run_senders(clock, [high, normal, low], 40.0)
    shares = [s.bytes_between(2, 40) for s in (high, normal, low)]
    total = sum(shares)
    assert abs(total / 38 - RATE_40) / RATE_40 < 0.03
    for share, weight in zip(shares, (4, 2, 1), strict=True):
        assert abs(share / total - weight / 7) < 0.02, shares


async def test_high_alone_gets_everything_and_shares_with_low_when_both_wait() -> None:
    clock = FakeClock()
    limiter = make(clock, total_mbps=MBPS_40)
    high = Sender(limiter, "a", Priority.HIGH, clock)
    low = Sender(limiter, "a", Priority.LOW, clock)
    high_task = asyncio.create_task(high.run())
    await clock.run_until(10.0)
    assert abs(high.bytes_between(1, 10) / 9 - RATE_40) / RATE_40 < 0.03
    low_task = asyncio.create_task(low.run())
    await clock.run_until(30.0)
    both = high.bytes_between(12, 30) + low.bytes_between(12, 30)
    assert abs(high.bytes_between(12, 30) / both - 0.8) < 0.02  # weights 4 : 1
    for task in (high_task, low_task):
        task.cancel()
    await asyncio.gather(high_task, low_task, return_exceptions=True)


async def test_high_priority_overtakes_a_large_low_backlog_within_a_chunk() -> None:
    clock = FakeClock()
    limiter = make(clock, total_mbps=MBPS_40)
    backlog = [Sender(limiter, f"npz-{i}", Priority.LOW, clock) for i in range(20)]
    tasks = [asyncio.create_task(s.run()) for s in backlog]
    await clock.run_until(10.0)
    assert limiter.waiting()["rate"] == 20
    model = Sender(limiter, "model-peer", Priority.HIGH, clock)
    arrived = clock()
    model_task = asyncio.create_task(model.run(total=5 * CHUNK))
    await clock.run_until(20.0)
    chunk_time = CHUNK / RATE_40
    first = model.granted[0][0] - arrived
    assert first <= 1.5 * chunk_time, f"first chunk after {first:.3f}s"
    # The whole model moves at its weighted share of the link (4 / 5), not 1 / 21 of it.
    done = model.granted[-1][0] - arrived
    assert done <= 5 * CHUNK / (0.8 * RATE_40) + 2 * chunk_time, f"model took {done:.2f}s"
    assert model_task.done()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_unlimited_never_waits() -> None:
    clock = FakeClock()
    limiter = make(clock, total_mbps=0, peer_mbps={"a": 0.0}.get)
    for _ in range(1000):
        await asyncio.wait_for(limiter.acquire("a", CHUNK, Priority.LOW), 1)
    assert clock() == 0.0
    assert limiter.chunk_bytes("a") == MAX_CHUNK_BYTES


def test_chunks_are_at_most_a_burst_of_the_tightest_bucket() -> None:
    clock = FakeClock()
    limiter = make(clock, total_mbps=1000.0, peer_mbps={"slow": 2.0, "tiny": 0.1}.get)
    assert limiter.chunk_bytes("fast") == MAX_CHUNK_BYTES
    assert limiter.chunk_bytes("slow") == 31_250  # half of 2 Mbit/s for 0.25 s
    assert limiter.chunk_bytes("tiny") == MIN_CHUNK_BYTES


async def test_paced_cuts_a_payload_and_a_stream_into_granted_chunks() -> None:
    clock = FakeClock()
    limiter = make(clock, total_mbps=MBPS_40, peer_mbps={"slow": 2.0}.get)
    payload = bytes(range(256)) * 4000  # ~1 MB

    async def collect(source: bytes | list[bytes]) -> list[bytes]:
        async def stream() -> object:
            for piece in source:  # type: ignore[union-attr]
                yield piece
        data = source if isinstance(source, bytes) else stream()
        return [c async for c in limiter.paced("slow", data, Priority.LOW)]  # type: ignore[arg-type]

    task = asyncio.create_task(collect(payload))
    await clock.run_until(10.0)
    chunks = task.result()
    assert b"".join(chunks) == payload
    assert max(len(c) for c in chunks) == 31_250
    pieces = [payload[:100_000], payload[100_000:100_001], payload[100_001:]]
    task = asyncio.create_task(collect(pieces))
    await clock.run_until(20.0)
    assert b"".join(task.result()) == payload


async def test_rate_of_a_slow_peer_paced_payload() -> None:
    clock = FakeClock()
    limiter = make(clock, peer_mbps={"slow": 2.0}.get)
    payload = b"x" * 1_000_000
    finished: list[float] = []

    async def send() -> None:
        async for _ in limiter.paced("slow", payload, Priority.NORMAL):
            pass
        finished.append(clock())

    task = asyncio.create_task(send())
    await clock.run_until(10.0)
    await task
    # (1 MB - the 62.5 kB burst) at 250 kB/s.
    assert finished[0] == pytest.approx((1_000_000 - 62_500) / 250_000, rel=0.02)


async def hold(limiter: BandwidthLimiter, peer: str, priority: Priority,
               release: asyncio.Event, peak: list[int]) -> None:
    async with limiter.transfer(peer, priority):
        peak.append(limiter.in_flight())
        await release.wait()


async def test_concurrency_caps_per_peer_and_in_total() -> None:
    clock = FakeClock()
    limiter = make(clock, max_transfers=5, max_transfers_per_peer=2)
    release, peak = asyncio.Event(), []
    tasks = [asyncio.create_task(hold(limiter, f"p{i % 4}", Priority.HIGH, release, peak))
             for i in range(12)]
    await clock.settle()
    assert limiter.in_flight() == 5
    assert all(limiter.in_flight(f"p{i}") <= 2 for i in range(4))
    assert limiter.waiting()["slot"] == 7
    release.set()
    await asyncio.gather(*tasks)
    assert max(peak) == 5
    assert len(peak) == 12
    assert limiter.in_flight() == 0


async def test_low_priority_leaves_slots_for_games_and_models() -> None:
    clock = FakeClock()
    limiter = make(clock, max_transfers=32, max_transfers_per_peer=4)
    release, peak = asyncio.Event(), []
    lows = [asyncio.create_task(hold(limiter, "t", Priority.LOW, release, peak)) for _ in range(6)]
    await clock.settle()
    assert limiter.in_flight("t") == slot_cap(4, Priority.LOW) == 2
    game = asyncio.create_task(hold(limiter, "t", Priority.NORMAL, release, peak))
    await clock.settle()
    assert limiter.in_flight("t") == 3
    model = asyncio.create_task(hold(limiter, "t", Priority.HIGH, release, peak))
    await clock.settle()
    assert limiter.in_flight("t") == 4  # the model starts although four lows still wait
    assert limiter.waiting()["slot"] == 4
    release.set()
    await asyncio.gather(*lows, game, model)
    assert limiter.in_flight() == 0


async def test_a_cancelled_slot_waiter_frees_its_place() -> None:
    clock = FakeClock()
    limiter = make(clock, max_transfers=1, max_transfers_per_peer=1)
    release, peak = asyncio.Event(), []
    holder = asyncio.create_task(hold(limiter, "a", Priority.HIGH, release, peak))
    waiter = asyncio.create_task(hold(limiter, "a", Priority.HIGH, release, peak))
    await clock.settle()
    assert limiter.waiting()["slot"] == 1
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert limiter.waiting()["slot"] == 0
    release.set()
    await holder
    assert limiter.in_flight() == 0
    assert peak == [1]


async def test_a_cancelled_rate_waiter_leaks_no_tokens() -> None:
    clock = FakeClock()
    limiter = make(clock, total_mbps=MBPS_40)
    keep = Sender(limiter, "a", Priority.LOW, clock)
    keep_task = asyncio.create_task(keep.run())
    await clock.run_until(1.0)
    doomed = [asyncio.create_task(limiter.acquire("b", CHUNK, Priority.HIGH)) for _ in range(5)]
    await clock.settle()
    for task in doomed:
        task.cancel()
    await asyncio.gather(*doomed, return_exceptions=True)
    assert limiter.waiting()["rate"] == 1  # only the survivor
    await clock.run_until(21.0)
    rate = keep.bytes_between(2, 21) / 19
    assert abs(rate - RATE_40) / RATE_40 < 0.03  # the survivor gets the whole rate
    keep_task.cancel()
    await asyncio.gather(keep_task, return_exceptions=True)


async def test_tokens_granted_to_a_waiter_cancelled_before_it_ran_come_back() -> None:
    clock = FakeClock()
    limiter = make(clock, total_mbps=MBPS_40)
    for _ in range(4):  # the initial quarter-second burst (1.25 MB) holds 4.8 chunks
        await limiter.acquire("a", CHUNK, Priority.NORMAL)
    assert clock() == 0.0
    waiter = asyncio.create_task(limiter.acquire("a", CHUNK, Priority.NORMAL))
    blocked = asyncio.create_task(limiter.acquire("a", CHUNK, Priority.NORMAL))
    await clock.settle()
    assert limiter.waiting()["rate"] == 2
    # Fire timers until the first waiter is granted, and cancel it before it can run.
    while limiter.waiting()["rate"] == 2:
        assert clock.fire_next(until=10.0)
    granted_at = clock()
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    await clock.settle()
    # Its chunk went back to the bucket, so the next waiter is granted at once.
    assert blocked.done()
    assert clock() == granted_at


async def test_metrics_callbacks_see_bytes_and_waits() -> None:
    clock = FakeClock()
    sent: list[tuple[str, Priority, int]] = []
    waits: list[tuple[Priority, str, float]] = []
    limiter = BandwidthLimiter(BandwidthLimits(total_mbps=MBPS_40), clock=clock,
                               call_later=clock.call_later,
                               on_sent=lambda *a: sent.append(a),
                               on_wait=lambda *a: waits.append(a))
    sender = Sender(limiter, "a", Priority.HIGH, clock)
    task = asyncio.create_task(sender.run(total=40 * CHUNK))
    await clock.run_until(5.0)
    await task
    assert sum(n for _, _, n in sent) == 40 * CHUNK
    assert {(p, pr) for p, pr, _ in sent} == {("a", Priority.HIGH)}
    waited = sum(s for pr, reason, s in waits if reason == "rate")
    assert waited == pytest.approx((40 * CHUNK - RATE_40 * 0.25) / RATE_40, rel=0.05)


@pytest.mark.parametrize("kwargs", [{"max_transfers": 0}, {"max_transfers_per_peer": 0},
                                    {"burst_seconds": 0}])
def test_limits_reject_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        BandwidthLimits(**kwargs)  # type: ignore[arg-type]


# -- limits from the inventory and the environment ---------------------------------------------

BANDWIDTH_INVENTORY = """\
hosts:
  selfplay-1: {role: gpu_selfplay, bandwidth_mbps: 1000}
  vast-4090-7: {role: gpu_selfplay, bandwidth_mbps: 250}
  vast-gh200-1: {role: gpu_training_primary}
  lambda-gh200-a: {role: gpu_training_primary, bandwidth_mbps: 400}
  nebius-h100-1: {role: gpu_training_primary, bandwidth_mbps: 0}
auto_sync:
  bandwidth_limit_mbps: 100
  host_bandwidth_overrides:
    "vast-*": 50
    "vast-gh200-*": 80
    "lambda-gh200-a": 0
"""


def load_bw(tmp_path: Path, text: str = BANDWIDTH_INVENTORY, **env: str) -> Settings:
    path = tmp_path / "distributed_hosts.yaml"
    path.write_text(text)
    return load_settings({"RINGRIFT_CLUSTER_CONFIG": str(path),
                          "RINGRIFT_NODE_ID": "selfplay-1", **env}, cwd=tmp_path)


@pytest.mark.parametrize(("name", "expected"), [
    ("vast-gh200-1", "vast-gh200-*"),  # more literal characters beat vast-*
    ("vast-4090-7", "vast-*"),
    ("vast-a", "vast-?"),  # fewer * beat vast-* at equal literals
    ("lambda-1", "lambda-1"),  # the exact name beats any glob
    ("nebius-2", None),
])
def test_most_specific_override_wins(name: str, expected: str | None) -> None:
    patterns = ["*-1", "vast-*", "vast-?", "vast-gh200-*", "lambda-1", "lambda-*"]
    assert most_specific_pattern(name, patterns) == expected


def test_equal_ranks_go_to_the_first_in_the_file() -> None:
    assert most_specific_pattern("ab", ["a*", "*b"]) == "a*"
    assert most_specific_pattern("ab", ["*b", "a*"]) == "*b"


def test_peer_and_total_limits_from_the_inventory(tmp_path: Path) -> None:
    s = load_bw(tmp_path)
    peer = s.bandwidth_limits.peer_mbps
    assert peer("vast-4090-7") == 50.0  # the override beats the host's own 250
    assert peer("vast-gh200-1") == 80.0
    assert peer("lambda-gh200-a") is None  # an override of 0: no limit, whatever the host says
    assert peer("nebius-h100-1") is None  # bandwidth_mbps 0: no limit
    assert peer("selfplay-1") == 1000.0
    assert peer("vast-new") == 50.0  # not a host yet, but the glob covers it
    assert s.bandwidth_limit_mbps == 100.0  # auto_sync's total, under this host's 1000
    assert (s.max_transfers, s.max_transfers_per_peer) == (32, 4)


def test_the_node_link_caps_the_total_and_env_replaces_it(tmp_path: Path) -> None:
    slow_link = BANDWIDTH_INVENTORY.replace("bandwidth_mbps: 1000", "bandwidth_mbps: 20")
    assert load_bw(tmp_path, slow_link).bandwidth_limit_mbps == 20.0
    assert load_bw(tmp_path, RINGRIFT_BANDWIDTH_LIMIT_MBPS="400").bandwidth_limit_mbps == 400.0
    assert load_bw(tmp_path, RINGRIFT_BANDWIDTH_LIMIT_MBPS="0").bandwidth_limit_mbps is None
    unset = BANDWIDTH_INVENTORY.replace("  bandwidth_limit_mbps: 100\n", "").replace(
        "bandwidth_mbps: 1000", "bandwidth_mbps: 0")
    assert load_bw(tmp_path, unset).bandwidth_limit_mbps is None
    s = load_bw(tmp_path, RINGRIFT_MAX_TRANSFERS="3", RINGRIFT_MAX_TRANSFERS_PER_PEER="2")
    assert (s.bandwidth_limits.max_transfers, s.bandwidth_limits.max_transfers_per_peer) == (3, 2)
    assert load_bw(tmp_path, RINGRIFT_MAX_TRANSFERS="2").max_transfers_per_peer == 2


@pytest.mark.parametrize(("env", "expected"), [
    ({"RINGRIFT_BANDWIDTH_LIMIT_MBPS": "fast"}, "RINGRIFT_BANDWIDTH_LIMIT_MBPS = 'fast' is not a number"),
    ({"RINGRIFT_BANDWIDTH_LIMIT_MBPS": "-5"}, "RINGRIFT_BANDWIDTH_LIMIT_MBPS = '-5' is out of range; "
                                              "use a number >= 0"),
    ({"RINGRIFT_MAX_TRANSFERS": "0"}, "RINGRIFT_MAX_TRANSFERS = '0' is out of range; use an integer >= 1"),
    ({"RINGRIFT_MAX_TRANSFERS": "8", "RINGRIFT_MAX_TRANSFERS_PER_PEER": "9"},
     "RINGRIFT_MAX_TRANSFERS_PER_PEER = '9' is out of range; use an integer 1-8"),
])
def test_bad_env_values_name_the_variable(tmp_path: Path, env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_bw(tmp_path, **env)


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("bandwidth_limit_mbps: 100", "bandwidth_limit_mbps: -1",
     "auto_sync.bandwidth_limit_mbps = -1 is not allowed; use a number >= 0 (0: no limit)"),
    ('"vast-*": 50', '"vast-*": -50', "auto_sync.host_bandwidth_overrides = "),
    ('"vast-*": 50', '"vast-*": lots', "to Mbit/s >= 0 (0: no limit); e.g. \"vast-*\": 50"),
    ("{role: gpu_selfplay, bandwidth_mbps: 250}", "{role: gpu_selfplay, bandwidth_mbps: x}",
     "hosts.vast-4090-7.bandwidth_mbps = 'x' is not allowed; use a number >= 0 (0: no limit)"),
])
def test_bad_inventory_values_name_the_field(tmp_path: Path, old: str, new: str,
                                             expected: str) -> None:
    assert old in BANDWIDTH_INVENTORY
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_bw(tmp_path, BANDWIDTH_INVENTORY.replace(old, new))


# -- random traffic: the limits hold at every instant and nobody is left waiting ---------------


@pytest.mark.parametrize("seed", range(6))
async def test_random_arrivals_and_cancellations_keep_every_limit(seed: int) -> None:
    rng = random.Random(seed)
    clock = FakeClock()
    peer_mbps = {"a": 8.0, "b": 16.0, "c": None}
    limiter = make(clock, total_mbps=20.0, peer_mbps=peer_mbps.get, max_transfers=4,
                   max_transfers_per_peer=2)
    grants: list[tuple[float, str, int]] = []
    peak_in_flight = 0

    async def transfer(peer: str, priority: Priority, size: int, delay: float) -> None:
        nonlocal peak_in_flight
        await clock_sleep(clock, delay)
        async with limiter.transfer(peer, priority):
            peak_in_flight = max(peak_in_flight, limiter.in_flight())
            assert limiter.in_flight(peer) <= 2
            async for chunk in limiter.paced(peer, bytes(size), priority):
                grants.append((clock(), peer, len(chunk)))

    tasks = [asyncio.create_task(transfer(rng.choice("abc"), rng.choice(list(Priority)),
                                          rng.randrange(1, 3_000_000), rng.uniform(0, 5)))
             for _ in range(25)]
    doomed = rng.sample(tasks, 6)
    for when, task in zip(sorted(rng.uniform(0, 8) for _ in doomed), doomed, strict=True):
        await clock.run_until(when)
        task.cancel()
    await clock.run_until(200.0)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(r is None or isinstance(r, asyncio.CancelledError) for r in results), results
    assert sum(r is None for r in results) >= 19  # all but the cancelled ones finished
    assert limiter.waiting() == {"rate": 0, "slot": 0}
    assert limiter.in_flight() == 0
    assert peak_in_flight <= 4
    assert clock.fired <= 2 * len(grants) + 100  # timers fire for grants, never spin
    # At every grant, bytes so far never exceed a burst plus the rate times the time elapsed.
    for name, mbps in [("total", 20.0), *peer_mbps.items()]:
        if mbps is None:
            continue
        rate = mbps * 125_000
        sent = 0
        for when, peer, size in grants:
            if name in ("total", peer):
                sent += size
                assert sent <= rate * 0.25 + rate * when + 1, (name, when, sent)


async def clock_sleep(clock: FakeClock, delay: float) -> None:
    """Sleep on the fake clock."""
    woken = asyncio.get_running_loop().create_future()
    clock.call_later(delay, lambda: woken.done() or woken.set_result(None))
    await woken


def test_the_policy_module_imports_nothing_but_the_standard_library() -> None:
    source = Path(bandwidth_module.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported
