"""Abandoned downloads: AbandonPolicy's decisions (fake clock) and FileJanitor on real files and
a real journal: start-up leftovers, drops while running, and a crash between the drop's steps."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ringsync.daemons import file_cleanup
from ringsync.daemons.file_cleanup import FileJanitor
from ringsync.files.abandon import AbandonPolicy
from ringsync.files.kinds import FileKind, part_name
from ringsync.files.manifest import FileManifest, Transfer
from ringsync.files.plan import FetchJob, IndexEntry, Source
from ringsync.files.relay import MULTI_SOURCE
from ringsync.ops.metrics import Metrics
from ringsync.transport.rsync import PARTIAL_DIR, STAGING_DIR
from tests.unit.clock import FakeClock

M, T = FileKind.MODELS, FileKind.TRAINING_DATA
GRACE = 100.0
OLD, NEW = "a" * 64, "b" * 64


def transfer(relpath: str = "m.pth", digest: str = OLD, source: str = "p1", kind: FileKind = M,
             size: int = 1000) -> Transfer:
    return Transfer(kind, relpath, digest, size, 1, 0, source)


def offer(relpath: str = "m.pth", digest: str = OLD, kind: FileKind = M) -> IndexEntry:
    return IndexEntry(kind, relpath, 1000, 1, digest)


def dropped(policy: AbandonPolicy, indexes: dict[str, list[IndexEntry]], transfers: list[Transfer], *,
            polled: tuple[str, ...] = ("p1", "p2"), planned: dict | None = None,
            busy: frozenset = frozenset()) -> list[tuple[str, str]]:
    """One poll round, as the daemon's sweep runs it: the relpaths dropped and why."""
    return [(a.transfer.relpath, a.reason)
            for a in policy.decide(polled, indexes, transfers, planned or {}, busy)]


# -- the decisions -----------------------------------------------------------------------------

def test_content_no_peer_offers_is_abandoned_only_after_the_grace_continuously() -> None:
    clock = FakeClock()
    policy, t = AbandonPolicy(GRACE, clock), [transfer()]
    assert dropped(policy, {"p1": [offer()], "p2": []}, t) == []
    assert dropped(policy, {"p1": [], "p2": []}, t) == []  # the source removed it
    clock.advance(GRACE - 1)
    assert dropped(policy, {"p1": [], "p2": []}, t) == []
    assert dropped(policy, {"p1": [], "p2": [offer()]}, t) == []  # offered again: clock reset
    clock.advance(GRACE - 1)
    assert dropped(policy, {"p1": [], "p2": []}, t) == []  # absence timed from here
    clock.advance(GRACE)
    assert dropped(policy, {"p1": [], "p2": []}, t) == []
    clock.advance(1)
    assert dropped(policy, {"p1": [], "p2": []}, t) == [("m.pth", "unoffered")]


def test_the_same_path_with_other_content_does_not_count_as_offered() -> None:
    clock = FakeClock()
    policy = AbandonPolicy(GRACE, clock)
    indexes = {"p1": [offer(digest=NEW), offer("other.pth", OLD)], "p2": []}
    assert dropped(policy, indexes, [transfer()]) == []
    clock.advance(GRACE + 1)
    assert dropped(policy, indexes, [transfer()]) == [("m.pth", "unoffered")]


def test_an_unreadable_peer_counts_as_still_offering_what_it_last_offered() -> None:
    clock = FakeClock()
    policy, t = AbandonPolicy(GRACE, clock), [transfer()]
    assert dropped(policy, {"p1": [offer()], "p2": []}, t) == []
    for _ in range(10):  # a network cut of ten grace periods: p1's index cannot be read
        clock.advance(GRACE)
        assert dropped(policy, {"p2": []}, t) == []
    assert dropped(policy, {"p1": [], "p2": []}, t) == []  # readable again, without it
    clock.advance(GRACE + 1)
    assert dropped(policy, {"p2": []}, t) == [("m.pth", "unoffered")]  # as it last said


