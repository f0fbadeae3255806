"""Which filesystem a path lives on, and whether it is shared network storage (no copying)."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["NETWORK_FILESYSTEMS", "Mount", "filesystem_type", "is_network_filesystem", "mount_of"]

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


@dataclass(frozen=True, slots=True)
class Mount:
    """The mount holding a path: where it is mounted, its fs type and what it mounts."""

    point: str = ""
    fstype: str = UNKNOWN
    source: str = UNKNOWN

    @property
    def is_network(self) -> bool:
        """On a network or cluster filesystem other nodes may share."""
        return _is_network_type(self.fstype)


def mount_of(path: Path, *, mountinfo: str | None = None) -> Mount:
    """The mount holding `path` (which need not exist yet); fields 'unknown' if unreadable.

    `mountinfo` is the text of /proc/self/mountinfo (read when None; tests pass samples).
    """
    if mountinfo is None:
        try:
            mountinfo = os.fsdecode(MOUNTINFO.read_bytes())
        except OSError as exc:  # not Linux, or /proc not mounted
            log.debug("cannot read %s: %s", MOUNTINFO, exc)
            return Mount()
    target = os.fsdecode(Path(path).resolve())
    best = Mount()
    for mount in _mounts(mountinfo):
        # >= : a later line is mounted over an earlier one at the same point and hides it.
        if _contains(mount.point, target) and len(mount.point) >= len(best.point):
            best = mount
    return best


def filesystem_type(path: Path, *, mountinfo: str | None = None) -> str:
    """The fs type of the mount holding `path` (which need not exist yet), or 'unknown'."""
    return mount_of(path, mountinfo=mountinfo).fstype


def is_network_filesystem(path: Path, *, mountinfo: str | None = None) -> tuple[bool, str]:
    """(True, fstype) when `path` is on a network or cluster filesystem other nodes may share."""
    mount = mount_of(path, mountinfo=mountinfo)
    return mount.is_network, mount.fstype


def _is_network_type(fstype: str) -> bool:
    if fstype.startswith("fuse."):
        return fstype not in LOCAL_FUSE
    return fstype in NETWORK_FILESYSTEMS


def _mounts(mountinfo: str) -> list[Mount]:
    """One Mount per line; see proc(5) for the fields."""
    mounts: list[Mount] = []
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        # 0 id, 1 parent, 2 major:minor, 3 root, 4 mount point, 5 options, then optional
        # fields up to a lone "-", then fs type, source, super options.
        try:
            separator = fields.index("-", 6)
            fstype, source = fields[separator + 1], fields[separator + 2]
        except (ValueError, IndexError):
            continue  # not a mountinfo line
        mounts.append(Mount(_unescape(fields[4]), fstype, _unescape(source)))
    return mounts


def _unescape(field: str) -> str:
    """The kernel writes space, tab, newline and backslash in paths as \\ooo octal escapes."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def _contains(mount_point: str, target: str) -> bool:
    """True if `target` is `mount_point` or below it (whole path components only)."""
    if mount_point == "/" or target == mount_point:
        return True
    return target.startswith(mount_point.rstrip("/") + "/")
