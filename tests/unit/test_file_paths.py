"""Names from peers never resolve outside their directory (ringsync.files.paths, plan)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringsync.errors import BadInputError, UnsafePathError
from ringsync.files.paths import resolve_inside, safe_link_target, safe_relpath
from ringsync.files.plan import parse_index

# Path-like text: separators, dots and odd characters far more often than random text has them.
_PIECES = st.sampled_from(["..", ".", "/", "//", "a", "b.pth", "\\", "\x00", "%2e", "~", " ",
                           "\n", "é", "\udcff", ".hidden", "x" * 300])
RELPATHS = st.one_of(st.text(max_size=60), st.lists(_PIECES, max_size=12).map("".join))


@given(RELPATHS)
@settings(max_examples=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_relpath_is_refused_or_stays_strictly_inside(tmp_path: Path, relpath: str) -> None:
    root = tmp_path / "models"
    root.mkdir(exist_ok=True)
    try:
        checked = safe_relpath(relpath)
    except UnsafePathError:
        return
    resolved = Path(os.path.realpath(root / checked))
    real_root = Path(os.path.realpath(root))
    assert real_root in resolved.parents
    assert resolve_inside(root, checked) == real_root / checked
    assert not any(part.startswith(".") for part in checked.split("/"))


@pytest.mark.parametrize("bad", [
    "", "/etc/passwd", "../x.pth", "a/../../x.pth", "a/./b.pth", "a//b.pth", "a/", ".x.pth",
    "a/.ringsync-part", "a\\..\\b.pth", "a\x00.pth", "line\nbreak.pth", "x" * 256 + ".pth",
    "/".join(["d"] * 17) + ".pth", 5, None,
])
def test_bad_relpaths_are_refused_with_a_reason(bad: object) -> None:
    with pytest.raises(UnsafePathError, match=r"\w"):
        safe_relpath(bad)


def test_a_parent_directory_symlinked_out_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    (root / "sub").symlink_to(tmp_path / "outside")
    with pytest.raises(UnsafePathError, match="symlinked directory"):
        resolve_inside(root, "sub/x.pth")


@pytest.mark.parametrize(("relpath", "target", "ok"), [
    ("ringrift_best_x.pth", "canonical_x.pth", True),
    ("production/x/latest.pth", "x_1.pth", True),
    ("production/x/latest.pth", "../../canonical_x.pth", True),
    ("a.pth", "../outside.pth", False),
    ("sub/a.pth", "../../outside.pth", False),
    ("a.pth", "/abs/canonical_x.pth", False),
    ("a.pth", ".", False),
    ("a.pth", "", False),
])
def test_link_targets(relpath: str, target: str, ok: bool) -> None:
    if ok:
        assert safe_link_target(relpath, target) == target
    else:
        with pytest.raises(UnsafePathError):
            safe_link_target(relpath, target)


def entry(**over: object) -> dict[str, object]:
    base: dict[str, object] = {"kind": "models", "relpath": "canonical_x.pth", "size": 10,
                               "mtime_ns": 1, "hash": "a" * 64, "link_target": None}
    return {**base, **over}


@pytest.mark.parametrize("bad", [
    entry(relpath="../x.pth"), entry(kind="games"), entry(size=-1), entry(size="10"),
    entry(size=2**41), entry(mtime_ns=1.5), entry(hash="A" * 64), entry(hash="a" * 63),
    entry(relpath="x.pth.tmp"), entry(kind="training_data"), entry(link_target="../../etc/passwd"),
    entry(link_target="/etc/passwd"), "not an object",
])
def test_malformed_index_entries_are_refused(bad: object) -> None:
    with pytest.raises(BadInputError):
        parse_index(json.dumps({"files": [bad]}).encode())


@pytest.mark.parametrize("body", [b"", b"[]", b'{"files": 3}', b"\xff", b'{"nofiles": []}'])
def test_malformed_indexes_are_refused(body: bytes) -> None:
    with pytest.raises(BadInputError):
        parse_index(body)