def test_what_a_peer_offered_for_a_planned_fetch_is_remembered_before_its_row_exists() -> None:
    clock = FakeClock()
    policy = AbandonPolicy(GRACE, clock)
    planned = {(M, "m.pth"): OLD}
    assert dropped(policy, {"p1": [offer(), offer("x.pth")], "p2": []}, [], planned=planned) == []
    for _ in range(3):  # the fetch started, then p1 became unreachable
        clock.advance(GRACE)
        assert dropped(policy, {"p2": []}, [transfer()]) == []
    # Only what a journal row or a plan needs is remembered: not every file of every peer.
    assert policy._offers == {"p1": frozenset({(M, "m.pth", OLD)}), "p2": frozenset()}


def test_a_peer_not_read_since_start_holds_back_what_it_was_the_source_of() -> None:
    clock = FakeClock()
    policy = AbandonPolicy(GRACE, clock)
    from_p2, aria2 = transfer("b.pth", source="p2"), transfer("c.pth", source=MULTI_SOURCE)
    journal = [transfer("a.pth"), from_p2, aria2]
    assert dropped(policy, {"p1": []}, journal) == []  # p2 unreachable since the start
    clock.advance(GRACE + 1)
    assert dropped(policy, {"p1": []}, journal) == [("a.pth", "unoffered")]
    assert dropped(policy, {"p1": [], "p2": []}, [from_p2, aria2]) == []
    clock.advance(GRACE + 1)
    assert dropped(policy, {"p1": []}, [from_p2, aria2]) == [("b.pth", "unoffered"),
                                                              ("c.pth", "unoffered")]


def test_a_peer_that_left_the_inventory_no_longer_offers_anything() -> None:
    clock = FakeClock()
    policy = AbandonPolicy(GRACE, clock)
    assert dropped(policy, {"p1": [offer()]}, [transfer()], polled=("p1",)) == []
    assert dropped(policy, {}, [transfer()], polled=()) == []  # absence timed from here
    clock.advance(GRACE + 1)
    assert dropped(policy, {}, [transfer()], polled=()) == [("m.pth", "unoffered")]


def test_a_newer_version_planned_supersedes_at_once_and_busy_paths_are_never_dropped() -> None:
    policy = AbandonPolicy(GRACE, FakeClock())
    indexes, planned = {"p1": [offer(digest=NEW)], "p2": []}, {(M, "m.pth"): NEW}
    assert dropped(policy, indexes, [transfer()], planned=planned, busy=frozenset({(M, "m.pth")})) == []
    assert dropped(policy, indexes, [transfer()], planned=planned) == [("m.pth", "superseded")]
    assert dropped(policy, indexes, [transfer(digest=NEW)], planned=planned) == []  # its own row


# -- on disk -----------------------------------------------------------------------------------

@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[dict[FileKind, Path], FileManifest, Metrics]]:
    dirs = {M: tmp_path / "models", T: tmp_path / "training"}
    for d in dirs.values():
        d.mkdir()
    manifest = FileManifest(tmp_path / "state" / "manifest.db")
    yield dirs, manifest, Metrics()
    manifest.close()


def leave(root: Path, relpath: str, nbytes: int = 100, *, control: bool = True) -> tuple[Path, Path]:
    """A download's part (and aria2 control file) as a killed run leaves them."""
    final = root / relpath
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(part_name(final.name))
    part.write_bytes(b"p" * nbytes)
    ctl = part.with_name(part.name + ".aria2")
    if control:
        ctl.write_bytes(b"c" * 10)
    return part, ctl


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_at_start_what_no_journal_entry_resumes_is_removed_and_the_rest_kept(node, tmp_path: Path) -> None:
    dirs, manifest, metrics = node
    live = leave(dirs[M], "sub/live.pth")
    orphan = leave(dirs[M], "sub/orphan.pth", 300)
    npz = leave(dirs[T], "hex8_2p.npz", 5000, control=False)
    lone_control = dirs[T] / f"{part_name('gone.npz')}.aria2"
    lone_control.write_bytes(b"c")
    manifest.save_transfer(transfer("sub/live.pth", source=MULTI_SOURCE))
    manifest.save_transfer(transfer("orphan.pth", kind=T))  # same name, other kind: no cover
    # Never followed: a symlink named like a part, and a symlinked directory holding one.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.pth").write_bytes(b"keep")
    elsewhere = leave(outside, "x.pth")
    os.symlink(outside / "precious.pth", dirs[M] / part_name("link.pth"))
    os.symlink(outside, dirs[M] / "linked_dir")
    # rsync staging: a peer still used (resumes from it), one gone, one a symlink out.
    kept_rsync = dirs[M] / STAGING_DIR / "p1" / PARTIAL_DIR / "a.pth"
    gone_rsync = dirs[T] / STAGING_DIR / "old-host" / "sub" / PARTIAL_DIR / "big.npz"
    for p in (kept_rsync, gone_rsync):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"r" * 700)
    os.symlink(outside, dirs[M] / STAGING_DIR / "evil")

    FileJanitor(dirs, metrics, GRACE).at_start(manifest, lambda peer: peer == "p1")

    assert all(p.exists() for p in live)
    assert kept_rsync.exists()
    assert not any(p.exists() for p in (*orphan, npz[0], lone_control))
    assert not (dirs[T] / STAGING_DIR / "old-host").exists()
    assert all(p.exists() for p in elsewhere)
    assert (outside / "precious.pth").read_bytes() == b"keep"
    assert (dirs[M] / part_name("link.pth")).is_symlink()
    assert (dirs[M] / STAGING_DIR / "evil").is_symlink()
    assert manifest.transfer(M, "sub/live.pth") is not None
    assert metric(metrics, "ringsync_file_transfers_abandoned_total", kind="models", reason="leftover") == 2
    assert metric(metrics, "ringsync_file_transfers_abandoned_total", kind="training_data",
                  reason="leftover") == 3
    assert metric(metrics, "ringsync_file_abandoned_bytes_total", kind="training_data") == 5000 + 1 + 700


