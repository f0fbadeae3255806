"""Shared storage, decided per (source, target) pair and per shared data dir, without I/O.

A transfer is skipped only when the target already sees the source's games where
its own training reads them: both nodes use the same data dir, which they know by
an equal identity marker (``<data_dir>/.ringsync/data_dir_id``). A different
filesystem, a network mount or an inventory flag alone never means "skip".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ringsync.inventory import Host, Inventory

__all__ = ["SharedStorage", "SharerElection", "StorageIdentity", "all_skipped", "nfs_hosts"]

PROBE_TTL = 300.0  # seconds a peer's marker is trusted before it is asked again


@dataclass(frozen=True, slots=True)
class StorageIdentity:
    """What a node tells its peers about its data dir."""

    data_dir_id: str
    fstype: str = "unknown"
    mount_source: str = "unknown"
    network: bool = False

    def as_dict(self) -> dict[str, object]:
        return {"data_dir_id": self.data_dir_id, "fstype": self.fstype,
                "mount_source": self.mount_source, "network": self.network}


def _nfs_flag(host: Host) -> bool:
    # The inventory folds RingRift's per-host nfs_enabled / has_nfs into one field.
    return host.nfs_enabled


def nfs_hosts(inventory: Inventory) -> frozenset[str] | None:
    """Hosts the inventory marks as NFS hosts, or None when it marks none (markers decide)."""
    marked = frozenset(name for name, host in inventory.hosts.items() if _nfs_flag(host))
    return marked or None


@dataclass(frozen=True, slots=True)
class _Known:
    marker: str
    learned_at: float


@dataclass
class SharedStorage:
    """Does ``target`` see this node's data dir? One answer per pair, learned from the peer.

    ``enabled`` is RINGRIFT_SKIP_NFS_SYNC / auto_sync.skip_nfs_sync: when false every
    pair is pushed. When the inventory marks NFS hosts (``nfs_enabled``/``has_nfs``),
    as RingRift's router does, only a pair of two marked hosts may be skipped; the
    marks never make a pair with different data dirs skip. Until a target's marker is
    known the pair is pushed (the receiver de-duplicates, and refuses a sender whose
    marker equals its own).
    """

    node_id: str
    own: StorageIdentity
    enabled: bool = True
    marked_nfs: frozenset[str] | None = None
    ttl: float = PROBE_TTL
    skipped_games: dict[str, int] = field(default_factory=dict)
    _known: dict[str, _Known] = field(default_factory=dict)

    def may_skip(self, target: str) -> bool:
        """Whether the settings allow this pair to be skipped at all."""
        if not self.enabled:
            return False
        return self.marked_nfs is None or {self.node_id, target} <= self.marked_nfs

    def needs_probe(self, target: str, now: float) -> bool:
        known = self._known.get(target)
        return self.may_skip(target) and (known is None or now - known.learned_at > self.ttl)

    def learned(self, target: str, marker: str, now: float) -> None:
        self._known[target] = _Known(marker, now)

    def forget(self, target: str) -> None:
        """The peer failed or answered oddly: ask again before trusting its marker."""
        self._known.pop(target, None)

    def shares(self, target: str, now: float) -> bool:
        """True only for a fresh, equal marker on a pair the settings allow to skip."""
        known = self._known.get(target)
        return (self.may_skip(target) and known is not None
                and now - known.learned_at <= self.ttl and known.marker == self.own.data_dir_id)

    def marker_of(self, target: str, now: float) -> str | None:
        """``target``'s fresh data dir id on a pair the settings allow to skip, else None."""
        known = self._known.get(target)
        if not self.may_skip(target) or known is None or now - known.learned_at > self.ttl:
            return None
        return known.marker

    def skipped(self, target: str, games: int) -> None:
        self.skipped_games[target] = self.skipped_games.get(target, 0) + games

    def status(self, now: float) -> dict[str, object]:
        """For /v1/status: this node's data dir and the pairs skipped as shared."""
        return {
            **self.own.as_dict(),
            "skip_enabled": self.enabled,
            "nfs_hosts": sorted(self.marked_nfs) if self.marked_nfs is not None else None,
            "sharing_targets": sorted(t for t in self._known if self.shares(t, now)),
            "skipped_games": dict(sorted(self.skipped_games.items())),
        }


@dataclass
class SharerElection:
    """Which of the nodes that share one data dir ships the games generated in it.

    Every sharer discovers the same source DBs; only one should send them. The
    shipper is the node with the smallest name among the sharers alive. A sharer is
    alive while its heartbeat file changes: each observer times the change on its own
    clock, so clock skew between hosts does not matter. A sharer seen for the first
    time counts as alive for one ``window``, so a restart never makes two shippers.
    """

    node_id: str
    window: float
    _seen: dict[str, tuple[str, float]] = field(default_factory=dict)

    def observe(self, beats: Mapping[str, str], now: float) -> None:
        """``beats``: the heartbeat text of every other node keeping state in this dir."""
        for name in list(self._seen):
            if name not in beats:
                del self._seen[name]
        for name, text in beats.items():
            if name == self.node_id:
                continue
            seen = self._seen.get(name)
            if seen is None or seen[0] != text:
                self._seen[name] = (text, now)

    def alive(self, now: float) -> list[str]:
        return sorted(n for n, (_, at) in self._seen.items() if now - at <= self.window)

    def shipper(self, now: float) -> str:
        return min([self.node_id, *self.alive(now)])

    def is_shipper(self, now: float) -> bool:
        return self.shipper(now) == self.node_id


@dataclass(frozen=True, slots=True)
class Siblings:
    """Other targets that use one data dir with a target (e.g. two trainers on one NFS export).

    Games sent to one of them are in every one's data dir: only ``pusher`` is sent them, and
    each member records what the others acknowledged as held, so the dir holds each game once.
    """

    others: tuple[str, ...]
    pusher: str


def storage_groups(targets: Sequence[str], markers: Mapping[str, str | None]) -> dict[str, Siblings]:
    """Targets with equal data dir markers, grouped; the first in ``targets`` order pushes."""
    by_marker: dict[str, list[str]] = {}
    for name in targets:
        marker = markers.get(name)
        if marker is not None:
            by_marker.setdefault(marker, []).append(name)
    return {name: Siblings(tuple(m for m in members if m != name), members[0])
            for members in by_marker.values() if len(members) > 1 for name in members}


def all_skipped(targets: Iterable[str], shared: Iterable[str]) -> bool:
    """True when there are targets and every one of them was skipped as shared."""
    names = set(targets)
    return bool(names) and names <= set(shared)
