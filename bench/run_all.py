"""Run every benchmark in turn (each in its own process), collect the RESULT lines, print a markdown table."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# name, full-size arguments, --quick arguments, time bound (s)
BENCHES: tuple[tuple[str, list[str], list[str], float], ...] = (
    ("latency", [], ["--games", "200"], 240.0),
    ("throughput", [], ["--games", "2000", "--rsync-runs", "1"], 600.0),
    ("idle_cycle", [], ["--games", "10000"], 300.0),
    ("rss", [], ["--games", "2000", "--idle", "2"], 600.0),
)


def run_one(name: str, args: list[str], bound: float) -> tuple[dict[str, Any] | None, float]:
    """Run ``bench/NAME.py ARGS`` with its output streamed; return its RESULT and wall time."""
    cmd = [sys.executable, str(HERE / f"{name}.py"), *args]
    print(f"\n=== {' '.join(['bench/' + name + '.py', *args])}", flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    result = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            if line.startswith("RESULT "):
                result = json.loads(line.removeprefix("RESULT "))
            if time.monotonic() - started > bound:
                break
    finally:
        if proc.poll() is None and time.monotonic() - started > bound:
            os.killpg(proc.pid, signal.SIGTERM)  # the bench's own cleanup stops its nodes
            print(f"!!! {name} exceeded {bound:g} s and was stopped", flush=True)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return result, time.monotonic() - started


def summary(name: str, r: dict[str, Any] | None) -> tuple[str, str, str, str]:
    """(figure, ringsync, target, reference) for one benchmark's RESULT."""
    if r is None:
        return (name, "no result (failed)", "", "")
    met = "met" if r.get("target_met") else "NOT met"
    if name == "latency":
        return (f"commit → receiver latency ({r['games']} games @ {r['rate_games_s']:g}/s)",
                f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, max {r['max_ms']} ms",
                f"p50 ≤ 0.5 s, p99 ≤ 2 s ({met})", "60 s polling: p50 30 s, p99 59.4 s (analytical)")
    if name == "throughput":
        return (f"backlog throughput ({r['games']} games, {r['db_mb']} MB)",
                f"{r['games_s']:,.0f} games/s, {r['mb_s']} MB/s ({r['seconds']} s)",
                f"≥ {r['target_games_s']:,.0f} games/s ({met})",
                f"rsync -a over SSH: {r['ref_rsync_games_s']:,.0f} games/s, {r['ref_rsync_mb_s']} MB/s")
    if name == "idle_cycle":
        return (f"idle cycle ({r['games']:,} games shipped)",
                f"event {r['event_median_ms']} ms, interval {r['interval_median_ms']} ms, "
                f"timer {r['timer_median_ms']} ms (medians)",
                f"≤ {r['target_ms']:g} ms ({met})",
                f"no-change rsync over SSH: {r['ref_rsync_nochange_median_s'] * 1000:,.0f} ms")
    if name == "rss":
        return (f"idle RSS (after syncing {r['held']:,} games)", f"max {r['max_rss_mb']} MiB",
                f"≤ {r['target_mb']:g} MiB ({met})", "—")
    return (name, json.dumps(r), "", "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes for a smoke run")
    parser.add_argument("--only", nargs="*", choices=[b[0] for b in BENCHES], help="run only these")
    args = parser.parse_args(argv)
    rows = []
    for name, full, quick, bound in BENCHES:
        if args.only and name not in args.only:
            continue
        result, took = run_one(name, quick if args.quick else full, bound)
        rows.append((*summary(name, result), f"{took:.0f} s"))
    print("\n| figure | ringsync | target | reference (same run) | bench wall time |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
