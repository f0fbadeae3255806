"""The one backoff: tenacity's exponential delays, bounded jitter, pacing on a fake clock."""

from __future__ import annotations

import random

import pytest

from ringsync.policy.backoff import Backoff, RetryPacer
from tests.unit.clock import FakeClock


def test_delays_double_from_initial_up_to_the_maximum() -> None:
    backoff = Backoff(0.5, 4.0)
    assert [backoff.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_jitter_spreads_delays_within_its_fraction_and_never_past_the_cap() -> None:
    backoff = Backoff(1.0, 8.0, jitter=0.2, rng=random.Random(7))
    third = [backoff.delay(3) for _ in range(200)]
    assert all(3.2 <= d <= 4.8 for d in third)
    assert len(set(third)) > 100  # really spread, not one value
    assert all(backoff.delay(10) <= 8.0 for _ in range(200))


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="initial"):
        Backoff(2.0, 1.0)
    with pytest.raises(ValueError, match="jitter"):
        Backoff(1.0, 2.0, jitter=1.5)


def test_each_key_is_paced_on_its_own_clock_and_starts_over_after_success() -> None:
    clock = FakeClock()
    pacer: RetryPacer[str] = RetryPacer(Backoff(1.0, 60.0), clock=clock)
    assert pacer.failed("a") == 1.0
    assert pacer.failed("a") == 2.0
    assert not pacer.ready("a")
    assert pacer.ready("b")
    clock.now += 1.9
    assert not pacer.ready("a")
    clock.now += 0.1
    assert pacer.ready("a")
    pacer.succeeded("a")
    assert pacer.failures("a") == 0
    assert pacer.failed("a") == 1.0
