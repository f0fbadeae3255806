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
from ringsync.store import ringrift_schema
from ringsync.store.gamemerge import DEFAULT_SHARD_BYTES, TARGET_PAGE_SIZE, GameMerger
from ringsync.store.shards import parse_shard, shard_path, shard_paths

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


def io_counter(pid: int, key: str) -> int:
    """A counter of /proc/PID/io: ``write_bytes`` = page-cache bytes the process dirtied (what
    storage will be sent; on kernels with large page-cache folios a small random write is
    charged a whole folio), ``wchar`` = bytes it passed to write calls (files and sockets)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"{key} not in /proc/{pid}/io")


def parse_counts(text: str) -> list[int]:
    """``"0,1000000"`` -> [0, 1000000]: the sizes of a run's cases, in order."""
    try:
        counts = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"expected comma-separated game counts like 0,1000000, got {text!r}") from None
    if not counts or any(n < 0 for n in counts):
        raise SystemExit(f"expected comma-separated game counts >= 0, got {text!r}")
    return counts


def prefill_receiver(db: Path, template_db: Path, games: int) -> float:
    """Give the receiver a merged DB already holding ``games`` games, as a long-running node has.

    The DB is created as the receiver creates one (16 KiB pages, WAL, RingRift's v18 schema
    with its indexes and triggers); then the first game of ``template_db`` is copied
    ``games`` times under fresh random ids with ``INSERT ... SELECT`` (child rows before the
    games rows, as the on-insert trigger requires). Random ids, as RingRift's uuid4s: the
    indexes are as full (and split as often) as a real node's. Returns the seconds taken.
    """
    started = time.perf_counter()
    db.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute(f"PRAGMA page_size={TARGET_PAGE_SIZE}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA cache_size=-262144")
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


PREFILL_CHUNK = 10_000


def prefill_shards(directory: Path, key: str, template_db: Path, games: int,
                   shard_bytes: int) -> float:
    """``games`` pre-filled games laid out as the receiver lays them out: ``<key>.db``,
    ``<key>+2.db`` ... each full at ``shard_bytes`` (0: one DB), the last one part-full.
    Returns the seconds taken."""
    started = time.perf_counter()
    per_shard = games
    if shard_bytes:
        probe = directory / ".probe.db"
        prefill_receiver(probe, template_db, 1000)
        per_shard = max(1, -(-shard_bytes * 1000 // probe.stat().st_size))  # full, as merges leave it
        for leftover in directory.glob(".probe.db*"):
            leftover.unlink()
    number, left = 1, games
    while left > 0:
        n = min(per_shard, left)
        prefill_receiver(shard_path(directory, key, number), template_db, n)
        number, left = number + 1, left - n
    return time.perf_counter() - started


def place_prefilled(merged: Path, template_db: Path, games: int, cache: Path | None,
                    *, in_place: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES) -> str:
    """Put merged DBs holding ``games`` copies of the template's first game beside ``merged``
    (the config's first DB), in shards of ``shard_bytes`` as the receiver makes them.

    With ``cache``, the DBs are built once in ``cache/prefill-<games>[-shard<MiB>]/`` and
    copied from there on later runs (a 1M-game set of 80-move games is ~35 GB). With
    ``in_place``, the cached DBs are hard-linked instead of copied (when a copy would not
    fit on the disk): the run then adds its games to them, and they go on growing like a
    long-running node's, so callers count the games held before they start. A ``.in-use``
    marker is left while a node may write them; a cache found marked (a run that did not
    end cleanly, so a WAL may be lost) is rebuilt. Returns a one-line description.
    """
    parsed = parse_shard(merged.name)
    if parsed is None or parsed[1] != 1:
        raise ValueError(f"{merged} is not a config's first merged DB")
    key, synced = parsed[0], merged.parent
    synced.mkdir(parents=True, exist_ok=True)
    layout = f"{key} in shards of {shard_bytes >> 20} MiB" if shard_bytes else f"{key}.db"
    if cache is None:
        seconds = prefill_shards(synced, key, template_db, games, shard_bytes)
        made = shard_paths(synced, key)
        for db in made:
            evict_from_page_cache(db)
        return (f"built in {fmt(seconds)} s: {len(made)} DBs ({layout}), "
                f"{fmt(sum(db.stat().st_size for db in made) / MB)} MB")
    cached = cache / (f"prefill-{games}" + (f"-shard{shard_bytes >> 20}" if shard_bytes else ""))
    marker = cached.with_name(cached.name + ".in-use")
    if marker.exists():  # an in-place run did not end cleanly: a DB may miss its WAL
        shutil.rmtree(cached, ignore_errors=True)
        marker.unlink()
    built = ""
    if not cached.exists():
        partial = cached.with_name(cached.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        seconds = prefill_shards(partial, key, template_db, games, shard_bytes)
        partial.rename(cached)  # whole or absent: an interrupted build is not reused
        built = f"built in {fmt(seconds)} s, "
    started = time.perf_counter()
    dbs = shard_paths(cached, key)
    if in_place:
        marker.write_text(str(synced))
    for db in dbs:
        (os.link if in_place else shutil.copyfile)(db, synced / db.name)
        evict_from_page_cache(synced / db.name)
    if len(dbs) > 1:  # the filter of the full shards' ids a node that ran before has saved
        merger = GameMerger(synced, shard_bytes=shard_bytes)
        try:
            merger.prepare_filter(key)
        finally:
            merger.close()
        for db in dbs:  # the filter's read left the games indexes cached: cold again
            evict_from_page_cache(synced / db.name)
    size = fmt(sum(db.stat().st_size for db in dbs) / MB)
    if in_place:
        return f"{built}linked in place from {cached}: {len(dbs)} DBs ({layout}), {size} MB"
    return (f"{built}copied from {cached} in {fmt(time.perf_counter() - started)} s: "
            f"{len(dbs)} DBs ({layout}), {size} MB")


def stopped_cleanly(cluster: Cluster, name: str) -> bool:
    """True if node ``name`` exited with status 0 (drained; its DBs' WALs folded in)."""
    proc = cluster.nodes[name].process
    return proc is not None and proc.poll() == 0


def release_in_place(cache: Path | None, games: int,
                     shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """After a clean stop of the nodes: the in-place cached DBs are whole again (WALs folded in)."""
    if cache is not None:
        name = f"prefill-{games}" + (f"-shard{shard_bytes >> 20}" if shard_bytes else "")
        (cache / f"{name}.in-use").unlink(missing_ok=True)


def evict_from_page_cache(db: Path) -> None:
    """Flush ``db`` and drop its pages from the page cache (before any node opens it).

    A fresh copy sits in the page cache as large folios, and on such kernels a checkpoint's
    random 16 KiB page write is then charged (and written back) as a whole folio: 3.3x the
    bytes SQLite wrote, measured. A long-running node's 30 GB DB is mostly not cached, and
    what is was read page by page; so the copy starts cold, as that node's would.
    """
    fd = os.open(db, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
