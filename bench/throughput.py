"""One sender, one receiver: how fast a backlog of pre-written 80-move games ships, vs rsync over SSH."""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sqlite3
import statistics
import time
from contextlib import closing
from pathlib import Path

from _common import (
    MB,
    checkpoint,
    cpu_seconds,
    emit_result,
    fmt,
    node_pid,
    print_table,
    run_bounded,
    running,
    synced_count,
    temp_root,
)
from _sshd import sshd_server

from ringsync.localcluster import Cluster
from ringsync.protocol.batch import config_key_for
from ringsync.selfplay_sim import PATTERNS, SelfplayWriter
from ringsync.store import ringrift_schema
from ringsync.store.gamemerge import TARGET_PAGE_SIZE

SENDER, RECEIVER = "selfplay-1", "train-1"
TARGET_GAMES_S = 2000.0
POLL = 0.05
PREFILL_CHUNK = 10_000


def prewrite(db: Path, games: int, seed: int, pattern: str) -> float:
    """Write ``games`` completed RingRift-sized games the way selfplay does; return seconds taken.

    The backlog is written (and checkpointed) before any node starts, so ``pattern`` only
    changes this setup and its duration, not what the nodes are timed on.
    """
    started = time.perf_counter()
    with SelfplayWriter(db, moves_per_game=80, seed=seed, pattern=pattern) as writer:
        for _ in range(games):
            writer.write_game()
    return time.perf_counter() - started


def prefill_receiver(db: Path, template_db: Path, games: int) -> float:
    """Give the receiver a merged DB already holding ``games`` games, as a long-running node has.

    The DB is created as the receiver creates one (16 KiB pages, WAL, RingRift's v18 schema
    with its indexes and triggers); then the first game of ``template_db`` is copied
    ``games`` times under fresh random ids with ``INSERT ... SELECT`` (child rows before the
    games rows, as the on-insert trigger requires). Returns the seconds taken.
    """
    started = time.perf_counter()
    db.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute(f"PRAGMA page_size={TARGET_PAGE_SIZE}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("BEGIN")
        ringrift_schema.create_schema(conn)
        conn.execute("COMMIT")
        conn.execute("ATTACH DATABASE ? AS tpl", (f"file:{template_db}?mode=ro",))
        template = conn.execute("SELECT game_id FROM tpl.games ORDER BY rowid LIMIT 1").fetchone()[0]
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM main.sqlite_master WHERE type='table' AND name <> 'games' "
            "AND name NOT LIKE 'sqlite_%'")]
        tables = [t for t in tables
                  if any(c[1] == "game_id" for c in conn.execute(f"PRAGMA main.table_info({t})"))]
        for start in range(0, games, PREFILL_CHUNK):
            n = min(PREFILL_CHUNK, games - start)
            conn.execute("BEGIN")
            conn.execute("CREATE TEMP TABLE ids AS WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL "
                         "SELECT i + 1 FROM k WHERE i < ?) SELECT lower(hex(randomblob(16))) AS id "
                         "FROM k", (n,))
            for table in [*tables, "games"]:  # the games rows last: enforce_moves_on_insert
                info = conn.execute(f"PRAGMA main.table_info({table})").fetchall()
                pks = [c for c in info if c[5]]
                alias = pks[0][1] if len(pks) == 1 and pks[0][2].upper() == "INTEGER" else None
                cols = [c[1] for c in info if c[1] != alias]  # SQLite numbers a rowid alias
                picks = ", ".join("ids.id" if c == "game_id" else f"t.{c}" for c in cols)
                conn.execute(f"INSERT INTO main.{table} ({', '.join(cols)}) SELECT {picks} "
                             f"FROM temp.ids CROSS JOIN tpl.{table} AS t WHERE t.game_id = ?",
                             (template,))
            conn.execute("DROP TABLE temp.ids")
            conn.execute("COMMIT")
        conn.execute("DETACH DATABASE tpl")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return time.perf_counter() - started


def rsync_reference(source: Path, runs: int, timeout: float, workdir: Path) -> list[float]:
    """`rsync -a` of the (checkpointed) DB file over SSH to an empty directory, ``runs`` times."""
    times = []
    with sshd_server() as ssh:
        for n in range(runs):
            dest = workdir / f"rsync-dest-{n}"
            dest.mkdir()
            times.append(run_bounded(["rsync", "-a", "-e", ssh.rsync_rsh(), str(source),
                                      ssh.target(f"{dest}/")], timeout))
            if (dest / source.name).stat().st_size != source.stat().st_size:
                raise RuntimeError("rsync copy has the wrong size")
    return times


