"""Which local model and training files are offered, and when (ringsync.files.scanner)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ringsync.files.hashing import hash_file
from ringsync.files.kinds import FileKind, is_shippable_name
from ringsync.files.manifest import FileManifest
from ringsync.files.scanner import FileScanner

SETTLE = 5.0


class Clock:
    """Monotonic and wall time under the test's control."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def manifest(tmp_path: Path) -> Iterator[FileManifest]:
    m = FileManifest(tmp_path / "state" / "files.db")
    yield m
    m.close()


@pytest.fixture
def dirs(tmp_path: Path) -> dict[FileKind, Path]:
    out = {FileKind.MODELS: tmp_path / "models", FileKind.TRAINING_DATA: tmp_path / "training"}
    for d in out.values():
        d.mkdir()
    return out


def scanner(dirs: dict[FileKind, Path], manifest: FileManifest, clock: Clock) -> FileScanner:
    return FileScanner(dirs, manifest, SETTLE, clock=clock, wall=clock)


def write(path: Path, data: bytes, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return path


def offered(manifest: FileManifest) -> dict[str, str]:
    return {r.relpath: r.hash or f"-> {r.link_target}" for r in manifest.records()}


@pytest.mark.parametrize(("kind", "name", "shipped"), [
    (FileKind.MODELS, "canonical_hex8_2p.pth", True),
    (FileKind.MODELS, "candidate_hex8_2p_v3.pt", True),
    (FileKind.MODELS, "model.onnx", True),
    (FileKind.MODELS, "ckpt.pth.tmp", False),
    (FileKind.MODELS, "canonical_hex8_2p.tmp", False),
    (FileKind.MODELS, "canonical_hex8_2p.pth.lock", False),
    (FileKind.MODELS, ".canonical_hex8_2p.pth.ringsync-part", False),
    (FileKind.MODELS, "hex8_2p.npz", False),
    (FileKind.MODELS, "notes.txt", False),
    (FileKind.TRAINING_DATA, "hex8_2p.npz", True),
    (FileKind.TRAINING_DATA, "tmpab12cd.npz", False),
    (FileKind.TRAINING_DATA, "hex8_2p.npz.archived_1767225600", False),
    (FileKind.TRAINING_DATA, "hex8_2p.npz.lock", False),
    (FileKind.TRAINING_DATA, ".hidden.npz", False),
    (FileKind.TRAINING_DATA, "model.pth", False),
])
def test_names(kind: FileKind, name: str, shipped: bool) -> None:
    assert is_shippable_name(kind, name) is shipped


def test_a_file_is_offered_only_once_it_stayed_unchanged_for_the_settle_time(
        dirs: dict[FileKind, Path], manifest: FileManifest) -> None:
    clock = Clock()
    scan = scanner(dirs, manifest, clock)
    model = write(dirs[FileKind.MODELS] / "canonical_hex8_2p.pth", b"a" * 1000, clock.now)
    assert scan.scan().waiting == 1
    assert offered(manifest) == {}
    clock.now += SETTLE - 1
    with model.open("ab") as f:  # still being written: the window starts again
        f.write(b"b" * 1000)
    os.utime(model, (clock.now, clock.now))
    scan.scan()
    clock.now += SETTLE - 1
    assert scan.scan().waiting == 1
    assert offered(manifest) == {}
    clock.now += 1
    result = scan.scan()
    assert [r.relpath for r in result.picked_up] == ["canonical_hex8_2p.pth"]
    assert offered(manifest) == {"canonical_hex8_2p.pth": hash_file(model)}
    assert scan.scan().picked_up == []  # hashed once


def test_a_file_whose_last_write_is_older_than_the_settle_time_is_offered_at_once(
        dirs: dict[FileKind, Path], manifest: FileManifest) -> None:
    clock = Clock()
    # Renamed into place long after its last write, or found at start-up.
    write(dirs[FileKind.TRAINING_DATA] / "hex8_2p.npz", b"npz", clock.now - SETTLE - 1)
    assert len(scanner(dirs, manifest, clock).scan().picked_up) == 1


def test_temp_lock_and_archived_files_are_never_offered(
        dirs: dict[FileKind, Path], manifest: FileManifest) -> None:
    clock = Clock()
    old = clock.now - 100
    for name in ("ckpt.pth.tmp", "canonical_sq8_2p.tmp", "x.pth.lock", ".hidden.pth"):
        write(dirs[FileKind.MODELS] / name, b"x", old)
    for name in ("tmp1234.npz", "sq8_2p.npz.archived_20260101", "sq8_2p.npz.lock"):
        write(dirs[FileKind.TRAINING_DATA] / name, b"x", old)
    write(dirs[FileKind.MODELS] / ".cache" / "inside.pth", b"x", old)
    write(dirs[FileKind.MODELS] / "production" / "sq8_2p" / "latest_1.pth", b"x", old)
    scanner(dirs, manifest, clock).scan()
    assert offered(manifest) == {"production/sq8_2p/latest_1.pth": hash_file(
        dirs[FileKind.MODELS] / "production" / "sq8_2p" / "latest_1.pth")}


def test_a_file_overwritten_in_place_is_hashed_again_as_a_new_version(
        dirs: dict[FileKind, Path], manifest: FileManifest) -> None:
    clock = Clock()
    scan = scanner(dirs, manifest, clock)
    model = write(dirs[FileKind.MODELS] / "canonical_sq8_2p.pth", b"v1" * 100, clock.now - 100)
    scan.scan()
    first = offered(manifest)["canonical_sq8_2p.pth"]
    with model.open("r+b") as f:  # auto_promote copies onto the canonical file in place
        f.write(b"v2" * 100)
    os.utime(model, (clock.now, clock.now))
    scan.scan()
    assert scan.unsettled() == {(FileKind.MODELS, "canonical_sq8_2p.pth")}
    clock.now += SETTLE
    scan.scan()
    second = offered(manifest)["canonical_sq8_2p.pth"]
    assert second == hash_file(model) != first


def test_symlinks_are_offered_as_symlinks_and_escaping_ones_not_at_all(
        dirs: dict[FileKind, Path], manifest: FileManifest, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    models = dirs[FileKind.MODELS]
    write(models / "canonical_hex8_2p.pth", b"m", clock.now - 100)
    (models / "ringrift_best_hex8_2p.pth").symlink_to("canonical_hex8_2p.pth")
    (models / "escape.pth").symlink_to("../training/x.pth")
    (models / "absolute.pth").symlink_to(tmp_path / "models" / "canonical_hex8_2p.pth")
    (models / "sub").mkdir()
    (models / "sub" / "up.pth").symlink_to("../canonical_hex8_2p.pth")  # inside: kept
    (tmp_path / "elsewhere").mkdir()
    (models / "linked_dir").symlink_to(tmp_path / "elsewhere")  # never entered
    write(tmp_path / "elsewhere" / "outside.pth", b"o", clock.now - 100)
    scan = scanner(dirs, manifest, clock)
    with caplog.at_level(logging.WARNING):
        scan.scan()
        scan.scan()
    assert offered(manifest) == {
        "canonical_hex8_2p.pth": hash_file(models / "canonical_hex8_2p.pth"),
        "ringrift_best_hex8_2p.pth": "-> canonical_hex8_2p.pth",
        "sub/up.pth": "-> ../canonical_hex8_2p.pth",
    }
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # once per escaping link, not once per scan
    assert any("escape.pth" in w for w in warnings)
    assert any("absolute.pth" in w for w in warnings)


def test_a_symlink_waits_for_its_settling_target(
        dirs: dict[FileKind, Path], manifest: FileManifest) -> None:
    clock = Clock()
    models = dirs[FileKind.MODELS]
    write(models / "canonical_hex8_2p.pth", b"m", clock.now)
    (models / "ringrift_best_hex8_2p.pth").symlink_to("canonical_hex8_2p.pth")
    scan = scanner(dirs, manifest, clock)
    scan.scan()
    assert offered(manifest) == {}
    clock.now += SETTLE
    scan.scan()
    assert set(offered(manifest)) == {"canonical_hex8_2p.pth", "ringrift_best_hex8_2p.pth"}


def test_removed_files_are_no_longer_offered_and_restarts_do_not_hash_again(
        dirs: dict[FileKind, Path], manifest: FileManifest, tmp_path: Path) -> None:
    clock = Clock()
    a = write(dirs[FileKind.MODELS] / "a.pth", b"a", clock.now - 100)
    write(dirs[FileKind.MODELS] / "b.pth", b"b", clock.now - 100)
    scanner(dirs, manifest, clock).scan()
    a.unlink()
    again = scanner(dirs, manifest, clock).scan()  # a new scanner: as after a restart
    assert again.picked_up == []
    assert again.forgotten == [(FileKind.MODELS, "a.pth")]
    assert set(offered(manifest)) == {"b.pth"}


def test_a_file_renamed_into_place_is_offered_at_once_unless_it_changed_since(
        dirs: dict[FileKind, Path], manifest: FileManifest) -> None:
    clock = Clock()
    scan = scanner(dirs, manifest, clock)
    models = dirs[FileKind.MODELS]
    write(models / "canonical_a.tmp", b"a" * 100, clock.now)
    os.rename(models / "canonical_a.tmp", models / "canonical_a.pth")
    scan.note_renamed(FileKind.MODELS, "canonical_a.pth")
    write(models / "canonical_b.tmp", b"b" * 100, clock.now)
    os.rename(models / "canonical_b.tmp", models / "canonical_b.pth")
    scan.note_renamed(FileKind.MODELS, "canonical_b.pth")
    with (models / "canonical_b.pth").open("ab") as f:  # written after the rename
        f.write(b"more")
    scan.scan()
    assert set(offered(manifest)) == {"canonical_a.pth"}
    clock.now += SETTLE
    scan.scan()
    assert set(offered(manifest)) == {"canonical_a.pth", "canonical_b.pth"}


def test_a_removed_file_is_remembered_as_gone_for_a_while(
        dirs: dict[FileKind, Path], manifest: FileManifest) -> None:
    clock = Clock()
    a = write(dirs[FileKind.MODELS] / "candidate_a.pth", b"a", clock.now - 100)
    scan = scanner(dirs, manifest, clock)
    scan.scan()
    digest = hash_file(a)
    a.unlink()
    scan.scan()
    assert manifest.gone() == {(FileKind.MODELS, "candidate_a.pth", digest)}
    assert manifest.gone(keep_days=0) == set()  # pruned after its time
