"""A data dir's identity marker, per-node state dirs and sharer heartbeats (the I/O side).

Nodes that mount the same data dir (the same path on NFS, Lustre, sshfs…) read the
same ``<data_dir>/.ringsync/data_dir_id``: equal markers mean shared storage. Each
node keeps its own state under ``<data_dir>/.ringsync/<node_id>/`` so that no SQLite
file is ever written by two hosts over a network filesystem.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import time
import uuid
from pathlib import Path

from ringsync.errors import ConfigError, CorruptDataError

__all__ = [
    "HEARTBEAT", "MARKER", "check_node_dir_name", "ensure_data_dir_id", "migrate_legacy_state",
    "read_heartbeats", "write_heartbeat",
]

log = logging.getLogger(__name__)

MARKER = "data_dir_id"
HEARTBEAT = "heartbeat"
_MARKER_RE = re.compile(r"^[0-9a-f]{32}$")
_READ_ATTEMPTS = 20  # another node may be writing the marker right now (O_EXCL fallback)
_LEGACY_STATE = ("manifest.db",)


def ensure_data_dir_id(state_root: Path) -> str:
    """The data dir's marker, created once (atomically) and never overwritten.

    The file is written in full and fsynced under a temporary name, then hard-linked
    to its final name: a link fails when the name exists, so two nodes starting at
    once on one shared dir agree on the first marker. Filesystems without hard links
    fall back to an exclusive create (a reader retries while it is still empty).
    """
    state_root.mkdir(parents=True, exist_ok=True)
    final = state_root / MARKER
    if not final.exists():
        _create_marker(final, uuid.uuid4().hex)
    return _read_marker(final)


def _create_marker(final: Path, marker: str) -> None:
    tmp = final.with_name(f".{MARKER}.{uuid.uuid4().hex}.tmp")
    data = (marker + "\n").encode()
    try:
        _write_synced(tmp, data, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            os.link(tmp, final)
        except FileExistsError:
            return  # another node won: use its marker
        except OSError:  # no hard links here (some FUSE filesystems)
            with contextlib.suppress(FileExistsError):
                _write_synced(final, data, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        _fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _write_synced(path: Path, data: bytes, flags: int) -> None:
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some network filesystems refuse fsync on a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read_marker(final: Path) -> str:
    text = ""
    for _ in range(_READ_ATTEMPTS):
        text = final.read_text(encoding="ascii", errors="replace").strip()
        if _MARKER_RE.match(text):
            return text
        time.sleep(0.05)
    raise CorruptDataError(
        f"{final} holds {text[:40]!r}, not a data dir id (32 hex digits); delete the file and "
        "restart: every node using this data dir will create and share a new one")


def check_node_dir_name(node_id: str) -> str:
    """``node_id`` as a directory name under .ringsync/, or a ConfigError naming the fix."""
    if not node_id or node_id in {".", ".."} or "/" in node_id or "\0" in node_id \
            or node_id == MARKER or node_id.startswith("."):
        raise ConfigError(f"RINGRIFT_NODE_ID = {node_id!r} cannot name this node's state dir "
                          "under <data_dir>/.ringsync/; use a host name without '/'")
    return node_id


def migrate_legacy_state(state_root: Path, state_dir: Path) -> list[str]:
    """Move state an older ringsync kept in ``.ringsync/`` itself into this node's dir.

    The WAL is checkpointed into the main file first, so the rename moves everything.
    When several nodes share the dir, the first to start takes the old manifest (a
    rename is atomic); the others start fresh, which re-sends at most what the
    receivers already hold and they de-duplicate.
    """
    moved = []
    for name in _LEGACY_STATE:
        old, new = state_root / name, state_dir / name
        if not old.is_file() or new.exists():
            continue
        with contextlib.closing(sqlite3.connect(old)) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        try:
            os.rename(old, new)
        except FileNotFoundError:
            continue  # another node sharing the dir took it first
        for suffix in ("-wal", "-shm"):
            Path(f"{old}{suffix}").unlink(missing_ok=True)
        moved.append(name)
        log.info("moved %s from %s to this node's state dir %s", name, state_root, state_dir)
    return moved


def write_heartbeat(state_dir: Path, beat: int) -> None:
    """Tell the other nodes on this data dir that this node is alive (content changes each beat).

    Rewritten in place, not renamed: NFS revalidates an open file's attributes on
    open, while a renamed name may be served from a stale lookup cache. A reader
    that sees a half-written file sees a change too, which is right: we are alive.
    """
    (state_dir / HEARTBEAT).write_text(f"{beat} {os.getpid()} {uuid.uuid4().hex[:8]}\n",
                                       encoding="ascii")


def read_heartbeats(state_root: Path, names: set[str]) -> dict[str, str]:
    """The heartbeat text of every node in ``names`` that keeps a state dir here."""
    beats: dict[str, str] = {}
    try:  # the nodes keeping state here, not every host of a 1000-node inventory
        present = [e.name for e in os.scandir(state_root) if e.name in names and e.is_dir()]
    except OSError:
        return beats
    for name in present:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            beats[name] = (state_root / name / HEARTBEAT).read_text(encoding="ascii")
    return beats
