"""MemoryTrimmer: when freed transfer buffers go back to the OS (with a counting trim)."""

from __future__ import annotations

import asyncio

from ringsync.ops.memory import MemoryTrimmer


class CountingTrim:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, pad: int) -> int:
        self.calls += 1
        return 1


def test_trims_every_n_bytes() -> None:
    trim = CountingTrim()
    trimmer = MemoryTrimmer(every=100, trim=trim)
    trimmer.note(60)
    assert trim.calls == 0
    trimmer.note(60)
    assert trim.calls == 1
    trimmer.note(60)
    assert trim.calls == 1  # the count restarted at the trim


async def test_idle_trim_waits_until_the_last_buffers_are_released() -> None:
    trim = CountingTrim()
    trimmer = MemoryTrimmer(every=10**9, trim=trim, idle_delay=0.05)
    trimmer.note(13_000_000)
    trimmer.idle()
    assert trim.calls == 0  # the caller still holds the burst's last buffers
    await asyncio.sleep(0.2)
    assert trim.calls == 1


async def test_idle_calls_in_a_row_give_one_trim_and_none_without_transfers() -> None:
    trim = CountingTrim()
    trimmer = MemoryTrimmer(every=10**9, trim=trim, idle_delay=0.05)
    trimmer.idle()
    await asyncio.sleep(0.1)
    assert trim.calls == 0  # nothing moved: nothing to give back
    trimmer.note(1)
    for _ in range(5):
        trimmer.idle()
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    assert trim.calls == 1
    trimmer.idle()  # no transfer since that trim
    await asyncio.sleep(0.1)
    assert trim.calls == 1


def test_idle_without_an_event_loop_trims_at_once() -> None:
    trim = CountingTrim()
    trimmer = MemoryTrimmer(trim=trim)
    trimmer.note(1)
    trimmer.idle()
    assert trim.calls == 1
