"""TreeWatches: the bounded recursive inotify watch the game and file watchers share."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from asyncinotify import Inotify, Mask

from ringsync.ops.watchtree import TreeWatches


def make_tree(root: Path, n: int) -> None:
    for i in range(n):
        (root / f"job_{i:03d}" / "sub").mkdir(parents=True)
    (root / ".hidden" / "deep").mkdir(parents=True)


def test_watches_every_wanted_directory_below_the_top(tmp_path: Path) -> None:
    make_tree(tmp_path, 3)
    with Inotify() as inotify:
        watches = TreeWatches(inotify, Mask.CREATE, limit=100, unwatched="scanned later",
                              wanted=lambda d: not d.name.startswith("."))
        watches.add_tree(tmp_path)
        watched = {Path(w.path) for w in inotify.watches}
    assert watches.count == 7  # the top, 3 job dirs, 3 subdirs; not .hidden nor below it
    assert tmp_path / "job_002" / "sub" in watched
    assert not any(".hidden" in p.parts for p in watched)


def test_past_the_limit_it_stops_and_says_so_once(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    make_tree(tmp_path, 10)
    with Inotify() as inotify, caplog.at_level(logging.WARNING):
        watches = TreeWatches(inotify, Mask.CREATE, limit=5, unwatched="files there ship after "
                              "the settle time")
        watches.add_tree(tmp_path)
        watches.add_tree(tmp_path / "job_009")  # more new directories: no second warning
        assert len(inotify.watches) == 5
    assert watches.count == 5
    warnings = [r.getMessage() for r in caplog.records if "the limit" in r.getMessage()]
    assert len(warnings) == 1
    assert "files there ship after the settle time" in warnings[0]
