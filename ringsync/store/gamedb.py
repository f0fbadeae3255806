"""Game DBs: extract completed games from a live selfplay DB, merge batches at the receiver."""

from ringsync.protocol.results import MergeResult
from ringsync.store._sqlite import count_games, game_ids
from ringsync.store.discovery import discover_sources
from ringsync.store.gamemerge import GameMerger
from ringsync.store.gamesource import GameSource, SourceGame

__all__ = [
    "GameMerger",
    "GameSource",
    "MergeResult",
    "SourceGame",
    "count_games",
    "discover_sources",
    "game_ids",
]
