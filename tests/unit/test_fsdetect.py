"""Network filesystem detection from /proc/self/mountinfo samples and the real file."""

from __future__ import annotations

from pathlib import Path

import pytest

from ringsync.ops.fsdetect import filesystem_type, is_network_filesystem, mount_of

# Shaped like a GPU node's mountinfo: overlay root, ext4 data, NFS, Lustre, sshfs, escapes.
MOUNTINFO = """\
22 1 0:21 / / rw,relatime shared:1 - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w
23 22 0:22 / /proc rw,nosuid,nodev,noexec,relatime shared:2 - proc proc rw
24 22 0:5 / /dev rw,nosuid shared:3 - devtmpfs udev rw,size=65536k,mode=755
25 22 0:23 / /tmp rw,nosuid,nodev shared:4 - tmpfs tmpfs rw
26 22 259:2 / /var/lib rw,relatime shared:5 - ext4 /dev/nvme0n1p2 rw
27 22 259:3 / /scratch rw,relatime shared:6 - xfs /dev/nvme1n1 rw,attr2,inode64
30 22 0:40 / /mnt/nfs rw,relatime shared:7 - nfs4 10.0.0.5:/export rw,vers=4.2,hard
31 30 0:41 / /mnt/nfs/local-cache rw,relatime shared:8 - ext4 /dev/sdb1 rw
32 22 0:42 / /mnt/nfs3 rw,relatime shared:9 - nfs 10.0.0.6:/old rw,vers=3
33 22 0:43 / /lustre rw shared:10 master:3 - lustre 10.0.0.7@tcp:/fs rw,flock
34 22 0:44 / /mnt/my\\040games rw,nosuid,nodev shared:11 - fuse.sshfs gpu@host:/games rw
35 22 0:45 / /mnt/juice rw - fuse.juicefs JuiceFS:jfs rw
36 22 0:46 / /mnt/ceph rw - ceph 10.0.0.8:/ rw,name=ringsync
37 22 0:47 / /mnt/smb rw - cifs //nas/share rw
38 22 0:48 / /mnt/rootless rw - fuse.fuse-overlayfs fuse-overlayfs rw
39 22 8:17 / /mnt/usb rw - fuseblk /dev/sdc1 rw
"""


@pytest.mark.parametrize(
    ("path", "fstype", "network"),
    [
        ("/", "overlay", False),
        ("/home/ringsync/data", "overlay", False),
        ("/var/lib/ringsync/games", "ext4", False),
        ("/scratch/ringsync", "xfs", False),
        ("/tmp/x", "tmpfs", False),
        ("/mnt/nfs", "nfs4", True),
        ("/mnt/nfs/data/games", "nfs4", True),
        ("/mnt/nfs/local-cache/games", "ext4", False),  # nested mount: longest prefix wins
        ("/mnt/nfs3/games", "nfs", True),
        ("/mnt/nfsdata/games", "overlay", False),  # a prefix only on component boundaries
        ("/lustre/ringsync", "lustre", True),  # optional fields before the separator
        ("/mnt/my games/hex8_2p.db", "fuse.sshfs", True),  # \040 in mountinfo
        ("/mnt/my", "overlay", False),
        ("/mnt/juice/x", "fuse.juicefs", True),
        ("/mnt/ceph/x", "ceph", True),
        ("/mnt/smb/x", "cifs", True),
        ("/mnt/rootless/data", "fuse.fuse-overlayfs", False),  # known-local FUSE
        ("/mnt/usb/data", "fuseblk", False),
    ],
)
def test_sample_mountinfo(path: str, fstype: str, network: bool) -> None:
    assert filesystem_type(Path(path), mountinfo=MOUNTINFO) == fstype
    assert is_network_filesystem(Path(path), mountinfo=MOUNTINFO) == (network, fstype)


def test_later_mount_over_same_point_wins() -> None:
    text = MOUNTINFO + "40 30 0:50 / /mnt/nfs rw - tmpfs tmpfs rw\n"
    assert is_network_filesystem(Path("/mnt/nfs/data"), mountinfo=text) == (False, "tmpfs")


def test_trailing_slash_and_garbage_lines() -> None:
    text = "garbage\n\n" + MOUNTINFO
    assert filesystem_type(Path("/mnt/nfs/"), mountinfo=text) == "nfs4"


def test_symlink_resolves_to_its_target(tmp_path: Path) -> None:
    nfs_data = tmp_path / "nfs" / "data"
    nfs_data.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(nfs_data)
    root = tmp_path.resolve()
    assert " " not in str(root)
    text = f"1 0 0:1 / / rw - ext4 /dev/root rw\n2 1 0:2 / {root}/nfs rw - nfs4 h:/e rw\n"
    assert is_network_filesystem(link / "games", mountinfo=text) == (True, "nfs4")


def test_empty_mountinfo_is_unknown() -> None:
    assert is_network_filesystem(Path("/data"), mountinfo="") == (False, "unknown")


def test_real_mountinfo_tmp_path_is_local(tmp_path: Path) -> None:
    shared, fstype = is_network_filesystem(tmp_path / "not-yet-created")
    assert fstype not in ("", "unknown")
    assert not shared, f"tmp_path is on {fstype}"


@pytest.mark.parametrize(
    ("path", "point", "source"),
    [
        ("/mnt/nfs/data", "/mnt/nfs", "10.0.0.5:/export"),
        ("/mnt/my games/x", "/mnt/my games", "gpu@host:/games"),
        ("/var/lib/ringsync", "/var/lib", "/dev/nvme0n1p2"),
    ],
)
def test_mount_of_names_point_type_and_source(path: str, point: str, source: str) -> None:
    mount = mount_of(Path(path), mountinfo=MOUNTINFO)
    assert (mount.point, mount.source) == (point, source)
    assert mount.fstype == filesystem_type(Path(path), mountinfo=MOUNTINFO)


def test_mount_of_unreadable_mountinfo_is_unknown_and_local() -> None:
    mount = mount_of(Path("/x"), mountinfo="garbage\n")
    assert (mount.fstype, mount.source, mount.is_network) == ("unknown", "unknown", False)
