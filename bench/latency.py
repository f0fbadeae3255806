"""Commit-to-receiver latency of completed games between two real `ringsync run` nodes on loopback."""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    emit_result,
    parse_counts,
    percentile,
    place_prefilled,
    print_table,
    release_in_place,
    running,
    stopped_cleanly,
    temp_root,
)

from ringsync.localcluster import Cluster
from ringsync.protocol.batch import config_key_for
from ringsync.selfplay_sim import MODES, PATTERNS, SelfplayWriter
from ringsync.store.gamemerge import DEFAULT_SHARD_BYTES

SENDER, RECEIVER = "selfplay-1", "train-1"
POLL_INTERVAL = 0.002
OLD_POLL_INTERVAL = 60.0  # the retired system pulled every 60 s: latency ~ uniform(0, 60)
TARGET_P50, TARGET_P99 = 0.5, 2.0
TARGET_RATIO = 2.0  # p50 at 1M held over p50 into an empty receiver (issue 7)


@dataclass
class Timings:
    committed: dict[str, float] = field(default_factory=dict)
    arrived: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    write_seconds: list[float] = field(default_factory=list)
    polls: int = 0
    poll_seconds: float = 0.0


def write_games(db: Path, games: int, rate: float, seed: int, timings: Timings,
                stop: threading.Event, *, pattern: str, mode: str) -> None:
    """Write games at a steady rate, recording the wall time right after each game's last commit.

    With ``pattern="per-op"`` the time is taken after the operation's connection closed (and,
    when no other connection was open, checkpointed the WAL and deleted -wal/-shm): the
    commit happened up to one close earlier, so a latency is short by at most that much.
    ``timings.write_seconds`` keeps how long each game's save took, close included.
    """
    with SelfplayWriter(db, moves_per_game=80, seed=seed, pattern=pattern, mode=mode) as writer:
        started = time.monotonic()
        for n in range(1, games + 1):
            if stop.is_set():
                return
            t0 = time.perf_counter()
            game_id = writer.write_game()
            now = time.time()
            with timings.lock:
                timings.committed[game_id] = now
                timings.write_seconds.append(time.perf_counter() - t0)
            stop.wait(max(0.0, started + n / rate - time.monotonic()))


def top_rowid(db: Path) -> int:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0)) as conn:
        return int(conn.execute("SELECT coalesce(max(rowid), 0) FROM games").fetchone()[0])


def watch_receiver(synced_dir: Path, timings: Timings, stop: threading.Event) -> None:
    """Poll the receiver's merged DBs every POLL_INTERVAL for rows beyond the last rowid seen."""
    conns: dict[Path, sqlite3.Connection] = {}
    last_rowid: dict[Path, int] = {}
    held_rowid = {db: top_rowid(db) for db in synced_dir.glob("*.db")}  # before any write
    next_glob = 0.0
    first_poll = time.monotonic()
    try:
        while not stop.is_set():
            now_m = time.monotonic()
            if now_m >= next_glob:  # new config DBs appear rarely: look for them every 100 ms
                next_glob = now_m + 0.1
                for db in synced_dir.glob("*.db"):
                    if db not in conns:
                        conns[db] = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0)
                        # A pre-filled DB's rows are history, not arrivals: reading a million
                        # of them in the first poll would delay the first games' detection.
                        last_rowid[db] = held_rowid.get(db, 0)
            for db, conn in conns.items():
                try:
                    rows = conn.execute("SELECT rowid, game_id FROM games WHERE rowid > ?",
                                        (last_rowid[db],)).fetchall()
                except sqlite3.OperationalError:
                    continue  # the games table is not created yet
                if rows:
                    seen = time.time()
                    with timings.lock:
                        for _rowid, game_id in rows:
                            timings.arrived.setdefault(game_id, seen)
                    last_rowid[db] = max(r[0] for r in rows)
            timings.polls += 1
            stop.wait(POLL_INTERVAL)
    finally:
        timings.poll_seconds = time.monotonic() - first_poll
        for conn in conns.values():
            conn.close()


