"""ringsync.ops."""
