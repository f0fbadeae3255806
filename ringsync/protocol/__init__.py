"""ringsync.protocol."""
