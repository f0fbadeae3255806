"""The package's public names: what DESIGN.md promises is importable from ringsync."""

from __future__ import annotations

import ringsync


def test_all_names_resolve() -> None:
    for name in ringsync.__all__:
        assert getattr(ringsync, name) is not None, name


def test_design_names_are_public() -> None:
    for name in ("DaemonManager", "DaemonType", "AutoSyncDaemon", "DataManifest", "SyncRouter"):
        assert name in ringsync.__all__


def test_all_is_sorted_and_unique() -> None:
    assert list(ringsync.__all__) == sorted(set(ringsync.__all__))
