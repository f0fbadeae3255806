"""Node profiles: which daemons a node role runs."""