def milestones(trace: list[tuple[float, int]], total: int) -> dict[int, float]:
    """Seconds after READY at which the receiver first held 20/50/100% of the games."""
    out = {}
    for pct in (20, 50, 100):
        hit = next((t for t, held in trace if held >= total * pct / 100), None)
        if hit is not None:
            out[pct] = hit
    return out


def longest_stall(trace: list[tuple[float, int]], end: float) -> tuple[int, float]:
    """(games held, seconds) of the longest time without progress between first and last game."""
    best = (0, 0.0)
    points = [*trace[1:], (end, -1)]
    for (t0, held), (t1, _) in itertools.pairwise(points):
        if t1 - t0 > best[1]:
            best = (held, t1 - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--games", type=int, default=10_000, help="backlog size (default 10000)")
    parser.add_argument("--sync-interval", type=float, default=60.0,
                        help="RINGRIFT_SYNC_INTERVAL of the nodes (default 60, the production default)")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds to wait for the receiver to hold every game (default 180)")
    parser.add_argument("--rsync-runs", type=int, default=3, help="reference runs (default 3)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--backlog-cache", type=Path, default=None,
                        help="directory keeping the pre-written backlog DB between runs (same "
                             "games and seed = same DB); saves the ~1.5 min write when iterating")
    parser.add_argument("--writer", choices=PATTERNS, default="per-op",
                        help="how the backlog is pre-written before the nodes start: per-op = a "
                             "connection per operation, RingRift's real writer (default); "
                             "long-lived = one connection. Only the setup changes: the nodes "
                             "are timed on the same checkpointed DB either way")
    parser.add_argument("--prefill", type=int, default=0,
                        help="games already in the receiver's merged DB before the sync, as on a "
                             "long-running training node (copies of one template game; default 0)")
    args = parser.parse_args(argv)

    with temp_root("throughput") as root:
        cluster = Cluster(root, [(SENDER, "gpu_selfplay"), (RECEIVER, "gpu_training_primary")],
                          sync_interval=args.sync_interval)
        db = cluster.nodes[SENDER].data_dir / "games" / "selfplay.db"
        cached = (args.backlog_cache / f"backlog-{args.games}-{args.seed}-{args.writer}.db"
                  if args.backlog_cache else None)
        if cached is not None and cached.exists():
            print(f"copying the pre-written backlog {cached} ...", flush=True)
            started = time.perf_counter()
            db.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cached, db)
            write_s = time.perf_counter() - started
        else:
            print(f"pre-writing {args.games} games of 80 moves ({args.writer} writer) ...", flush=True)
            write_s = prewrite(db, args.games, args.seed, args.writer)
            checkpoint(db)  # the file alone now holds every game: what rsync copies
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(db, cached)
        db_bytes = db.stat().st_size
        synced = cluster.nodes[RECEIVER].data_dir / "games" / "synced" / RECEIVER
        merged = synced / f"{config_key_for('hex8', 2)}.db"
        if args.prefill:
            print(f"pre-filling the receiver's {merged.name} with {args.prefill:,} games ...", flush=True)
            fill_s = prefill_receiver(merged, db, args.prefill)
            print(f"  {fmt(fill_s)} s, {fmt(merged.stat().st_size / MB)} MB", flush=True)
        os.sync()  # the pre-write's dirty pages are flushed now, not during the measurement
        print(f"  {fmt(write_s)} s, {fmt(db_bytes / MB)} MB", flush=True)

        with running(cluster):
            cluster.start(RECEIVER)
            recv_pid = node_pid(cluster, RECEIVER)
            recv_cpu0 = cpu_seconds(recv_pid)
            launched = time.perf_counter()
            cluster.start(SENDER)
            ready = time.perf_counter()
            send_pid = node_pid(cluster, SENDER)
            send_cpu_ready = cpu_seconds(send_pid)
            recv_cpu_ready = cpu_seconds(recv_pid)
            held, done = 0, None
            trace: list[tuple[float, int]] = [(0.0, 0)]  # (seconds since READY, games held)
            deadline = ready + args.timeout
            while time.perf_counter() < deadline:
                held = synced_count(synced) - args.prefill
                now = time.perf_counter()
                if held != trace[-1][1]:
                    trace.append((now - ready, held))
                if held >= args.games:
                    done = now
                    break
                time.sleep(POLL)
            send_cpu, recv_cpu = cpu_seconds(send_pid), cpu_seconds(recv_pid)
            sender_log = cluster.nodes[SENDER].log_tail(8)

        ref = rsync_reference(db, args.rsync_runs, args.timeout, root)

    ref_s = statistics.median(ref)
    elapsed = (done or time.perf_counter()) - ready
    games_s = (held if done is None else args.games) / elapsed
    mb_s = db_bytes / MB / elapsed
    met = done is not None and games_s >= TARGET_GAMES_S
    print_table(
        f"Backlog of {args.games} games (80 moves, {fmt(db_bytes / MB)} MB DB, {args.writer} pre-write), "
        f"1 sender -> 1 receiver holding {args.prefill:,} games, loopback",
        ["", "seconds", "games/s", "MB/s", "target"],
        [["ringsync (from sender READY)", fmt(elapsed, 2), fmt(games_s, 0), fmt(mb_s),
          f">= {TARGET_GAMES_S:,.0f} games/s"],
         ["ringsync (from sender launch)", fmt((done or time.perf_counter()) - launched, 2),
          fmt(args.games / ((done or time.perf_counter()) - launched), 0), "", ""],
         [f"rsync -a over SSH (median of {len(ref)})", fmt(ref_s, 2), fmt(args.games / ref_s, 0),
          fmt(db_bytes / MB / ref_s), "reference"]],
    )
    print_table(
        "CPU time (utime+stime from /proc/PID/stat)",
        ["process", "start-up until READY", "READY until done", "CPU / wall while syncing"],
        [["sender", f"{fmt(send_cpu_ready, 2)} s", f"{fmt(send_cpu - send_cpu_ready, 2)} s",
          f"{(send_cpu - send_cpu_ready) / elapsed:.0%}"],
         ["receiver", f"{fmt(recv_cpu_ready - recv_cpu0, 2)} s (during sender start)",
          f"{fmt(recv_cpu - recv_cpu_ready, 2)} s", f"{(recv_cpu - recv_cpu_ready) / elapsed:.0%}"]],
    )
    marks = milestones(trace, args.games)
    print("  progress: " + ", ".join(f"{p}% after {t:.2f} s" for p, t in marks.items()))
    stall_at, stall_s = longest_stall(trace, (done or time.perf_counter()) - ready)
    if stall_s > 1.0:
        print(f"  longest stall: {stall_s:.1f} s with {stall_at:,} games held (no delivery in between)")
    if done is None:
        print(f"  receiver held only {held} of {args.games} games after {args.timeout:g} s")
        print(f"  sender log tail:\n{sender_log}")
    print(f"  target met: {'yes' if met else 'NO'}")
    print("  note: rsync copies a file, which is only safe on a quiescent (checkpointed) DB; on a live\n"
          "  WAL DB it can copy a torn state and re-sends the whole file every time. ringsync reads\n"
          "  committed rows in a read transaction and merges each game exactly once.")
    emit_result("throughput", {
        "games": args.games, "db_mb": round(db_bytes / MB, 1), "writer": args.writer,
        "prefill": args.prefill, "complete": done is not None,
        "held": held, "seconds": round(elapsed, 2), "games_s": round(games_s, 0),
        "mb_s": round(mb_s, 1), "sender_cpu_s": round(send_cpu - send_cpu_ready, 2),
        "receiver_cpu_s": round(recv_cpu - recv_cpu_ready, 2), "target_games_s": TARGET_GAMES_S,
        "target_met": met, "sync_interval_s": args.sync_interval,
        "progress_s": {str(p): round(t, 2) for p, t in marks.items()},
        "longest_stall_s": round(stall_s, 1), "stall_at_games": stall_at,
        "ref_rsync_s": round(ref_s, 2), "ref_rsync_mb_s": round(db_bytes / MB / ref_s, 1),
        "ref_rsync_games_s": round(args.games / ref_s, 0),
    })
    return 0 if done is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
