"""`ringsync demo`: a four-node cluster on loopback fed by a simulated selfplay generator."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ringsync.localcluster import Cluster
from ringsync.status_view import collect

NODES = [
    ("selfplay-1", "gpu_selfplay"),
    ("train-1", "gpu_training_primary"),
    ("train-2", "nn_training_primary"),
    ("coordinator", "coordinator"),
]


@contextlib.contextmanager
def demo_dir(keep: str | None) -> Iterator[Path]:
    """The demo's directory: --dir is kept whole; a temp dir loses its data but keeps the logs."""
    if keep:
        path = Path(keep).resolve()
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="ringsync-demo-"))
    try:
        yield path
    finally:
        for name, _ in NODES:  # the node's data and state; <node>.log files stay
            shutil.rmtree(path / name, ignore_errors=True)
        print(f"node logs kept in {path} (<node>.log)")


def run_demo(*, duration: float | None, rate: float, keep_dir: str | None) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with demo_dir(keep_dir) as root:
        cluster = Cluster(root, NODES, sync_interval=5.0)
        print(f"ringsync demo: {len(NODES)} nodes on 127.0.0.1 in {root} (logs: <node>.log there)")
        generator: subprocess.Popen[bytes] | None = None
        try:
            for name, role in NODES:
                node = cluster.start(name)
                print(f"  {name:<12} {role:<22} ready on 127.0.0.1:{node.port}")
            generator = _start_generator(cluster, rate)
            print(f"selfplay-1 writes {rate:g} games/s into a live WAL-mode DB; completed games flow to "
                  "train-1 and train-2, never to the coordinator. Ctrl-C stops.")
            _progress(cluster, duration, stop)
            _stop_generator(generator)
            return _summary(_settle(cluster))
        except RuntimeError as exc:
            print(f"demo failed: {exc}", file=sys.stderr)
            return 1
        finally:
            if generator is not None:
                _stop_generator(generator)
            cluster.stop_all()


def _stop_generator(generator: subprocess.Popen[bytes]) -> None:
    if generator.poll() is None:
        generator.terminate()  # it finishes the game in hand, then exits
        generator.wait(10)


def _start_generator(cluster: Cluster, rate: float) -> subprocess.Popen[bytes]:
    db = cluster.nodes["selfplay-1"].data_dir / "games" / "hex8_2p.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "ringsync.selfplay_sim", str(db), "--games", "1000000000",
         "--rate", str(rate)],
        stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True,
    )


def _progress(cluster: Cluster, duration: float | None, stop: threading.Event) -> None:
    settings = cluster.client_settings()
    deadline = None if duration is None else time.monotonic() + duration
    tty = sys.stdout.isatty()
    statuses: list[dict[str, Any]] = []
    while not stop.is_set():
        statuses = asyncio.run(collect(settings, everyone=True))
        print(("\r" if tty else "") + _line(statuses), end="" if tty else "\n", flush=True)
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        stop.wait(min(1.0 if tty else 2.0, left if left is not None else 1.0))
    print()


def _settle(cluster: Cluster, timeout: float = 15.0) -> list[dict[str, Any]]:
    """After the generator stopped: the last games reach the trainers within moments."""
    settings = cluster.client_settings()
    deadline = time.monotonic() + timeout
    while True:
        statuses = asyncio.run(collect(settings, everyone=True))
        trainers = [st.get("received_total") for st in statuses if st["node"].startswith("train")]
        if all(n == _completed(statuses[0]) for n in trainers) or time.monotonic() > deadline:
            return statuses
        time.sleep(0.2)


def _completed(status: dict[str, Any]) -> int:
    manifest = status.get("manifest")
    return int(manifest.get("games", 0)) if isinstance(manifest, dict) else 0


def _line(statuses: list[dict[str, Any]]) -> str:
    parts = [f"completed {_completed(statuses[0]):>6}"]
    for st in statuses[1:]:
        held = "down" if "error" in st else st.get("received_total", 0)
        parts.append(f"{st['node']} {held!s:>6}")
    return " | ".join(parts)


def _summary(statuses: list[dict[str, Any]]) -> int:
    if not statuses or any("error" in st for st in statuses):
        print("demo ended with nodes unreachable", file=sys.stderr)
        return 1
    print(f"done: selfplay-1 completed {_completed(statuses[0])} games; " + ", ".join(
        f"{st['node']} holds {st.get('received_total', 0)}" for st in statuses[1:]))
    return 0
