"""A sender restarting with a long history: CPU and peak memory until shipping resumes.

The sender's source DB holds ``--history`` completed games (short games of ``--moves``
moves, to keep the disk small; cached under ``--cache``), every one already recorded as
held by both targets, as a sender that shipped them leaves its manifest (recorded here with
the library, in-process, to avoid shipping a million games first). The sender starts, and
once READY one new game is written (RingRift's per-op writer); the figure is the sender's
CPU time and peak RSS (VmHWM) from launch until both targets hold that game.

The same run restarts once more without the saved scan cursor (the foundation's path:
the whole history is read again) as the reference.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from _common import cpu_seconds, emit_result, fmt, node_pid, print_table, running, status_kb, temp_root
from _history import cached_source_db

from ringsync.daemons.auto_sync._sources import saved_scan
from ringsync.localcluster import Cluster, read_game_ids
from ringsync.selfplay_sim import SelfplayWriter
from ringsync.store.gamesource import GameSource
from ringsync.store.manifest import DataManifest, LocalGame

SENDER, TARGETS = "selfplay-1", ("train-1", "train-2")
SOURCE_KEY = "games/hex8_2p.db"
TARGET_CPU_S, TARGET_MB = 1.0, 100.0
CHUNK = 20_000


def record_history(manifest_path: Path, db: Path) -> int:
    """Record every game of ``db`` as delivered to both targets, and the scan's cursor."""
    manifest = DataManifest(manifest_path)
    source = GameSource(db)
    total = 0
    try:
        manifest.ensure_targets(TARGETS)
        while True:
            scan = source.scan_all(max_rows=CHUNK)
            games = [LocalGame(g.game_id, SOURCE_KEY, g.config_key) for g in scan.completed]
            manifest.record_discovered(games, TARGETS)
            for target in TARGETS:
                manifest.ack(target, [g.game_id for g in games])
            total += len(games)
            if not scan.more:
                break
        manifest.save_scan_cursor(SOURCE_KEY, saved_scan(db.stat().st_ino, source.state()))
    finally:
        source.close()
        manifest.close()
    return total


def restart(root: Path, db: Path, manifest: Path, *, cursor: bool, timeout: float) -> dict[str, float]:
    """Start the sender on a copy of the history; readings until the new game is held."""
    root.mkdir(parents=True)
    cluster = Cluster(root, [(SENDER, "gpu_selfplay"), *((t, "gpu_training_primary") for t in TARGETS)],
                      sync_interval=60.0)
    sender = cluster.nodes[SENDER]
    live = sender.data_dir / SOURCE_KEY
    live.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(db, live)  # a copy: the new game must not change the cached history
    state = sender.data_dir / ".ringsync" / SENDER
    state.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(manifest, state / "manifest.db")
    with closing(sqlite3.connect(state / "manifest.db")) as conn, conn:
        if cursor:  # the cursor was saved for the cached file: give it the live file's inode
            conn.execute("UPDATE scan_cursors SET state = json_set(state, '$.inode', ?)",
                         (live.stat().st_ino,))
        else:
            conn.execute("DELETE FROM scan_cursors")
    with running(cluster):
        for t in TARGETS:
            cluster.start(t)
        launched = time.monotonic()
        cluster.start(SENDER)
        ready_s = time.monotonic() - launched
        pid = node_pid(cluster, SENDER)
        ready_cpu = cpu_seconds(pid)  # interpreter start and imports, before any scan
        with SelfplayWriter(live, moves_per_game=20, seed=int(launched)) as writer:
            new = writer.write_game()
        deadline = time.monotonic() + timeout
        while not all(new in _held(cluster, t) for t in TARGETS):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the new game did not reach both targets in {timeout}s:\n"
                                   f"{sender.log_tail()}")
            time.sleep(0.05)
        resumed_s = time.monotonic() - launched
        cpu = cpu_seconds(pid)
        hwm = status_kb(pid, "VmHWM") / 1024
    return {"ready_s": ready_s, "ready_cpu_s": ready_cpu, "resumed_s": resumed_s, "cpu_s": cpu,
            "hwm_mb": hwm}


