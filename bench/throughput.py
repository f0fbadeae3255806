"""One sender, one receiver: how fast a backlog of pre-written 80-move games ships, vs rsync over SSH."""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import (
    MB,
    checkpoint,
    cpu_seconds,
    emit_result,
    fmt,
    io_counter,
    node_pid,
    parse_counts,
    place_prefilled,
    prefill_receiver,
    print_table,
    release_in_place,
    run_bounded,
    running,
    status_kb,
    stopped_cleanly,
    synced_count,
    temp_root,
)
from _sshd import sshd_server

from ringsync.localcluster import Cluster
from ringsync.protocol.batch import config_key_for
from ringsync.selfplay_sim import PATTERNS, SelfplayWriter
from ringsync.store.gamemerge import DEFAULT_SHARD_BYTES
from ringsync.store.gamesource import GameSource

SENDER, RECEIVER = "selfplay-1", "train-1"
TARGET_GAMES_S = 2000.0
TARGET_SCALE_GAMES_S = 1500.0  # into a receiver already holding 1M games (issue 7)
TARGET_RATIO = 0.5  # games/s at 1M held over games/s into an empty receiver
TARGET_WRITE_FACTOR = 3.0  # receiver disk bytes written per game over the batch payload per game
POLL = 0.05


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


@dataclass(frozen=True)
class Incremental:
    """rsync of a DB it had already copied, after ``added`` games were added to it."""

    base: int
    added: int
    db_bytes: int
    sent_bytes: int
    seconds: float


