"""The project's one backoff: exponential delays by tenacity, jitter and pacing on an
injectable clock, so that tests run on a fake one."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import tenacity

__all__ = ["Backoff", "Clock", "RetryPacer"]

Clock = Callable[[], float]
K = TypeVar("K", bound=Hashable)


class Backoff:
    """Delay before attempt ``n`` after ``n - 1`` failures: ``initial`` doubling up to
    ``maximum``, each spread by ±``jitter`` (a fraction) and never above ``maximum``.

    Jitter keeps a fleet that failed together (a peer restarting) from retrying in step;
    its randomness is injectable (``rng``) so that tests are deterministic.
    """

    def __init__(self, initial: float, maximum: float, *, jitter: float = 0.0,
                 rng: random.Random | None = None) -> None:
        if initial < 0 or maximum < initial or not 0 <= jitter < 1:
            raise ValueError(f"backoff needs 0 <= initial <= maximum and 0 <= jitter < 1 "
                             f"(got initial={initial}, maximum={maximum}, jitter={jitter})")
        self.initial, self.maximum, self.jitter = initial, maximum, jitter
        self._rng = rng or random.Random()
        self._wait = tenacity.wait_exponential(multiplier=initial, max=maximum)
        self._retrying = tenacity.Retrying(wait=self._wait)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt`` (1 after the first failure)."""
        state = tenacity.RetryCallState(self._retrying, fn=None, args=(), kwargs={})
        state.attempt_number = max(1, attempt)
        base = self._wait(state)
        if self.jitter:
            base *= 1 + self._rng.uniform(-self.jitter, self.jitter)
        return min(self.maximum, base)


class RetryPacer(Generic[K]):
    """When each key (a peer, a (peer, transport) pair) may be tried again.

    Each key backs off on its own, so one dead peer never delays the others.
    """

    def __init__(self, backoff: Backoff, *, clock: Clock = time.monotonic) -> None:
        self._backoff = backoff
        self._clock = clock
        self._failures: dict[K, int] = {}
        self._retry_at: dict[K, float] = {}

    def ready(self, key: K) -> bool:
        """Not backing off."""
        return self._clock() >= self._retry_at.get(key, 0.0)

    def retry_in(self, key: K) -> float:
        """Seconds until ``key`` may be tried again (0 when it may now)."""
        return max(0.0, self._retry_at.get(key, 0.0) - self._clock())

    def failed(self, key: K) -> float:
        """One more failure of ``key``: the seconds until it may be tried again."""
        failures = self._failures[key] = self._failures.get(key, 0) + 1
        delay = self._backoff.delay(failures)
        self._retry_at[key] = self._clock() + delay
        return delay

    def succeeded(self, key: K) -> None:
        """Pacing starts over at the next failure."""
        self._failures.pop(key, None)
        self._retry_at.pop(key, None)

    def failures(self, key: K) -> int:
        return self._failures.get(key, 0)
