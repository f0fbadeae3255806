"""Fan-out of a new model from one training host to N selfplay hosts (issue 8 §4).

Each host is a network namespace whose link is capped both ways with ``tc tbf``. The
training host's real `ringsync run` node picks the model up when it is renamed into
place; T(N) is the time from that rename until every one of N selfplay nodes has published
it (hash checked afterwards). The reference, in the same lab: the same file fetched by the
N hosts at once with plain curl from a static HTTP server on the training host — one
source pushing to all, which takes about N times T(1).

Run as root from the repository root:
    PYTHONPATH=. python3 bench/fanout.py [--mb 200] [--ns 1,2,4,8] [--mbit 200] [--slots 1]
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import cpu_seconds, emit_result, print_table

from ringsync.files.hashing import hash_file

# The namespace harness of the tests (it imports bench._sshd: loaded by name so that mypy,
# which sees bench/ as top-level modules, does not meet _sshd under two names).
netns: Any = importlib.import_module("tests.netns")


NAME = "canonical_hex8_2p.pth"
STATIC_PORT = 8899
DEADLINE = 600.0


def fan_out(lab: Any, root: Path, model: Path, n: int, env: dict[str, str],
            logs: Path | None) -> Spread:
    """From the rename at the training host until N selfplay nodes published it."""
    train, receivers = lab.hosts[0], lab.hosts[1:n + 1]
    nodes: list[tuple[str, str, Any]] = [("train-1", "gpu_training_primary", train)]
    nodes += [(f"selfplay-{i + 1}", "gpu_selfplay", h) for i, h in enumerate(receivers)]
    cluster = netns.lab_cluster(lab, nodes, root=root)
    try:
        for name in cluster.nodes:
            settle = "300" if name == "train-1" else "0.5"  # the source picks up the rename
            cluster.nodes[name].extra_env.update({**env, "RINGRIFT_FILE_SETTLE_TIME": settle})
            cluster.start(name)
        src = cluster.nodes["train-1"].data_dir / "models"
        src.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model, src / "canonical_hex8_2p.tmp")
        finals = [cluster.nodes[f"selfplay-{i + 1}"].data_dir / "models" / NAME for i in range(n)]
        started = time.monotonic()
        os.rename(src / "canonical_hex8_2p.tmp", src / NAME)
        arrivals: dict[Path, float] = {}
        while len(arrivals) < n:
            for f in finals:
                if f not in arrivals and f.is_file():
                    arrivals[f] = time.monotonic() - started
            if time.monotonic() - started > DEADLINE:
                raise RuntimeError(f"N={n}: the model did not reach every node in {DEADLINE}s")
            time.sleep(0.02)
        cpu = sum(cpu_seconds(node.process.pid) for node in cluster.nodes.values())
        expected = hash_file(model)
        for f in finals:
            if hash_file(f) != expected:
                raise RuntimeError(f"{f} has the wrong content")
        return Spread(max(arrivals.values()), sorted(arrivals.values()), cpu)
    finally:
        cluster.stop_all()
        if logs is not None:
            for name, node in cluster.nodes.items():
                (logs / f"n{n}").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(node.log_path, logs / f"n{n}" / f"{name}.log")


@dataclass
class Spread:
    seconds: float  # until the last receiver published it
    arrivals: list[float]  # each receiver's publication, seconds after the rename
    cpu_seconds: float  # of every node process, from start to the last arrival


def curl_reference(lab: Any, model: Path, n: int) -> float:
    """Seconds for N hosts to fetch the file at once with curl from one static server."""
    train, receivers = lab.hosts[0], lab.hosts[1:n + 1]
    server = lab.spawn(train, [sys.executable, "-m", "http.server", str(STATIC_PORT), "--bind",
                               train.address, "--directory", str(model.parent)],
                       log=model.parent / "static.log")
    try:
        url = f"http://{train.address}:{STATIC_PORT}/{model.name}"
        for _ in range(100):  # until it answers
            probe = subprocess.run(train.command("curl", "-sfI", url), capture_output=True, timeout=5)
            if probe.returncode == 0:
                break
            time.sleep(0.1)
        started = time.monotonic()
        procs = [subprocess.Popen(h.command("curl", "-sf", "-o", "/dev/null", url)) for h in receivers]
        codes = [p.wait(timeout=DEADLINE) for p in procs]
        elapsed = time.monotonic() - started
        if any(codes):
            raise RuntimeError(f"curl failed: exit codes {codes}")
        return elapsed
    finally:
        server.kill()
        server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=200, help="model size in MB (default 200)")
    parser.add_argument("--ns", default="1,2,4,8", help="receiver counts (default 1,2,4,8)")
    parser.add_argument("--mbit", type=float, default=200.0, help="tbf cap per host (default 200)")
    parser.add_argument("--poll", default="0.5", help="RINGRIFT_FILE_POLL_INTERVAL (default 0.5)")
    parser.add_argument("--slots", default="1", help="RINGRIFT_FILE_UPLOAD_SLOTS (default 1)")
    parser.add_argument("--logs", type=Path, help="copy every node's log into this directory")
    args = parser.parse_args()
    ns = [int(x) for x in args.ns.split(",")]
    env = {"RINGRIFT_FILE_POLL_INTERVAL": args.poll, "RINGRIFT_FILE_UPLOAD_SLOTS": args.slots}
    rows, ours, ref = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="ringsync-fanout-") as tmp:
        model = Path(tmp) / "static" / NAME
        model.parent.mkdir()
        with model.open("wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(1_000_000))
        for n in ns:
            with netns.netns_lab(Path(tmp) / f"lab{n}", n + 1) as lab:
                for host in lab.hosts:
                    lab.cap(host, args.mbit)
                load = os.getloadavg()[0]
                spread = fan_out(lab, Path(tmp) / f"cluster{n}", model, n, env, args.logs)
                ours[n] = spread.seconds
                ref[n] = curl_reference(lab, model, n)
            print(f"N={n}: arrivals {', '.join(f'{a:.1f}' for a in spread.arrivals)} s; node CPU "
                  f"{spread.cpu_seconds:.1f} s; load average before {load:.1f}", flush=True)
            rows.append([n, f"{ours[n]:.1f}", f"{ours[n] / ours[ns[0]]:.2f}", f"{ref[n]:.1f}",
                         f"{ref[n] / ref[ns[0]]:.2f}"])
            print(f"N={n}: ringsync {ours[n]:.1f} s, curl from one source {ref[n]:.1f} s", flush=True)
    print_table(f"Fan-out of a {args.mb} MB model, every host capped at {args.mbit:g} mbit "
                f"(tc tbf), upload slots {args.slots}", ["N", "ringsync T(N) s", "T(N)/T(1)",
                                                        "curl one source s", "curl T(N)/T(1)"], rows)
    first, last = ns[0], ns[-1]
    emit_result("fanout", {
        "mb": args.mb, "mbit": args.mbit, "upload_slots": int(args.slots),
        "t_seconds": {str(n): round(ours[n], 2) for n in ns},
        "curl_seconds": {str(n): round(ref[n], 2) for n in ns},
        f"ratio_{last}_{first}": round(ours[last] / ours[first], 2),
        f"curl_ratio_{last}_{first}": round(ref[last] / ref[first], 2),
    })


if __name__ == "__main__":
    main()
