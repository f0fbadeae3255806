"""RingRift's game rules that the protocol and the store both apply (one home for each)."""

from __future__ import annotations

__all__ = ["COMPLETED_STATUSES", "MIN_MOVES_REQUIRED"]

# RingRift's insert trigger refuses a completed game with fewer moves than this.
MIN_MOVES_REQUIRED = 5
# A finished game's status: 'completed', legacy 'finished' (what RingRift's triggers check).
COMPLETED_STATUSES = frozenset({"completed", "finished"})