def _held(cluster: Cluster, target: str) -> set[str]:
    out: set[str] = set()
    for db in (cluster.nodes[target].data_dir / "games" / "synced" / target).glob("*.db"):
        try:
            out.update(read_game_ids(db))
        except sqlite3.OperationalError:
            continue  # created but no games table yet
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--history", type=int, default=1_000_000, help="games already shipped")
    parser.add_argument("--moves", type=int, default=5, help="moves per history game (short, to save disk)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/sscale"),
                        help="where the history DB and its manifest are kept")
    parser.add_argument("--timeout", type=float, default=600.0, help="bound per restart (s)")
    parser.add_argument("--skip-reference", action="store_true", help="no restart without the cursor")
    args = parser.parse_args(argv)

    db = cached_source_db(args.cache, args.history, args.moves)
    manifest = args.cache / f"manifest_{args.history}_{args.moves}m.db"
    if not manifest.exists():
        started = time.monotonic()
        part = manifest.with_name(manifest.name + ".building")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{part}{suffix}").unlink(missing_ok=True)
        n = record_history(part, db)
        with closing(sqlite3.connect(part)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        os.replace(part, manifest)
        print(f"  recorded {n:,} games as delivered in {time.monotonic() - started:.0f} s", flush=True)
    with closing(sqlite3.connect(manifest)) as conn:
        pages = [conn.execute(f"PRAGMA {p}").fetchone()[0]
                 for p in ("page_count", "freelist_count", "page_size")]
    per_game = (pages[0] - pages[1]) * pages[2] / args.history  # free pages are reused

    runs: dict[str, dict[str, float]] = {}
    with temp_root("restart") as root:
        runs["saved cursor"] = restart(root / "cursor", db, manifest, cursor=True, timeout=args.timeout)
        if not args.skip_reference:
            runs["no cursor (reference)"] = restart(root / "nocursor", db, manifest, cursor=False,
                                                    timeout=args.timeout)
    ours = runs["saved cursor"]
    met = ours["cpu_s"] <= TARGET_CPU_S and ours["hwm_mb"] <= TARGET_MB
    print_table(f"Sender restart with {args.history:,} games of history ({args.moves}-move games); "
                f"target <= {TARGET_CPU_S:g} CPU-s and <= {TARGET_MB:g} MB peak RSS",
                ["restart", "READY (s)", "CPU at READY (s)", "new game at both targets (s)",
                 "CPU (s)", "VmHWM (MiB)"],
                [[name, fmt(r["ready_s"], 2), fmt(r["ready_cpu_s"], 2), fmt(r["resumed_s"], 2),
                  fmt(r["cpu_s"], 2), fmt(r["hwm_mb"])] for name, r in runs.items()])
    print(f"  manifest: {per_game:.0f} bytes per game in use ({manifest.stat().st_size / 1e6:,.1f} MB "
          f"file); the foundation's: ~304 bytes per game at 2 targets; "
          f"target met: {'yes' if met else 'NO'}")
    ref = runs.get("no cursor (reference)", {})
    emit_result("restart", {
        "history": args.history, "moves": args.moves,
        "cpu_s": round(ours["cpu_s"], 2), "hwm_mb": round(ours["hwm_mb"], 1),
        "resumed_s": round(ours["resumed_s"], 2), "ready_s": round(ours["ready_s"], 2),
        "ready_cpu_s": round(ours["ready_cpu_s"], 2),
        "ref_cpu_s": round(ref["cpu_s"], 2) if ref else None,
        "ref_hwm_mb": round(ref["hwm_mb"], 1) if ref else None,
        "ref_resumed_s": round(ref["resumed_s"], 2) if ref else None,
        "manifest_bytes_per_game": round(per_game, 1),
        "target_cpu_s": TARGET_CPU_S, "target_mb": TARGET_MB, "target_met": met,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
