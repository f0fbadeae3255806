"""The data server's connection admission and rate-limited warnings (no I/O)."""

from __future__ import annotations

import logging

import pytest

from ringsync.transport.http.guard import ConnectionGuard, RateLimitedLog, connection_cap


def test_connections_are_capped_per_address_and_in_total() -> None:
    guard = ConnectionGuard(max_total=3, max_per_address=2)
    assert [guard.admit("a"), guard.admit("a"), guard.admit("a")] == [None, None, "address_limit"]
    assert guard.admit("b") is None
    assert guard.admit("c") == "total_limit"
    guard.release("a")
    assert guard.admit("c") is None
    assert guard.open == 3
    for address in ("a", "b", "c"):
        guard.release(address)
    assert guard.open == 0
    assert [guard.admit("a"), guard.admit("a")] == [None, None]


def test_per_address_cap_never_exceeds_the_total() -> None:
    assert ConnectionGuard(max_total=4, max_per_address=64).max_per_address == 4


def test_the_connection_cap_leaves_file_descriptors_free() -> None:
    assert connection_cap(1024, 1_048_576) == 1024
    assert connection_cap(1024, 1024) == 1024 - 256
    assert connection_cap(1024, 100) == 1


def test_warnings_are_rate_limited_per_kind_and_count_what_they_held_back(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    warnings = RateLimitedLog(logging.getLogger("test.guard"), 60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.guard"):
        for _ in range(5):
            warnings.warning("shed", "shed %s", "x")
        warnings.warning("malformed", "malformed %s", "y")
        now[0] = 61.0
        warnings.warning("shed", "shed %s", "z")
    assert caplog.messages == ["shed x", "malformed y",
                               "shed z (and 4 more like it in the last 61 s)"]
