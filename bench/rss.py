"""Idle resident memory (VmRSS, VmHWM) of `ringsync run` nodes, before and after syncing 10,000 games."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from _common import (
    checkpoint,
    emit_result,
    node_pid,
    print_table,
    running,
    status_kb,
    synced_count,
    temp_root,
)

from ringsync.localcluster import Cluster
from ringsync.selfplay_sim import PATTERNS, SelfplayWriter

SENDER, RECEIVER = "selfplay-1", "train-1"
TARGET_MB = 80.0


def memory(cluster: Cluster) -> dict[str, tuple[float, float]]:
    """(VmRSS, VmHWM) in MiB per node (the kernel reports kB = KiB)."""
    out = {}
    for name in cluster.nodes:
        pid = node_pid(cluster, name)
        out[name] = (status_kb(pid, "VmRSS") / 1024, status_kb(pid, "VmHWM") / 1024)
    return out


def prewrite(staging: Path, games: int, seed: int, pattern: str) -> None:
    """Write the games outside the data dir; ``pattern`` changes only this setup, not the readings."""
    with SelfplayWriter(staging, moves_per_game=80, seed=seed, pattern=pattern) as writer:
        for _ in range(games):
            writer.write_game()
    checkpoint(staging)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--games", type=int, default=10_000, help="games synced before the second reading")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idling before each reading")
    parser.add_argument("--sync-interval", type=float, default=5.0,
                        help="RINGRIFT_SYNC_INTERVAL (default 5: a backlog drains in 2,000-game cycles)")
    parser.add_argument("--timeout", type=float, default=300.0, help="bound for the sync (s)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--writer", choices=PATTERNS, default="per-op",
                        help="how the games are pre-written (before the rename that hands them to "
                             "the sender): per-op, RingRift's real writer (default), or long-lived")
    args = parser.parse_args(argv)

    with temp_root("rss") as root:
        cluster = Cluster(root, [(SENDER, "gpu_selfplay"), (RECEIVER, "gpu_training_primary")],
                          sync_interval=args.sync_interval)
        staging = root / "staging" / "selfplay.db"
        print(f"pre-writing {args.games} games outside the data dir ({args.writer} writer) ...", flush=True)
        prewrite(staging, args.games, args.seed, args.writer)
        synced = cluster.nodes[RECEIVER].data_dir / "games" / "synced" / RECEIVER
        with running(cluster):
            cluster.start_all()
            time.sleep(args.idle)
            before = memory(cluster)
            games_dir = cluster.nodes[SENDER].data_dir / "games"
            games_dir.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            os.rename(staging, games_dir / staging.name)  # appears at once, complete (inotify MOVED_TO)
            held = 0
            while time.monotonic() - started < args.timeout:
                held = synced_count(synced)
                if held >= args.games:
                    break
                time.sleep(0.2)
            sync_s = time.monotonic() - started
            time.sleep(args.idle)
            after = memory(cluster)

    rows = []
    for name in cluster.nodes:
        rows.append([name, "idle after start", f"{before[name][0]:.1f}", f"{before[name][1]:.1f}"])
        rows.append([name, f"idle after syncing {held:,} games", f"{after[name][0]:.1f}",
                     f"{after[name][1]:.1f}"])
    worst = max(v[0] for v in (*before.values(), *after.values()))
    met = worst <= TARGET_MB and held >= args.games
    print_table(f"Resident memory of `ringsync run` (MiB), target VmRSS <= {TARGET_MB:g} MiB",
                ["node", "when", "VmRSS", "VmHWM (peak)"], rows)
    print(f"  sync of {held:,}/{args.games:,} games took {sync_s:.1f} s; "
          f"target met: {'yes' if met else 'NO'}")
    emit_result("rss", {
        "games": args.games, "writer": args.writer, "held": held, "sync_s": round(sync_s, 1),
        **{f"{n.replace('-', '_')}_idle_rss_mb": round(before[n][0], 1) for n in cluster.nodes},
        **{f"{n.replace('-', '_')}_after_rss_mb": round(after[n][0], 1) for n in cluster.nodes},
        **{f"{n.replace('-', '_')}_after_hwm_mb": round(after[n][1], 1) for n in cluster.nodes},
        "max_rss_mb": round(worst, 1), "target_mb": TARGET_MB, "target_met": met,
    })
    return 0 if held >= args.games else 1


if __name__ == "__main__":
    raise SystemExit(main())
