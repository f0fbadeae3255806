"""`python -m ringsync.auto_sync_daemon`: the auto-sync daemon alone, with the data server it needs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ringsync import __version__
from ringsync.cli import main

PROG = "python -m ringsync.auto_sync_daemon"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run ringsync's auto-sync daemon on its own, with the data server it needs: "
        "it pushes this node's completed games to their training and storage nodes as soon as "
        "they are committed. The same as `ringsync run --daemon auto_sync`.",
        epilog="Configured by RINGRIFT_* variables (every one is in .env.example): at least "
        "RINGRIFT_NODE_ID, RINGRIFT_DATA_DIR, RINGRIFT_CLUSTER_CONFIG and the cluster token. "
        "Exit codes: 0 stopped, 2 configuration error, 3 restart budget spent.",
    )
    parser.add_argument("--version", action="version", version=f"ringsync {__version__}")
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    _parser().parse_args(sys.argv[1:] if argv is None else argv)
    return main(["run", "--daemon", "auto_sync"])


if __name__ == "__main__":
    sys.exit(run())
