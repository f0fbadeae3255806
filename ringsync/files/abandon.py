"""Which journalled downloads are abandoned: superseded, or offered by no peer for too long. No I/O.

A download whose content vanished everywhere would otherwise keep its journal row and its
part file (multi-GB for an NPZ) forever. Absence must be known, not guessed: a peer whose
index cannot be read (a network cut) counts as still offering what it offered when last
read, so a partition never throws away a download that resumes once it heals.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import dataclass

from ringsync.files.kinds import FileKind
from ringsync.files.manifest import Transfer
from ringsync.files.plan import Ident, IndexEntry
from ringsync.files.relay import MULTI_SOURCE

Version = tuple[FileKind, str, str]  # kind, relpath, content hash


@dataclass(frozen=True, slots=True)
class Abandoned:
    transfer: Transfer
    reason: str  # the metric label: "superseded" or "unoffered"
    why: str  # for the log line


class AbandonPolicy:
    """Told what peers offer each poll round, says which journalled transfers to drop.

    A transfer is *unoffered* when no peer offers its content at its path: readable peers
    by their current index, unreadable ones by the index they last served. A peer not
    read since this process started is unknown: it may be the transfer's journalled source
    (or, for an aria2 transfer, whose sources are not journalled, any of them), and then the
    transfer is kept. Unoffered for longer than ``grace`` seconds, continuously: abandoned.
    A transfer whose path is planned to get another version is *superseded* at once: its
    bytes can never become that version (an aria2 control file would even resume them).
    """

    def __init__(self, grace: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._grace = grace
        self._clock = clock
        # peer -> what its index offered when last read, of the versions journalled or planned
        # then (a transfer only starts for a planned version): bounded by the journal, not
        # by the cluster's file count times its peer count
        self._offers: dict[str, frozenset[Version]] = {}
        self._unknown: frozenset[str] = frozenset()  # polled peers never read yet
        self._missing_since: dict[Version, float] = {}

    def decide(self, polled: Iterable[str], indexes: Mapping[str, Iterable[IndexEntry]],
               transfers: Iterable[Transfer], planned: Mapping[Ident, str],
               busy: Set[Ident]) -> list[Abandoned]:
        """One poll round: ``polled`` peers were asked and ``indexes`` holds those that
        answered; ``planned``: the hash this round's plan fetches for a path; ``busy``:
        paths being fetched now (never dropped). Returns the transfers to drop now."""
        journal = list(transfers)
        relevant = {_version(t) for t in journal} | {(*i, h) for i, h in planned.items()}
        self._observe(frozenset(polled), indexes, relevant)
        for version in set(self._missing_since) - relevant:
            del self._missing_since[version]
        now, offered = self._clock(), frozenset().union(*self._offers.values())
        out = []
        for t in journal:
            absent = self._absent_for(t, offered, now)  # timed even while it is fetched
            if (t.kind, t.relpath) in busy:
                continue
            newer = planned.get((t.kind, t.relpath))
            if newer is not None and newer != t.hash:
                out.append(Abandoned(t, "superseded", f"superseded by version {newer[:16]}…"))
            elif absent > self._grace:
                out.append(Abandoned(t, "unoffered", f"no peer has offered its content for "
                                                     f"{absent:.0f} s"))
        return out

    def _observe(self, asked: frozenset[str], indexes: Mapping[str, Iterable[IndexEntry]],
                 relevant: Set[Version]) -> None:
        for peer, entries in indexes.items():
            self._offers[peer] = frozenset(v for e in entries if e.link_target is None
                                           if (v := (e.kind, e.relpath, e.hash)) in relevant)
        for peer in set(self._offers) - asked:  # left the inventory (or went offline in it)
            del self._offers[peer]
        self._unknown = asked - set(self._offers)

    def _absent_for(self, t: Transfer, offered: frozenset[Version], now: float) -> float:
        """Seconds no peer has offered ``t``'s content at its path, without a break."""
        version = _version(t)
        if version in offered or self._held_back(t):
            self._missing_since.pop(version, None)
            return 0.0
        return now - self._missing_since.setdefault(version, now)

    def _held_back(self, t: Transfer) -> bool:
        """A peer not read since start-up may offer it: the one its bytes came from, or, for
        an aria2 transfer (sources not journalled), any."""
        return bool(self._unknown) and (t.source in self._unknown or t.source == MULTI_SOURCE)


def _version(t: Transfer) -> Version:
    return (t.kind, t.relpath, t.hash)
