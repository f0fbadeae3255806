"""Fixtures shared by the merge tests: a RingRift-style selfplay DB and a source reading it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ringsync.selfplay_sim import SelfplayWriter
from ringsync.store.gamesource import GameSource


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[SelfplayWriter]:
    with SelfplayWriter(tmp_path / "sp.db", moves_per_game=12, seed=3, extra_tables=True) as w:
        yield w


@pytest.fixture
def source(tmp_path: Path, writer: SelfplayWriter) -> Iterator[GameSource]:
    src = GameSource(tmp_path / "sp.db")
    yield src
    src.close()
