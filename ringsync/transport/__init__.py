"""ringsync.transport."""
