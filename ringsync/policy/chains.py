"""Fallback chains: which transports carry each data type, in the order tried, by size.

Parsed once from RINGRIFT_TRANSPORT_CHAINS (``games=http,ssh;large_files=aria2,http,rsync``);
what is not named keeps its default. A step a build does not provide (aria2 and rsync until
their transports land) is skipped and counted, never an error at run time, so one inventory
serves every node of a mixed fleet. No I/O: the daemons ask ``for_games`` / ``for_file``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = [
    "CHAIN_TRANSPORTS", "DEFAULT_LARGE_FILE_BYTES", "Outcome", "TransportChains", "parse_chains",
]

GAME_TRANSPORTS = ("http", "ssh")  # what can carry a games batch (the peer protocol)
CHAIN_TRANSPORTS = ("http", "ssh", "aria2", "rsync")
CHAIN_KEYS = ("games", "models", "training_data", "large_files")
DEFAULT_LARGE_FILE_BYTES = 64 * 1024 * 1024


class Outcome(enum.Enum):
    """What one step of a chain did (the ``outcome`` label of ringsync_transport_attempts_total)."""

    OK = "ok"  # delivered
    NEXT = "next"  # could not do it now: the next step is tried
    FAILED = "failed"  # a final answer for this attempt (the peer refused, the batch is bad)
    UNAVAILABLE = "unavailable"  # named in the chain, not provided by this build or node
    BREAKER_OPEN = "breaker_open"  # skipped: this (peer, transport)'s circuit breaker is open


@dataclass(frozen=True, slots=True)
class TransportChains:
    """The ordered transports per data type; files at or above ``large_file_bytes`` use
    ``large_files`` (multi-source first, where it exists)."""

    games: tuple[str, ...] = ("http",)
    models: tuple[str, ...] = ("http",)
    training_data: tuple[str, ...] = ("http",)
    large_files: tuple[str, ...] = ("aria2", "http", "rsync")
    large_file_bytes: int = DEFAULT_LARGE_FILE_BYTES
    named: frozenset[str] = field(default=frozenset())  # keys the operator set

    def describe(self) -> dict[str, object]:
        return {"games": list(self.games), "models": list(self.models),
                "training_data": list(self.training_data), "large_files": list(self.large_files),
                "large_file_bytes": self.large_file_bytes}

    def for_games(self) -> tuple[str, ...]:
        return self.games

    def for_file(self, data_type: str, size: int) -> tuple[str, ...]:
        """The chain for a file of ``data_type`` ('models' or 'training_data') and ``size``."""
        if size >= self.large_file_bytes:
            return self.large_files
        return self.models if data_type == "models" else self.training_data


def parse_chains(text: str, *, games_default: tuple[str, ...] = ("http",),
                 large_file_bytes: int = DEFAULT_LARGE_FILE_BYTES) -> TransportChains:
    """``key=t1,t2;key=t3`` into chains; ValueError names the bad part and what is allowed."""
    chains: dict[str, tuple[str, ...]] = {}
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        key, sep, names = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in CHAIN_KEYS:
            raise ValueError(f"has {part!r}; write key=transport,... with key one of "
                             f"{', '.join(CHAIN_KEYS)}, parts separated by ';'")
        if key in chains:
            raise ValueError(f"names {key} twice; give each data type one chain")
        chains[key] = _order(key, names.split(","))
    return TransportChains(
        games=chains.get("games", games_default),
        models=chains.get("models", ("http",)),
        training_data=chains.get("training_data", ("http",)),
        large_files=chains.get("large_files", ("aria2", "http", "rsync")),
        large_file_bytes=large_file_bytes, named=frozenset(chains))


def _order(key: str, names: list[str]) -> tuple[str, ...]:
    allowed = GAME_TRANSPORTS if key == "games" else CHAIN_TRANSPORTS
    order = tuple(n.strip().lower() for n in names if n.strip())
    if not order or any(n not in allowed for n in order) or len(set(order)) < len(order):
        raise ValueError(f"has {key}={','.join(names)}; {key} takes one or more of "
                         f"{', '.join(allowed)} without repeats, in the order to try them")
    return order
