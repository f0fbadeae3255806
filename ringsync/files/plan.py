"""Peer file indexes parsed as untrusted input, and what this node must fetch: no I/O."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass

from ringsync.errors import BadInputError
from ringsync.files.hashing import is_hash
from ringsync.files.kinds import FileKind, is_shippable_name
from ringsync.files.layout import MAX_FILE_BYTES, MAX_INDEX_ENTRIES
from ringsync.files.manifest import FileRecord
from ringsync.files.paths import link_target_relpath, safe_link_target, safe_relpath

Ident = tuple[FileKind, str]


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One file a peer offers: its version is (mtime_ns, hash or link target)."""

    kind: FileKind
    relpath: str
    size: int
    mtime_ns: int
    hash: str
    link_target: str | None = None

    @property
    def ident(self) -> Ident:
        return (self.kind, self.relpath)

    @property
    def version(self) -> tuple[int, str]:
        return (self.mtime_ns, self.link_target if self.link_target is not None else self.hash)

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind.value, "relpath": self.relpath, "size": self.size,
                "mtime_ns": self.mtime_ns, "hash": self.hash, "link_target": self.link_target}

    @classmethod
    def of(cls, rec: FileRecord) -> IndexEntry:
        return cls(rec.kind, rec.relpath, rec.size, rec.mtime_ns, rec.hash, rec.link_target)


@dataclass(frozen=True, slots=True)
class Source:
    """Where a copy of some content can be fetched: a peer and its own name for it."""

    peer: str
    kind: FileKind
    relpath: str


@dataclass(frozen=True, slots=True)
class FetchJob:
    entry: IndexEntry
    sources: tuple[Source, ...]  # empty for a symlink (made locally)
    relays: tuple[Source, ...] = ()  # peers still downloading it that serve what they hold


def parse_index(body: bytes) -> list[IndexEntry]:
    """A peer's /v1/files/index answer; anything malformed raises BadInputError."""
    try:
        data = json.loads(body)
        files = data["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInputError(f"malformed file index: {exc}") from exc
    if not isinstance(files, list) or len(files) > MAX_INDEX_ENTRIES:
        raise BadInputError(f"file index must list at most {MAX_INDEX_ENTRIES} files")
    return [_entry(item) for item in files]


def _entry(item: object) -> IndexEntry:
    if not isinstance(item, dict):
        raise BadInputError("file index entry is not an object")
    try:
        kind = FileKind(item.get("kind"))
    except ValueError:
        raise BadInputError(f"file index entry has unknown kind {item.get('kind')!r:.40}") from None
    relpath = safe_relpath(item.get("relpath"))
    size, mtime_ns, digest, link = (item.get(k) for k in ("size", "mtime_ns", "hash", "link_target"))
    if type(size) is not int or not 0 <= size <= MAX_FILE_BYTES:
        raise BadInputError(f"{relpath!r}: size must be an integer 0..{MAX_FILE_BYTES}")
    if type(mtime_ns) is not int or mtime_ns < 0:
        raise BadInputError(f"{relpath!r}: mtime_ns must be a non-negative integer")
    if not is_shippable_name(kind, relpath.rsplit("/", 1)[-1]):
        raise BadInputError(f"{relpath!r} is not a shippable {kind.value} file name")
    if link is not None:
        return IndexEntry(kind, relpath, size, mtime_ns, "", safe_link_target(relpath, link))
    if not is_hash(digest):
        raise BadInputError(f"{relpath!r}: hash must be 64 lowercase hex digits")
    return IndexEntry(kind, relpath, size, mtime_ns, str(digest))


def plan_fetches(
    local: Mapping[Ident, FileRecord], occupied: Iterable[Ident],
    peers: Mapping[str, list[IndexEntry]], wanted: Iterable[FileKind],
    excluded: Mapping[str, set[str]], gone: Set[tuple[FileKind, str, str]] = frozenset(),
) -> list[FetchJob]:
    """What to fetch: for each name of a wanted kind, the newest version any peer offers,
    unless this node holds that content (or a newer version) already.

    ``occupied``: names present on disk here but not (yet) recorded, e.g. a file being
    written in place: never overwritten. ``excluded``: content hash -> peers that served
    wrong bytes for it. ``gone``: (kind, relpath, hash) versions removed here, never
    fetched back (a newer version of that name is). Any peer holding the content under
    any name is a source, so later receivers fetch from earlier ones. Regular files first;
    a symlink only once its target is here (or is not offered by anyone).
    """
    kinds, busy = frozenset(wanted), set(occupied)
    newest: dict[Ident, IndexEntry] = {}
    holders: dict[str, list[Source]] = {}
    for peer, entries in sorted(peers.items()):
        for e in entries:
            if e.link_target is None:
                holders.setdefault(e.hash, []).append(Source(peer, e.kind, e.relpath))
            if e.kind in kinds and (e.ident not in newest or e.version > newest[e.ident].version):
                newest[e.ident] = e
    files, links = [], []
    for ident, e in sorted(newest.items(), key=lambda kv: (kv[0][0].value, kv[0][1])):
        if ident in busy or _up_to_date(local.get(ident), e) or (*ident, e.hash) in gone:
            continue
        if e.link_target is not None:
            links.append(FetchJob(e, ()))
            continue
        sources = tuple(s for s in holders[e.hash] if s.peer not in excluded.get(e.hash, set()))
        if sources:
            files.append(FetchJob(e, sources))
    pending = {job.entry.ident for job in files}
    return files + [j for j in links if _link_target_ident(j.entry) not in pending]


def _up_to_date(held: FileRecord | None, offered: IndexEntry) -> bool:
    if held is None:
        return False
    if held.link_target is not None or offered.link_target is not None:
        if held.link_target == offered.link_target:
            return True
    elif held.hash == offered.hash:
        return True
    return held.mtime_ns >= offered.mtime_ns  # ours is as new or newer: we are its source


def _link_target_ident(e: IndexEntry) -> Ident:
    return (e.kind, link_target_relpath(e.relpath, e.link_target or ""))
