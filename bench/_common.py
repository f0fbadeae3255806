"""Shared helpers for the benchmarks: tables, RESULT lines, /proc readings, clusters, game DBs."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path

from ringsync.localcluster import Cluster

# One local ext4 root mount: AutoSyncDaemon must not take the data dir for shared storage.
LOCAL_MOUNTINFO = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MB = 1_000_000


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A small fixed-width table on stdout."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for n, row in enumerate(cells):
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))
    sys.stdout.flush()


def emit_result(name: str, figures: dict[str, object]) -> None:
    """The machine-readable line that run_all.py and the docs collect."""
    print("RESULT " + json.dumps({"bench": name, **figures}, sort_keys=False), flush=True)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far, in seconds (from /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kb(pid: int, key: str) -> int:
    """A `kB` field such as VmRSS or VmHWM from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"{key} not in /proc/{pid}/status")


@contextmanager
def temp_root(prefix: str) -> Iterator[Path]:
    """A temporary directory removed on exit, whatever happened."""
    path = Path(tempfile.mkdtemp(prefix=f"ringsync-bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def running(cluster: Cluster) -> Iterator[Cluster]:
    """Stop every node process of ``cluster`` on exit (SIGTERM, then SIGKILL)."""
    try:
        yield cluster
    finally:
        cluster.stop_all()


def node_pid(cluster: Cluster, name: str) -> int:
    proc = cluster.nodes[name].process
    if proc is None or proc.poll() is not None:
        raise RuntimeError(f"node {name} is not running:\n{cluster.nodes[name].log_tail()}")
    return proc.pid


def synced_count(synced_dir: Path) -> int:
    """Games held in a receiver's merged DBs (read-only; 0 before the first merge)."""
    total = 0
    for db in sorted(synced_dir.glob("*.db")):
        try:
            with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0)) as conn:
                total += int(conn.execute("SELECT count(*) FROM games").fetchone()[0])
        except sqlite3.OperationalError:
            continue  # created but no games table yet
    return total


def checkpoint(db: Path) -> None:
    """Fold the WAL into the main file so that the file alone holds every committed game."""
    with closing(sqlite3.connect(db, timeout=30.0)) as conn:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            raise RuntimeError(f"checkpoint of {db} blocked by a reader or writer")


def run_bounded(cmd: Sequence[str], timeout: float) -> float:
    """Run a command to completion within ``timeout`` seconds; return its wall time."""
    started = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"{cmd[0]} did not finish within {timeout}s") from None
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                           f"{err.decode(errors='replace')[-2000:]}{out.decode(errors='replace')[-500:]}")
    return elapsed


def fmt(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"