def test_an_rsync_staging_dir_that_is_a_symlink_out_is_not_followed(node, tmp_path: Path) -> None:
    dirs, manifest, metrics = node
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "old-host").mkdir(parents=True)
    (elsewhere / "old-host" / "precious").write_bytes(b"keep")
    os.symlink(elsewhere, dirs[M] / STAGING_DIR)
    FileJanitor(dirs, metrics, GRACE).at_start(manifest, lambda peer: False)
    assert (elsewhere / "old-host" / "precious").read_bytes() == b"keep"
    assert (dirs[M] / STAGING_DIR).is_symlink()


def test_a_sweep_drops_row_part_and_control_and_says_why(node, caplog) -> None:
    dirs, manifest, metrics = node
    clock = FakeClock()
    janitor = FileJanitor(dirs, metrics, GRACE, clock)
    gone, kept, old = leave(dirs[T], "a.npz", 4000), leave(dirs[T], "b.npz"), leave(dirs[M], "m.pth")
    for t in (transfer("a.npz", kind=T, size=9000), transfer("b.npz", kind=T), transfer()):
        manifest.save_transfer(t)
    job = FetchJob(offer(digest=NEW), (Source("p1", M, "m.pth"),))
    janitor.sweep(manifest, ["p1"], {"p1": [offer("b.npz", kind=T), offer(digest=NEW)]}, [job], set())
    clock.advance(GRACE + 1)
    caplog.set_level("INFO", logger=file_cleanup.__name__)
    janitor.sweep(manifest, ["p1"], {"p1": [offer("b.npz", kind=T)]}, [], set())

    assert {(t.kind, t.relpath) for t in manifest.transfers()} == {(T, "b.npz")}
    assert not any(p.exists() for p in (*gone, *old))
    assert all(p.exists() for p in kept)
    assert "abandoned the download of training_data/a.npz: 4010 of 9000 bytes discarded; no peer " \
           "has offered its content for 101 s" in caplog.text
    assert metric(metrics, "ringsync_file_transfers_abandoned_total", kind="models",
                  reason="superseded") == 1
    assert metric(metrics, "ringsync_file_transfers_abandoned_total", kind="training_data",
                  reason="unoffered") == 1


def test_a_row_taken_over_by_a_new_version_keeps_its_part(node) -> None:
    dirs, manifest, metrics = node
    part, ctl = leave(dirs[M], "m.pth")
    janitor = FileJanitor(dirs, metrics, GRACE)
    manifest.save_transfer(transfer(digest=NEW))  # a fetch of the new version owns the part now
    janitor.drop(manifest, janitor.policy.decide([], {}, [transfer()], {(M, "m.pth"): NEW}, set())[0])
    assert part.exists()
    assert ctl.exists()
    assert manifest.transfer(M, "m.pth") == transfer(digest=NEW)


class Killed(BaseException):
    """kill -9 at a step boundary: nothing after it runs, not even cleanup handlers."""


