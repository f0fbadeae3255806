"""A sender's first start with a large backlog: time to the first game, and peak memory.

The sender starts with ``--backlog`` completed games already in its source DB (as after an
outage, nothing in its manifest) and two empty trainers as targets. Figures: the time from
the sender's launch until a target holds its first game, the time until both hold all of
them, and the peak RSS (VmHWM) of the sender and of each receiver over the whole sync
(target <= 150 MB each). Reference in the same run: ``rsync -a`` of the same DB file to a
local directory (its first game is usable only when the whole copy is done).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import time
from pathlib import Path

from _common import (
    cpu_seconds,
    emit_result,
    fmt,
    node_pid,
    print_table,
    run_bounded,
    running,
    status_kb,
    synced_count,
    temp_root,
)
from _history import cached_source_db

from ringsync.localcluster import Cluster

SENDER, TARGETS = "selfplay-1", ("train-1", "train-2")
TARGET_MB = 150.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backlog", type=int, default=200_000, help="games waiting at first start")
    parser.add_argument("--moves", type=int, default=20, help="moves per game")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/sscale"), help="where the DB is kept")
    parser.add_argument("--timeout", type=float, default=1800.0, help="bound for the whole sync (s)")
    parser.add_argument("--scan-chunk-rows", type=int, default=None,
                        help="the sender's RINGRIFT_SCAN_CHUNK_ROWS (default: its own default)")
    args = parser.parse_args(argv)

    db = cached_source_db(args.cache, args.backlog, args.moves)
    with temp_root("backlog") as root:
        copy_dir = root / "rsync-copy"
        copy_dir.mkdir()
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        rsync_s = run_bounded(["rsync", "-a", str(db), str(copy_dir) + "/"], args.timeout)
        rsync_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        rsync_mb = rsync_kb / 1024 if rsync_kb > before else float("nan")
        shutil.rmtree(copy_dir)

        (root / "cluster").mkdir()
        cluster = Cluster(root / "cluster",
                          [(SENDER, "gpu_selfplay"), *((t, "gpu_training_primary") for t in TARGETS)],
                          sync_interval=5.0)
        sender = cluster.nodes[SENDER]
        if args.scan_chunk_rows is not None:
            sender.extra_env["RINGRIFT_SCAN_CHUNK_ROWS"] = str(args.scan_chunk_rows)
        (sender.data_dir / "games").mkdir(parents=True)
        shutil.copyfile(db, sender.data_dir / "games" / "hex8_2p.db")
        synced = {t: cluster.nodes[t].data_dir / "games" / "synced" / t for t in TARGETS}
        with running(cluster):
            for t in TARGETS:
                cluster.start(t)
            launched = time.monotonic()
            cluster.start(SENDER)
            ready_s = time.monotonic() - launched
            first_s = done_s = float("nan")
            deadline = launched + args.timeout
            while time.monotonic() < deadline:
                held = {t: synced_count(d) for t, d in synced.items()}
                now = time.monotonic() - launched
                if first_s != first_s and any(held.values()):
                    first_s = now
                if all(n >= args.backlog for n in held.values()):
                    done_s = now
                    break
                time.sleep(0.1 if first_s != first_s else 1.0)
            pids = {n: node_pid(cluster, n) for n in cluster.nodes}
            hwm = {n: status_kb(pid, "VmHWM") / 1024 for n, pid in pids.items()}
            cpu = {n: cpu_seconds(pid) for n, pid in pids.items()}

    worst = max(hwm.values())
    complete = done_s == done_s
    met = complete and worst <= TARGET_MB
    print_table(f"First start with a backlog of {args.backlog:,} games ({args.moves} moves), "
                f"{len(TARGETS)} targets; target peak RSS <= {TARGET_MB:g} MB per node",
                ["node", "VmHWM (MiB)", "CPU (s)"],
                [[n, fmt(hwm[n]), fmt(cpu[n], 1)] for n in cluster.nodes])
    print(f"  sender: READY {ready_s:.2f} s, first game at a target {first_s:.2f} s, all at both "
          f"{done_s:.1f} s ({args.backlog / done_s if complete else float('nan'):,.0f} games/s)")
    print(f"  rsync -a of the same DB ({db.stat().st_size / 1e6:,.0f} MB) to a local dir: "
          f"{rsync_s:.1f} s (first game usable then), peak RSS {rsync_mb:.1f} MiB")
    print(f"  target met: {'yes' if met else 'NO'}")
    emit_result("backlog", {
        "backlog": args.backlog, "moves": args.moves, "ready_s": round(ready_s, 2),
        "first_game_s": round(first_s, 2), "all_s": round(done_s, 1),
        **{f"{n.replace('-', '_')}_hwm_mb": round(v, 1) for n, v in hwm.items()},
        "rsync_s": round(rsync_s, 1), "rsync_hwm_mb": round(rsync_mb, 1),
        "target_mb": TARGET_MB, "target_met": met,
    })
    return 0 if complete else 1


if __name__ == "__main__":
    raise SystemExit(main())