def wait_for(timings: Timings, ids: set[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with timings.lock:
            if ids <= timings.arrived.keys():
                return
        time.sleep(0.05)


@dataclass
class Case:
    """The latencies of one run against a receiver already holding ``prefill`` games."""

    prefill: int
    timings: Timings
    warmup: int
    sender_log: str = ""
    prefill_note: str = ""

    @property
    def order(self) -> list[str]:
        return sorted(self.timings.committed, key=self.timings.committed.__getitem__)[self.warmup:]

    @property
    def latencies(self) -> list[float]:
        t = self.timings
        return [t.arrived[g] - t.committed[g] for g in self.order if g in t.arrived]


def run_case(root: Path, args: argparse.Namespace, prefill: int) -> Case:
    """Two fresh nodes, the receiver's merged DB pre-filled with ``prefill`` games; write and time."""
    root.mkdir()
    cluster = Cluster(root, [(SENDER, "gpu_selfplay"), (RECEIVER, "gpu_training_primary")],
                      sync_interval=60)
    db = cluster.nodes[SENDER].data_dir / "games" / "selfplay.db"
    SelfplayWriter(db, pattern=args.writer).close()  # the DB exists (empty) before the nodes start
    synced = cluster.nodes[RECEIVER].data_dir / "games" / "synced" / RECEIVER
    cluster.nodes[RECEIVER].extra_env["RINGRIFT_MERGED_SHARD_MB"] = str(args.shard_mb)
    case = Case(prefill, Timings(), args.warmup)
    if prefill:
        template = root / "template.db"
        with SelfplayWriter(template, moves_per_game=80, seed=args.seed + 1) as tpl:
            tpl.write_game()
        print(f"pre-filling the receiver's merged DB with {prefill:,} games ...", flush=True)
        case.prefill_note = place_prefilled(synced / f"{config_key_for('hex8', 2)}.db", template,
                                            prefill, args.prefill_cache,
                                            in_place=args.prefill_in_place,
                                            shard_bytes=args.shard_mb << 20)
        print(f"  {case.prefill_note}", flush=True)
        os.sync()
    timings, stop = case.timings, threading.Event()
    with running(cluster):
        cluster.start_all()
        watcher = threading.Thread(target=watch_receiver, args=(synced, timings, stop), daemon=True)
        watcher.start()
        try:
            total = args.warmup + args.games
            writer = threading.Thread(target=write_games,
                                      args=(db, total, args.rate, args.seed, timings, stop),
                                      kwargs={"pattern": args.writer, "mode": args.mode},
                                      daemon=True)
            writer.start()
            writer.join(total / args.rate * 3 + 60)
            if writer.is_alive():
                raise RuntimeError("the writer fell far behind its schedule")
            with timings.lock:
                ids = set(timings.committed)
            wait_for(timings, ids, args.timeout)
        finally:
            stop.set()
            watcher.join(10)
        case.sender_log = cluster.nodes[SENDER].log_tail(5)
    if prefill and args.prefill_in_place and stopped_cleanly(cluster, RECEIVER):
        release_in_place(args.prefill_cache, prefill, args.shard_mb << 20)
    shutil.rmtree(root, ignore_errors=True)  # a 1M-game merged DB is ~30 GB: one at a time
    return case


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--games", type=int, default=1000, help="measured games (default 1000)")
    parser.add_argument("--rate", type=float, default=50.0, help="completed games/s (default 50)")
    parser.add_argument("--warmup", type=int, default=20,
                        help="games written and delivered first, not measured (default 20)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--writer", choices=PATTERNS, default="per-op",
                        help="how the generator writes, live during the measurement: per-op = a "
                             "connection per operation, RingRift's real writer (default); "
                             "long-lived = one connection for the writer's life")
    parser.add_argument("--mode", choices=MODES, default="bulk",
                        help="bulk = RingRift's store_game, a whole game in one transaction "
                             "(default); incremental = GameWriter, one commit per move")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for stragglers after the last commit (default 60)")
    parser.add_argument("--prefill", type=parse_counts, default=[0],
                        help="games already in the receiver's merged DB (copies of one 80-move "
                             "game); a comma-separated list runs each case in turn, e.g. "
                             "0,1000000 (default 0)")
    parser.add_argument("--prefill-cache", type=Path, default=None,
                        help="directory keeping each pre-filled merged DB between runs (a "
                             "1M-game one is ~30 GB); copied per run")
    parser.add_argument("--shard-mb", type=int, default=DEFAULT_SHARD_BYTES >> 20,
                        help="the receiver's RINGRIFT_MERGED_SHARD_MB, and the shards the "
                             "pre-filled games are laid out in (default %(default)s, the "
                             "nodes' default; 0: one merged DB)")
    parser.add_argument("--prefill-in-place", action="store_true",
                        help="hard-link the cached pre-filled DB instead of copying it (when two "
                             "~30 GB copies do not fit on the disk); each run adds its games to it")
    args = parser.parse_args(argv)
    if args.prefill_in_place:  # the cached DB keeps earlier runs' games: this run's are new to it
        args.seed += time.time_ns() % 1_000_000_007

    with temp_root("latency") as root:
        cases = [run_case(root / f"prefill-{n}", args, n) for n in args.prefill]
    return report(args, cases)


def report(args: argparse.Namespace, cases: list[Case]) -> int:
    rows: list[list[str]] = []
    figures: list[dict[str, Any]] = []
    for c in cases:
        lat, order, t = c.latencies, c.order, c.timings
        missing = len(order) - len(lat)
        p50, p90, p99 = (percentile(lat, q) for q in (50, 90, 99))
        worst = max(lat) if lat else float("nan")
        rows.append([f"ringsync, receiver held {c.prefill:,}", f"{p50 * 1000:.1f} ms",
                     f"{p90 * 1000:.1f} ms", f"{p99 * 1000:.1f} ms", f"{worst * 1000:.1f} ms",
                     f"p50 <= {TARGET_P50} s, p99 <= {TARGET_P99} s"])
        saves = t.write_seconds[args.warmup:]
        figures.append({
            "prefill": c.prefill, "delivered": len(lat), "missing": missing,
            "p50_ms": round(p50 * 1000, 1), "p90_ms": round(p90 * 1000, 1),
            "p99_ms": round(p99 * 1000, 1), "max_ms": round(worst * 1000, 1),
            "save_p50_ms": round(percentile(saves, 50) * 1000, 1),
            "save_p99_ms": round(percentile(saves, 99) * 1000, 1),
            "poll_period_ms": round(t.poll_seconds / max(1, t.polls) * 1000, 2),
            "prefill_setup": c.prefill_note,
        })
    rows.append(["old 60 s poll (analytical)", "30.0 s", "54.0 s", "59.4 s", "60.0 s", "-"])
    print_table(
        f"Commit -> receiver latency, {args.games} games (80 moves) at {args.rate:g} games/s, "
        f"2 nodes on loopback, writer {args.writer}/{args.mode}",
        ["", "p50", "p90", "p99", "max", "target"], rows)
    for c, f in zip(cases, figures, strict=True):
        order = c.order
        print(f"  held {c.prefill:,}: {f['delivered']:,} latencies (warm-up {args.warmup} excluded, "
              f"{f['missing']} not delivered within {args.timeout:g} s); receiver polled every "
              f"{POLL_INTERVAL * 1000:.0f} ms (mean {f['poll_period_ms']} ms); one game's save "
              f"p50 {f['save_p50_ms']} ms, p99 {f['save_p99_ms']} ms (the clock starts when it returns)")
        worst3 = sorted(((c.timings.arrived[g] - c.timings.committed[g], n) for n, g in enumerate(order)
                         if g in c.timings.arrived), reverse=True)[:3]
        print("    slowest: " + ", ".join(f"game {n + 1} of {len(order)}: {s * 1000:,.1f} ms"
                                          for s, n in worst3))
        if f["missing"]:
            print(f"    sender log tail:\n{c.sender_log}")
    first, last = figures[0], figures[-1]
    ratio = last["p50_ms"] / first["p50_ms"] if first["p50_ms"] else float("nan")
    if len(cases) > 1:
        print(f"  p50 at {last['prefill']:,} held / p50 at {first['prefill']:,} held: {ratio:.2f} "
              f"(target <= {TARGET_RATIO:g})")
    ok = all(f["missing"] == 0 and f["p50_ms"] <= TARGET_P50 * 1000 and f["p99_ms"] <= TARGET_P99 * 1000
             for f in figures) and (len(cases) == 1 or ratio <= TARGET_RATIO)
    print(f"  target met: {'yes' if ok else 'NO'}")
    emit_result("latency", {
        "games": args.games, "rate_games_s": args.rate, "writer": args.writer, "mode": args.mode,
        **{k: v for k, v in first.items() if k != "prefill_setup"},
        "target_met": ok, "cases": figures, "scale_ratio_p50": round(ratio, 2),
        "reference": "old 60 s polling, uniform(0,60) s", "ref_p50_s": 30.0, "ref_p99_s": 59.4,
    })
    return 0 if all(f["missing"] == 0 for f in figures) else 1


if __name__ == "__main__":
    raise SystemExit(main())
