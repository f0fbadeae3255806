"""A 1 GiB model over HTTP on loopback: ringsync's fetch path vs curl from a static server, same run.

ringsync: a real `ringsync run` training node's data server (/v1/files, ranged, token
checked) and the FileFetcher a receiver runs (streamed to a temp file, BLAKE3 on the fly,
fsync every 16 MiB, atomic publish). Reference: `curl -o` of the same file from a small
aiohttp static server (web.FileResponse, sendfile on the default asyncio loop), and curl
from ringsync's own data server. Each run removes its copy; median of --runs.

    python3 bench/http_file.py [--size-mib 1024] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from _common import emit_result, fmt, print_table, run_bounded, temp_root
from _files import (
    MIB,
    MODEL,
    SOURCE,
    fetch_once,
    fresh_step,
    fsync_file,
    http_client,
    median,
    offered,
    source_node,
)
from _sshd import stop_process

from ringsync.localcluster import free_port, wait_until

TARGET = 0.9
_STATIC = """
import sys
from aiohttp import web
root = sys.argv[1]
async def serve(request):
    return web.FileResponse(root + "/" + request.match_info["name"])
app = web.Application()
app.router.add_get("/{name}", serve)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), print=None, access_log=None)
"""


@contextmanager
def static_server(directory: Path) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _STATIC, str(directory), str(port)],
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: _listening(port), 30, "the static file server")
        yield port
    finally:
        stop_process(proc)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def curl(url: str, out: Path, header_file: Path | None = None) -> tuple[float, float]:
    """(download seconds, fsync seconds); the token is read from a file, never on argv."""
    cmd = ["curl", "-sS", "--fail", "-o", str(out), url]
    if header_file is not None:
        cmd[1:1] = ["-H", f"@{header_file}"]
    took = run_bounded(cmd, 600)
    synced = fsync_file(out)
    out.unlink()
    return took, synced


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    size = args.size_mib * MIB
    with temp_root("httpfile") as root, source_node(root / "cluster", size) as (cluster, model):
        host = cluster.host(SOURCE)
        entry = offered(lambda: http_client(cluster.token), host)
        headers = root / "headers"
        headers.write_text(f"Authorization: Bearer {cluster.token}\n")
        os.chmod(headers, 0o600)
        ours, static, static_sync, served, served_sync = [], [], [], [], []
        with static_server(model.parent) as port:
            for run in range(args.runs):
                dest = root / f"ringsync-{run}"
                fresh_step(root / "scratch", size)
                ours.append(fetch_once(lambda: http_client(cluster.token), host, entry, dest))
                shutil.rmtree(dest)
                fresh_step(root / "scratch", size)
                took, synced = curl(f"http://127.0.0.1:{port}/{MODEL}", root / "curl.out")
                static.append(took)
                static_sync.append(took + synced)
                fresh_step(root / "scratch", size)
                took, synced = curl(f"http://127.0.0.1:{host.p2p_port}/v1/files/models/{MODEL}",
                                    root / "curl.out", headers)
                served.append(took)
                served_sync.append(took + synced)
                print(f"run {run}: ringsync {ours[-1]:.2f} s, curl static {static[-1]:.2f} s "
                      f"(+ fsync {static_sync[-1]:.2f}), curl from ringsync {served[-1]:.2f} s",
                      flush=True)
                time.sleep(0.5)
    mb = size / MIB
    rate = {k: mb / median(v) for k, v in (("ringsync", ours), ("curl_static", static),
                                           ("curl_static_fsync", static_sync),
                                           ("curl_ringsync_server", served),
                                           ("curl_ringsync_server_fsync", served_sync))}
    print_table(f"{args.size_mib} MiB over HTTP on loopback (median of {args.runs})",
                ["path", "seconds", "MiB/s", "vs curl static", "vs curl static + fsync"],
                [[k, fmt(mb / r, 2), fmt(r), fmt(r / rate["curl_static"], 2),
                  fmt(r / rate["curl_static_fsync"], 2)] for k, r in rate.items()])
    ratio = rate["ringsync"] / rate["curl_static"]
    emit_result("http_file", {"size_mib": args.size_mib, "runs": args.runs,
                              **{f"{k}_mib_s": round(r, 1) for k, r in rate.items()},
                              "ratio_vs_curl": round(ratio, 3),
                              "ratio_vs_curl_fsync": round(rate["ringsync"] / rate["curl_static_fsync"], 3),
                              "target": TARGET, "met": ratio >= TARGET})


if __name__ == "__main__":
    main()
