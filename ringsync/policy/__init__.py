"""ringsync.policy."""