@pytest.mark.parametrize("crash_after", [0, 1, 2, 3])
def test_killed_between_the_steps_of_a_drop_the_next_start_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_after: int) -> None:
    dirs, db = {M: tmp_path / "models"}, tmp_path / "manifest.db"
    part, ctl = leave(dirs[M], "m.pth")
    manifest = FileManifest(db)
    manifest.save_transfer(transfer())
    steps = 0
    real_drop, real_remove = FileManifest.drop_transfer, file_cleanup._remove

    def step(fn: Callable[..., object]) -> Callable[..., object]:
        def run(*args: object) -> object:
            nonlocal steps
            if steps == crash_after:
                raise Killed
            steps += 1
            result = fn(*args)
            # At every step boundary: a live row still has its part.
            assert manifest.transfer(M, "m.pth") is None or part.exists()
            return result
        return run

    monkeypatch.setattr(FileManifest, "drop_transfer", step(real_drop))
    monkeypatch.setattr(file_cleanup, "_remove", step(real_remove))
    janitor = FileJanitor(dirs, Metrics(), GRACE)
    abandoned = janitor.policy.decide([], {}, [transfer()], {(M, "m.pth"): NEW}, set())
    try:
        with pytest.raises(Killed) if crash_after < 3 else contextlib.nullcontext():
            janitor.drop(manifest, abandoned[0])
        assert steps == min(crash_after, 3)
    finally:
        monkeypatch.undo()
        manifest.close()

    restarted = FileManifest(db)  # a fresh journal connection and a fresh janitor
    try:
        FileJanitor(dirs, Metrics(), GRACE).at_start(restarted, lambda peer: True)
        row = restarted.transfer(M, "m.pth")
    finally:
        restarted.close()
    if crash_after == 0:  # killed before the row went: the download is still live, and kept
        assert row == transfer()
        assert part.exists()
        assert ctl.exists()
    else:
        assert row is None
        assert not part.exists()
        assert not ctl.exists()


def test_a_part_that_cannot_be_removed_now_is_left_to_the_next_start(
        node, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    dirs, manifest, metrics = node
    part, ctl = leave(dirs[M], "m.pth")
    manifest.save_transfer(transfer())
    janitor = FileJanitor(dirs, metrics, GRACE)
    real_unlink = Path.unlink

    def read_only(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(13, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "unlink", read_only)
    janitor.sweep(manifest, ["p1"], {"p1": [offer(digest=NEW)]}, [FetchJob(offer(digest=NEW), ())], set())
    assert manifest.transfer(M, "m.pth") is None  # the loop goes on; the row is gone
    assert "cannot remove" in caplog.text
    assert part.exists()
    monkeypatch.setattr(Path, "unlink", real_unlink)
    janitor.at_start(manifest, lambda peer: True)
    assert not part.exists()
    assert not ctl.exists()


def test_a_drop_never_removes_through_a_directory_symlinked_out(node, tmp_path: Path) -> None:
    dirs, manifest, metrics = node
    outside = tmp_path / "outside"
    part, ctl = leave(outside, "m.pth")
    os.symlink(outside, dirs[M] / "sub")
    manifest.save_transfer(transfer("sub/m.pth"))
    janitor = FileJanitor(dirs, metrics, GRACE)
    janitor.drop(manifest, janitor.policy.decide([], {}, [transfer("sub/m.pth")],
                                                 {(M, "sub/m.pth"): NEW}, set())[0])
    assert manifest.transfer(M, "sub/m.pth") is None
    assert part.exists()
    assert ctl.exists()


def test_a_drop_removes_only_files_never_a_directory_at_a_part_path(node) -> None:
    """Whatever sits at a part's path, a drop removes regular files only: a directory that
    happens to carry a part's name (someone's, not ours) is left whole."""
    dirs, manifest, metrics = node
    squatter = dirs[M] / part_name("m.pth")
    squatter.mkdir(parents=True)
    (squatter / "keep").write_bytes(b"not ours")
    manifest.save_transfer(transfer())
    janitor = FileJanitor(dirs, metrics, GRACE)
    janitor.drop(manifest, janitor.policy.decide([], {}, [transfer()], {(M, "m.pth"): NEW}, set())[0])
    assert manifest.transfer(M, "m.pth") is None
    assert (squatter / "keep").read_bytes() == b"not ours"
