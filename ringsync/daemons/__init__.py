"""ringsync.daemons."""