def rsync_incremental(template: Path, base: int, added: int, timeout: float, workdir: Path) -> Incremental:
    """rsync a ``base``-game DB over SSH, add ``added`` games, rsync again: what the second costs.

    rsync's delta transfer re-sends every block that changed; a few new games touch index
    pages all over the file. The games are copies of the template's first game (80 moves).
    """
    db = workdir / "incremental" / "games.db"
    print(f"rsync incremental case: building a {base:,}-game DB ...", flush=True)
    prefill_receiver(db, template, base)
    dest = workdir / "incremental-dest"
    dest.mkdir()
    with sshd_server() as ssh:
        command = ["rsync", "-a", "--stats", "-e", ssh.rsync_rsh(), str(db), ssh.target(f"{dest}/")]
        run_bounded(command, timeout)
        prefill_receiver(db, template, added)  # appends: the schema exists, page size is kept
        started = time.perf_counter()
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True).stdout
        seconds = time.perf_counter() - started
    match = re.search(r"Total bytes sent: ([\d,.]+)", out)
    if match is None:
        raise RuntimeError(f"no 'Total bytes sent' in rsync --stats output:\n{out[-1000:]}")
    sent = int(match.group(1).replace(",", "").replace(".", ""))
    size = db.stat().st_size
    shutil.rmtree(db.parent, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    return Incremental(base, added, size, sent, seconds)


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


def payload_per_game(db: Path, batch_games: int) -> float:
    """Batch image bytes per game when ``db``'s games ship in batches of ``batch_games``."""
    source = GameSource(db)
    try:
        ids = [g.game_id for g in source.scan()]
        total = 0
        for start in range(0, len(ids), batch_games):
            total += sum(len(b.image) for b in source.extract(ids[start:start + batch_games],
                                                               source_node=SENDER))
    finally:
        source.close()
    return total / max(1, len(ids))


@dataclass
class Case:
    """One sync of the backlog into a receiver already holding ``prefill`` games."""

    prefill: int
    prefill_note: str = ""
    done: bool = False
    held: int = 0
    elapsed: float = 0.0
    from_launch: float = 0.0
    send_cpu_ready: float = 0.0
    send_cpu: float = 0.0
    recv_cpu_start: float = 0.0
    recv_cpu: float = 0.0
    recv_written: int = 0  # /proc/PID/io write_bytes
    recv_wchar: int = 0  # /proc/PID/io wchar: bytes SQLite (and the HTTP replies) wrote
    recv_hwm_kib: int = 0
    trace: list[tuple[float, int]] = field(default_factory=list)
    sender_log: str = ""

    @property
    def games_s(self) -> float:
        return self.held / self.elapsed if self.elapsed else 0.0


def run_case(root: Path, backlog: Path, args: argparse.Namespace, prefill: int) -> Case:
    """Start a fresh receiver (its merged DB pre-filled) and sender; time the backlog's sync."""
    case = Case(prefill)
    root.mkdir()
    cluster = Cluster(root, [(SENDER, "gpu_selfplay"), (RECEIVER, "gpu_training_primary")],
                      sync_interval=args.sync_interval)
    db = cluster.nodes[SENDER].data_dir / "games" / "selfplay.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(backlog, db)
    synced = cluster.nodes[RECEIVER].data_dir / "games" / "synced" / RECEIVER
    merged = synced / f"{config_key_for('hex8', 2)}.db"
    cluster.nodes[RECEIVER].extra_env["RINGRIFT_MERGED_SHARD_MB"] = str(args.shard_mb)
    if prefill:
        print(f"pre-filling the receiver's {merged.name} with {prefill:,} games ...", flush=True)
        case.prefill_note = place_prefilled(merged, backlog, prefill, args.prefill_cache,
                                            in_place=args.prefill_in_place,
                                            shard_bytes=args.shard_mb << 20)
        print(f"  {case.prefill_note}", flush=True)
    base = synced_count(synced)  # the prefill, or more: an in-place cache grows run by run
    os.sync()  # the copies' dirty pages are flushed now, not during the measurement
    with running(cluster):
        cluster.start(RECEIVER)
        recv_pid = node_pid(cluster, RECEIVER)
        recv_cpu0 = cpu_seconds(recv_pid)
        launched = time.perf_counter()
        cluster.start(SENDER)
        ready = time.perf_counter()
        send_pid = node_pid(cluster, SENDER)
        case.send_cpu_ready = cpu_seconds(send_pid)
        recv_cpu_ready = cpu_seconds(recv_pid)
        case.recv_cpu_start = recv_cpu_ready - recv_cpu0
        written0, wchar0 = io_counter(recv_pid, "write_bytes"), io_counter(recv_pid, "wchar")
        case.trace = [(0.0, 0)]  # (seconds since READY, games held)
        done, deadline = None, ready + args.timeout
        while time.perf_counter() < deadline:
            case.held = synced_count(synced) - base
            now = time.perf_counter()
            if case.held != case.trace[-1][1]:
                case.trace.append((now - ready, case.held))
            if case.held >= args.games:
                done = now
                break
            time.sleep(POLL)
        end = done or time.perf_counter()
        case.send_cpu, recv_cpu_end = cpu_seconds(send_pid), cpu_seconds(recv_pid)
        case.recv_cpu = recv_cpu_end - recv_cpu_ready
        case.recv_written = io_counter(recv_pid, "write_bytes") - written0
        case.recv_wchar = io_counter(recv_pid, "wchar") - wchar0
        case.recv_hwm_kib = status_kb(recv_pid, "VmHWM")
        case.sender_log = cluster.nodes[SENDER].log_tail(8)
    case.done, case.elapsed, case.from_launch = done is not None, end - ready, end - launched
    if prefill and args.prefill_in_place and stopped_cleanly(cluster, RECEIVER):
        release_in_place(args.prefill_cache, prefill, args.shard_mb << 20)
    shutil.rmtree(root, ignore_errors=True)  # a 1M-game merged DB is ~30 GB: one at a time
    return case


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
    parser.add_argument("--prefill", type=parse_counts, default=[0],
                        help="games already in the receiver's merged DB before the sync, as on a "
                             "long-running training node (copies of one template game); a "
                             "comma-separated list runs each case in turn, e.g. 0,1000000 "
                             "(default 0)")
    parser.add_argument("--prefill-cache", type=Path, default=None,
                        help="directory keeping each pre-filled merged DB between runs (a "
                             "1M-game one is ~30 GB and takes a while to build); copied per run")
    parser.add_argument("--shard-mb", type=int, default=DEFAULT_SHARD_BYTES >> 20,
                        help="the receiver's RINGRIFT_MERGED_SHARD_MB, and the shards the "
                             "pre-filled games are laid out in (default %(default)s, the "
                             "nodes' default; 0: one merged DB)")
    parser.add_argument("--prefill-in-place", action="store_true",
                        help="hard-link the cached pre-filled DB instead of copying it (when two "
                             "~30 GB copies do not fit on the disk); each run adds its games to it")
    parser.add_argument("--batch-games", type=int, default=500,
                        help="games per batch for the payload figure: the nodes' "
                             "RINGRIFT_SYNC_BATCH_GAMES (default 500)")
    parser.add_argument("--rsync-incremental", type=parse_counts, default=None, metavar="BASE,ADDED",
                        help="also time rsync's incremental case: a BASE-game DB already copied, "
                             "ADDED games added, rsync again (e.g. 200000,2000; a 200k-game DB is "
                             "~7 GB); compared with ringsync's payload for the ADDED games")
    args = parser.parse_args(argv)
    if args.prefill_in_place:  # the cached DB keeps earlier runs' games: this run's are new to it
        args.seed += time.time_ns() % 1_000_000_007
    if args.rsync_incremental is not None and len(args.rsync_incremental) != 2:
        parser.error("--rsync-incremental takes BASE,ADDED, e.g. 200000,2000")

    with temp_root("throughput") as root:
        backlog = root / "backlog.db"
        cached = (args.backlog_cache / f"backlog-{args.games}-{args.seed}-{args.writer}.db"
                  if args.backlog_cache else None)
        if cached is not None and cached.exists():
            print(f"copying the pre-written backlog {cached} ...", flush=True)
            started = time.perf_counter()
            shutil.copyfile(cached, backlog)
            write_s = time.perf_counter() - started
        else:
            print(f"pre-writing {args.games} games of 80 moves ({args.writer} writer) ...", flush=True)
            write_s = prewrite(backlog, args.games, args.seed, args.writer)
            checkpoint(backlog)  # the file alone now holds every game: what rsync copies
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(backlog, cached)
        db_bytes = backlog.stat().st_size
        print(f"  {fmt(write_s)} s, {fmt(db_bytes / MB)} MB", flush=True)
        payload = payload_per_game(backlog, args.batch_games)
        cases = [run_case(root / f"prefill-{n}", backlog, args, n) for n in args.prefill]
        ref = rsync_reference(backlog, args.rsync_runs, args.timeout, root)
        incremental = None
        if args.rsync_incremental:
            base, added = args.rsync_incremental
            incremental = rsync_incremental(backlog, base, added, args.timeout, root)
    return report(args, cases, ref, db_bytes, payload, incremental)


def report(args: argparse.Namespace, cases: list[Case], ref: list[float], db_bytes: int,
           payload: float, incremental: Incremental | None = None) -> int:
    ref_s = statistics.median(ref)
    extra: dict[str, object] = {}
    if incremental is not None:
        inc = incremental
        ours = payload * inc.added
        print_table(
            f"Adding {inc.added:,} games to a DB of {inc.base:,} ({fmt(inc.db_bytes / MB)} MB) "
            f"that the receiver already has",
            ["", "bytes sent", "seconds"],
            [["rsync -a --stats over SSH (delta transfer)", f"{fmt(inc.sent_bytes / MB)} MB",
              fmt(inc.seconds, 2)],
             ["ringsync (batch payload of the new games)", f"{fmt(ours / MB)} MB", "see above"]])
        extra = {"rsync_incremental": {"base": inc.base, "added": inc.added,
                                       "db_mb": round(inc.db_bytes / MB, 1),
                                       "rsync_sent_mb": round(inc.sent_bytes / MB, 1),
                                       "rsync_s": round(inc.seconds, 2),
                                       "ringsync_payload_mb": round(ours / MB, 1)}}
    rows = []
    for c in cases:
        per_game = c.recv_written / max(1, c.held)
        wchar_game = c.recv_wchar / max(1, c.held)
        rows.append([f"{c.prefill:,}", fmt(c.elapsed, 2), fmt(c.games_s, 0),
                     fmt(db_bytes / MB / c.elapsed if c.elapsed else 0.0),
                     f"{fmt(10_000 * c.recv_cpu / max(1, c.held), 2)} s",
                     f"{fmt(per_game / 1000)} kB ({per_game / payload:.1f}x)",
                     f"{fmt(wchar_game / 1000)} kB ({wchar_game / payload:.1f}x)",
                     f"{fmt(c.recv_hwm_kib / 1024, 0)} MiB", "yes" if c.done else "NO"])
    print_table(
        f"Backlog of {args.games} games (80 moves, {fmt(db_bytes / MB)} MB DB, {args.writer} "
        f"pre-write, {fmt(payload / 1000)} kB payload per game), 1 sender -> 1 receiver, loopback",
        ["receiver held", "seconds", "games/s", "MB/s", "receiver CPU / 10k games",
         "receiver disk writes / game", "receiver write() bytes / game", "receiver VmHWM",
         "complete"], rows)
    print("  disk writes = /proc/PID/io write_bytes (page-cache bytes dirtied; a large-folio kernel "
          "charges a whole folio\n  for a small random write); write() bytes = wchar, what SQLite "
          "asked to write (WAL frames, checkpoint pages)")
    print(f"  reference: rsync -a over SSH (median of {len(ref)}): {fmt(ref_s, 2)} s, "
          f"{fmt(args.games / ref_s, 0)} games/s; targets: >= {TARGET_GAMES_S:,.0f} games/s empty, "
          f">= {TARGET_SCALE_GAMES_S:,.0f} games/s and >= {TARGET_RATIO}x the empty rate at 1M held, "
          f"disk writes <= {TARGET_WRITE_FACTOR:g}x the payload")
    for c in cases:
        marks = milestones(c.trace, args.games)
        print(f"  held {c.prefill:,}: sender CPU {fmt(c.send_cpu - c.send_cpu_ready, 2)} s "
              f"(start-up {fmt(c.send_cpu_ready, 2)} s), receiver CPU {fmt(c.recv_cpu, 2)} s "
              f"(+{fmt(c.recv_cpu_start, 2)} s during sender start); from sender launch "
              f"{fmt(c.from_launch, 2)} s; progress: "
              + ", ".join(f"{p}% after {t:.2f} s" for p, t in marks.items()))
        stall_at, stall_s = longest_stall(c.trace, c.elapsed)
        if stall_s > 1.0:
            print(f"    longest stall: {stall_s:.1f} s with {stall_at:,} games held")
        if not c.done:
            print(f"    receiver held only {c.held} of {args.games} games after {args.timeout:g} s; "
                  f"sender log tail:\n{c.sender_log}")
    print("  note: rsync copies a file, which is only safe on a quiescent (checkpointed) DB; on a live\n"
          "  WAL DB it can copy a torn state and re-sends the whole file every time. ringsync reads\n"
          "  committed rows in a read transaction and merges each game exactly once.")
    first, last = cases[0], cases[-1]
    ratio = last.games_s / first.games_s if first.games_s else 0.0
    write_factor = max(c.recv_written / max(1, c.held) / payload for c in cases)
    met = (all(c.done for c in cases) and first.games_s >= TARGET_GAMES_S
           and (len(cases) == 1 or (last.games_s >= TARGET_SCALE_GAMES_S and ratio >= TARGET_RATIO))
           and write_factor <= TARGET_WRITE_FACTOR)
    print(f"  target met: {'yes' if met else 'NO'}")
    emit_result("throughput", {
        "games": args.games, "db_mb": round(db_bytes / MB, 1), "writer": args.writer,
        "prefill": first.prefill, "complete": first.done, "held": first.held,
        "seconds": round(first.elapsed, 2), "games_s": round(first.games_s, 0),
        "mb_s": round(db_bytes / MB / first.elapsed, 1) if first.elapsed else 0.0,
        "sender_cpu_s": round(first.send_cpu - first.send_cpu_ready, 2),
        "receiver_cpu_s": round(first.recv_cpu, 2), "target_games_s": TARGET_GAMES_S,
        "target_met": met, "sync_interval_s": args.sync_interval,
        "payload_per_game_bytes": round(payload),
        "cases": [{
            "prefill": c.prefill, "complete": c.done, "held": c.held, "seconds": round(c.elapsed, 2),
            "games_s": round(c.games_s, 0),
            "receiver_cpu_per_10k_s": round(10_000 * c.recv_cpu / max(1, c.held), 2),
            "receiver_written_per_game_bytes": round(c.recv_written / max(1, c.held)),
            "written_x_payload": round(c.recv_written / max(1, c.held) / payload, 2),
            "receiver_wchar_per_game_bytes": round(c.recv_wchar / max(1, c.held)),
            "wchar_x_payload": round(c.recv_wchar / max(1, c.held) / payload, 2),
            "receiver_hwm_mib": round(c.recv_hwm_kib / 1024, 1),
            "progress_s": {str(p): round(t, 2) for p, t in milestones(c.trace, args.games).items()},
            "prefill_setup": c.prefill_note,
        } for c in cases],
        "scale_ratio_games_s": round(ratio, 2), "max_written_x_payload": round(write_factor, 2),
        "ref_rsync_s": round(ref_s, 2), "ref_rsync_mb_s": round(db_bytes / MB / ref_s, 1),
        "ref_rsync_games_s": round(args.games / ref_s, 0), **extra,
    })
    return 0 if all(c.done for c in cases) else 1


if __name__ == "__main__":
    raise SystemExit(main())
