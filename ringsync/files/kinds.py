"""Which files are models or training data, which are never shipped, and who holds each kind."""

from __future__ import annotations

import enum
import fnmatch

from ringsync.inventory import Host, Inventory
from ringsync.policy.bandwidth import Priority
from ringsync.policy.router import SyncRouter


class FileKind(enum.Enum):
    """A kind of whole immutable file; the value is the URL segment and the manifest key."""

    MODELS = "models"
    TRAINING_DATA = "training_data"


SUFFIXES: dict[FileKind, tuple[str, ...]] = {
    FileKind.MODELS: (".pth", ".pt", ".onnx"),
    FileKind.TRAINING_DATA: (".npz",),
}

# Names RingRift writes while a file is incomplete, locked or retired (RINGRIFT_FACTS §5):
# checkpoints go to *.pth.tmp, promotion to canonical_*.tmp, the NPZ exporter writes
# tmpXXXX.npz under a *.npz.lock and renames the old file to *.npz.archived_<ts>.
# Dot-files cover our own .<name>.ringsync-part downloads.
NEVER_SHIPPED = (".*", "*.tmp", "*.lock", "*.archived_*", "tmp*.npz", "*.writing")
PART_SUFFIX = ".ringsync-part"
# Names RingRift writes in place (scripts/auto_promote.py copies onto the canonical model):
# a hard link to or from one would let such a write change its twin too.
WRITTEN_IN_PLACE = ("canonical_*",)


def is_written_in_place(relpath: str) -> bool:
    name = relpath.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in WRITTEN_IN_PLACE)


# A promoted model (RINGRIFT_FACTS §5): every selfplay node should play with it within seconds.
PROMOTED = ("canonical_*", "ringrift_best_*")


def file_priority(kind: FileKind, relpath: str) -> Priority:
    """The bandwidth share a file travels at: a promoted model first, then any model, games
    (NORMAL, elsewhere), and training data last, so a model never waits behind an NPZ backlog."""
    if kind is FileKind.TRAINING_DATA:
        return Priority.LOW
    name = relpath.rsplit("/", 1)[-1]
    promoted = any(fnmatch.fnmatchcase(name, pattern) for pattern in PROMOTED)
    return Priority.CRITICAL if promoted else Priority.HIGH


def is_shippable_name(kind: FileKind, name: str) -> bool:
    """True when a file called ``name`` (one path component) is a finished file of ``kind``."""
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in NEVER_SHIPPED):
        return False
    return name.endswith(SUFFIXES[kind])


def part_name(name: str) -> str:
    """The temp name a download of ``name`` is written under: a dot-file, never shipped."""
    return f".{name}{PART_SUFFIX}"


class FileRouting:
    """Which nodes hold which kind: models on every selfplay and training node, training
    data on training nodes only; never the coordinator (invariant 6), never a host that is
    offline, in sync_routing.excluded_hosts, marked skip_sync_receive, or listed in
    allowed_external_storage with receive_models / receive_npz false. Roles are the game
    router's (priority hosts count as training nodes)."""

    def __init__(self, inventory: Inventory, node_id: str, coordinator_node: str | None) -> None:
        self._inventory = inventory
        self._router = SyncRouter(inventory, node_id, coordinator_node)
        self._node_id = node_id

    def wants(self, host: Host, kind: FileKind) -> bool:
        if self._refused(host, kind):
            return False
        trainer = self._router.counts_as_trainer(host)
        if kind is FileKind.TRAINING_DATA:
            return trainer
        return trainer or "selfplay" in host.role.lower() or host.selfplay_enabled

    def kinds_wanted_here(self) -> frozenset[FileKind]:
        host = self._inventory.get(self._node_id)
        if host is None:  # a node outside the inventory holds only what it makes
            return frozenset()
        return frozenset(k for k in FileKind if self.wants(host, k))

    def peers(self) -> list[Host]:
        """Hosts that may hold files for us: every reachable host but this one."""
        return [h for name, h in self._inventory.hosts.items()
                if name != self._node_id and h.is_online and h.p2p_enabled]

    def _refused(self, host: Host, kind: FileKind) -> bool:
        external = self._inventory.sync_routing.external_storage(host.name)
        if external is not None:
            allowed = external.receive_models if kind is FileKind.MODELS else external.receive_npz
            if not allowed:
                return True
        return (self._router.is_coordinator(host) or host.skip_sync_receive or not host.is_online
                or host.name in self._inventory.sync_routing.excluded_hosts)
