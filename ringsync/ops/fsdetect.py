"""Which filesystem a path lives on, and whether it is shared network storage (no copying)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

__all__ = ["NETWORK_FILESYSTEMS", "filesystem_type", "is_network_filesystem"]

log = logging.getLogger(__name__)

MOUNTINFO = Path("/proc/self/mountinfo")
UNKNOWN = "unknown"

NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs",  # file-sharing protocols
    "lustre", "gpfs", "beegfs", "fhgfs", "ceph", "glusterfs", "orangefs", "wekafs",  # HPC/parallel
    "ocfs2", "gfs2",  # cluster filesystems on shared block storage
    "9p",
})

# FUSE filesystems in a training cluster are almost always remote (sshfs, juicefs, s3fs,
# gcsfuse, rclone, …), so every fuse.* counts as shared. These few are known to be local;
# treating them as shared would stop games from leaving the node (rootless containers keep
# their root on fuse-overlayfs). fuseblk (ntfs-3g, exfat) has no "fuse." prefix: local.
LOCAL_FUSE = frozenset({"fuse.fuse-overlayfs", "fuse.lxcfs", "fuse.portal", "fuse.gvfsd-fuse"})

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def filesystem_type(path: Path, *, mountinfo: str | None = None) -> str:
    """The fs type of the mount holding `path` (which need not exist yet), or 'unknown'.

    `mountinfo` is the text of /proc/self/mountinfo (read when None; tests pass samples).
    """
    if mountinfo is None:
        try:
            mountinfo = os.fsdecode(MOUNTINFO.read_bytes())
        except OSError as exc:  # not Linux, or /proc not mounted
            log.debug("cannot read %s: %s", MOUNTINFO, exc)
            return UNKNOWN
    target = os.fsdecode(Path(path).resolve())
    best_len, best_type = -1, UNKNOWN
    for mount_point, fstype in _mounts(mountinfo):
        # >= : a later line is mounted over an earlier one at the same point and hides it.
        if _contains(mount_point, target) and len(mount_point) >= best_len:
            best_len, best_type = len(mount_point), fstype
    return best_type


def is_network_filesystem(path: Path, *, mountinfo: str | None = None) -> tuple[bool, str]:
    """(True, fstype) when `path` is on a network or cluster filesystem other nodes may share."""
    fstype = filesystem_type(path, mountinfo=mountinfo)
    return _is_network_type(fstype), fstype


def _is_network_type(fstype: str) -> bool:
    if fstype.startswith("fuse."):
        return fstype not in LOCAL_FUSE
    return fstype in NETWORK_FILESYSTEMS


def _mounts(mountinfo: str) -> list[tuple[str, str]]:
    """(mount point, fs type) per line; see proc(5) for the fields."""
    mounts: list[tuple[str, str]] = []
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        # 0 id, 1 parent, 2 major:minor, 3 root, 4 mount point, 5 options, then optional
        # fields up to a lone "-", then fs type, source, super options.
        try:
            separator = fields.index("-", 6)
            fstype = fields[separator + 1]
        except (ValueError, IndexError):
            continue  # not a mountinfo line
        mounts.append((_unescape(fields[4]), fstype))
    return mounts


def _unescape(field: str) -> str:
    """The kernel writes space, tab, newline and backslash in paths as \\ooo octal escapes."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def _contains(mount_point: str, target: str) -> bool:
    """True if `target` is `mount_point` or below it (whole path components only)."""
    if mount_point == "/" or target == mount_point:
        return True
    return target.startswith(mount_point.rstrip("/") + "/")
