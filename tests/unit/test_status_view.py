"""`ringsync status`: the table, and the problems behind a daemon that is not healthy."""

from __future__ import annotations

from ringsync.status_view import render


def test_a_degraded_daemon_says_why_below_the_table() -> None:
    statuses = [
        {"node": "selfplay-1", "role": "gpu_selfplay", "received_total": 0,
         "daemons": {"auto_sync": {"state": "degraded",
                                   "detail": "source games/hex8_2p.db unreadable (corrupt): ..."},
                     "data_server": {"state": "healthy", "detail": ""}},
         "manifest": {"pending": {"train-1": 3}}, "routing": {"targets": ["train-1"]}},
        {"node": "train-1", "error": "unreachable: connection refused"},
    ]
    text = render(statuses)
    assert "auto_sync=degraded" in text
    assert "problems:\n  selfplay-1 auto_sync: source games/hex8_2p.db unreadable" in text
    assert "data_server:" not in text
    assert "unreachable: connection refused" in text


def test_all_healthy_shows_no_problems_section() -> None:
    statuses = [{"node": "n", "role": "r", "daemons": {"auto_sync": {"state": "healthy",
                                                                     "detail": ""}}}]
    assert "problems:" not in render(statuses)


def test_every_breaker_not_closed_is_listed_whatever_it_guards() -> None:
    circuit = {"peer": "train-1", "state": "open", "since": "2026-12-07 05:31:02 UTC", "seconds": 42}
    statuses = [{"node": "selfplay-1", "role": "gpu_selfplay",
                 "daemons": {"file_sync": {"state": "healthy", "detail": ""}},
                 "circuits": [{**circuit, "transport": "rsync"},
                              {**circuit, "transport": "aria2", "state": "half_open"}]},
                {"node": "train-1", "role": "gpu_training_primary", "circuits": []}]
    text = render(statuses)
    assert ("circuits not closed:\n"
            "  selfplay-1 -> train-1: circuit open over rsync since 2026-12-07 05:31:02 UTC (42s)\n"
            "  selfplay-1 -> train-1: circuit half_open over aria2 since ") in text
    assert "circuits" not in render([statuses[1]])
