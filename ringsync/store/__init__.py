"""ringsync.store."""
