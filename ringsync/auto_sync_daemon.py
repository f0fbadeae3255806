"""`python -m ringsync.auto_sync_daemon`: the auto-sync daemon alone, with the data server it needs."""

from __future__ import annotations

import sys

from ringsync.cli import main


def run() -> int:
    return main(["run", "--daemon", "auto_sync", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(run())
