"""Relative paths from peers and symlink targets, checked so that nothing leaves its directory."""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

from ringsync.errors import UnsafePathError

MAX_RELPATH_CHARS = 1024
MAX_COMPONENT_BYTES = 255
MAX_DEPTH = 16


def safe_relpath(relpath: object) -> str:
    """``relpath`` when it names a file strictly inside a directory, else UnsafePathError.

    Accepted: '/'-separated components, none empty, '.', '..' or starting with '.'
    (dot-files are temp and part files, never shipped), no NUL, backslash or control
    character, valid UTF-8, at most MAX_DEPTH deep. Checked on every name a peer sends,
    before any file system call.
    """
    if not isinstance(relpath, str) or not relpath:
        raise UnsafePathError("a file path must be a non-empty string")
    shown = repr(relpath[:80])
    if len(relpath) > MAX_RELPATH_CHARS:
        raise UnsafePathError(f"file path {shown}… is longer than {MAX_RELPATH_CHARS} characters")
    if relpath.startswith("/"):
        raise UnsafePathError(f"file path {shown} is absolute; paths are relative to the directory")
    parts = relpath.split("/")
    if len(parts) > MAX_DEPTH:
        raise UnsafePathError(f"file path {shown} is deeper than {MAX_DEPTH} directories")
    for part in parts:
        _check_component(part, shown)
    return relpath


def _check_component(part: str, shown: str) -> None:
    if not part or part in (".", ".."):
        raise UnsafePathError(f"file path {shown} has an empty, '.' or '..' component")
    if part.startswith("."):
        raise UnsafePathError(f"file path {shown} names a dot-file (temp files are never shipped)")
    if "\\" in part or not part.isprintable():
        raise UnsafePathError(f"file path {shown} contains a backslash or control character")
    try:
        encoded = part.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePathError(f"file path {shown} is not valid UTF-8") from None
    if len(encoded) > MAX_COMPONENT_BYTES:
        raise UnsafePathError(f"file path {shown} has a component over {MAX_COMPONENT_BYTES} bytes")


def safe_link_target(relpath: str, target: object) -> str:
    """``target`` when a symlink at ``relpath`` pointing to it stays inside the directory.

    Only relative targets are kept (an absolute one means nothing on another host); the
    target, taken from the link's own directory, must land strictly inside the directory.
    """
    if not isinstance(target, str) or not target or "\x00" in target or not target.isprintable():
        raise UnsafePathError(f"symlink {relpath!r}: its target must be a non-empty printable string")
    if len(target) > MAX_RELPATH_CHARS or target.startswith("/"):
        raise UnsafePathError(f"symlink {relpath!r} -> {target[:80]!r} is absolute or too long; "
                              "only relative targets inside the directory are replicated")
    landed = link_target_relpath(relpath, target)
    if landed in (".", "..") or landed.startswith("../") or landed.startswith("/"):
        raise UnsafePathError(f"symlink {relpath!r} -> {target[:80]!r} points outside the directory")
    return target


def link_target_relpath(relpath: str, target: str) -> str:
    """Where a symlink at ``relpath`` pointing to ``target`` lands, relative to the directory."""
    return posixpath.normpath(posixpath.join(posixpath.dirname(relpath), target))


def resolve_inside(root: Path, relpath: str) -> Path:
    """The path of a checked ``relpath`` under ``root``, refusing a parent directory that is
    a symlink out of ``root`` (a name is resolved only below the real root)."""
    safe_relpath(relpath)
    real_root = Path(os.path.realpath(root))
    path = real_root / relpath
    parent = Path(os.path.realpath(path.parent))
    if parent != real_root and real_root not in parent.parents:
        raise UnsafePathError(f"file path {relpath!r} leads out of {root} through a symlinked directory")
    return parent / path.name
